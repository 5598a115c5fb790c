"""Hole 3 and the request options as properties (hypothesis): every combination a client can send gets
either the image it asked for or a documented 4xx with a JSON body, never a 5xx; `scale` above
GENDR_MAX_SCALE is a 400 whatever the rounding."""

from __future__ import annotations

import io
import math
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_helpers import encode, engine_calls, noise

from service.pixels.imageops import target_size

MAX_SCALE = 3.0
SRC_H, SRC_W = 12, 10
BODY = encode(noise(SRC_H, SRC_W, seed=11), "PNG")
DOCUMENTED = {
    400: "bad_request",
    404: "model_not_found",
    413: "image_too_large",
    504: "deadline_exceeded",
}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def client(make_app):
    return make_app(max_scale=MAX_SCALE, max_output_pixels=4096)


def _post(client, params: dict[str, object]):
    return client.post("/upscale?" + urlencode(params), content=BODY, headers={"content-type": "image/png"})


def test_scale_just_above_the_limit_is_400(client) -> None:
    """Hole 3: 3.0001 rounds to ×3 on a small image; the asked-for scale still exceeds the limit."""
    for scale in (MAX_SCALE + 1e-4, MAX_SCALE + 0.01, 16):
        r = _post(client, {"scale": scale})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", (scale, r.text)
        assert "exceeds the limit" in r.json()["error"]["message"]
    r = client.post(
        "/upscale", files={"image": ("a.png", BODY, "image/png")}, data={"scale": str(MAX_SCALE + 1e-4)}
    )
    assert r.status_code == 400, r.text  # the same option as a multipart form field
    assert _post(client, {"scale": MAX_SCALE}).status_code == 200
    assert engine_calls(client) >= 1


@FAST
@given(scale=st.floats(min_value=1e-3, max_value=16, allow_nan=False))
def test_scale_property(client, scale: float) -> None:
    r = _post(client, {"scale": repr(scale)})
    if scale > MAX_SCALE:
        assert r.status_code == 400, (scale, r.text)
        return
    out_h, out_w = target_size(SRC_H, SRC_W, scale=scale)
    if max(out_h / SRC_H, out_w / SRC_W) > MAX_SCALE + 1e-9:  # rounding up past the limit
        assert r.status_code == 400, (scale, r.text)
        return
    assert r.status_code == 200, (scale, r.text)
    assert Image.open(io.BytesIO(r.content)).size == (out_w, out_h)


_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="&=#%+"), max_size=12
)
_number = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-0", "1e309", "0x10", " 2 ", ""]),
)
options = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(["fake", "FAKE", "nope", "../etc", ""]), _text),
        "scale": _number,
        "width": _number,
        "height": _number,
        "format": st.one_of(st.sampled_from(["png", "JPG", "jpeg", "webp", "gif", ""]), _text),
        "quality": _number,
        "color_fix": st.one_of(st.sampled_from(["none", "adain", "wavelet", "Wavelet", "x"]), _text),
        "deadline_ms": st.one_of(st.integers(-5, 10**9), st.sampled_from(["1", "abc", "1e3"])),
        "unknown_option": st.just("1"),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=options)
def test_any_options_get_the_image_or_a_documented_4xx(client, params: dict[str, object]) -> None:
    r = _post(client, params)
    if r.status_code == 200:
        im = Image.open(io.BytesIO(r.content))
        w, h = (int(v) for v in r.headers["x-image-size"].split("x"))
        assert im.size == (w, h) and w * h <= 4096
        assert max(h / SRC_H, w / SRC_W) <= MAX_SCALE + 1e-9
        return
    assert r.status_code in DOCUMENTED, (params, r.status_code, r.text)
    code = r.json()["error"]["code"]
    assert code == DOCUMENTED[r.status_code], (params, r.text)
    if r.status_code == 504:  # only with a deadline the client set (the default is minutes)
        assert "deadline_ms" in params, params
    if isinstance(params.get("scale"), float) and math.isfinite(params["scale"]):  # type: ignore[arg-type]
        if params["scale"] > MAX_SCALE and len(params) == 1:  # type: ignore[operator]
            assert r.status_code == 400
