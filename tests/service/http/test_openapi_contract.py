"""The OpenAPI document says what the server does: the versioned /v1/upscale, our 400 error body for
validation (never FastAPI's 422 schema), and this server's own limits; health probes' 503s carry a
request id like every other error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from http_helpers import encode, small

Client = Callable[..., Any]


def test_the_schema_has_v1_upscale_our_400_and_the_servers_scale_limit(make_client: Client) -> None:
    c = make_client(max_scale=6)
    schema = c.get("/openapi.json").json()
    assert "/v1/upscale" in schema["paths"] and "/upscale" not in schema["paths"]
    assert "HTTPValidationError" not in str(schema)
    for ops in schema["paths"].values():
        for op in ops.values():
            bad422 = op["responses"].get("422", {}).get("description", "undecodable")
            assert "undecodable" in bad422 or "url_fetch_failed" in bad422  # 422 only for what it means here
    op = schema["paths"]["/v1/upscale"]["post"]
    assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    scale = next(p for p in op["parameters"] if p["name"] == "scale")["schema"]
    maxima = [s.get("maximum") for s in [scale, *scale.get("anyOf", [])] if "maximum" in s]
    assert maxima == [6]
    assert c.get("/v1/models").json()["limits"]["max_scale"] == 6


def test_v1_upscale_and_the_alias_answer_the_same(make_client: Client) -> None:
    c = make_client()
    img = encode(small("astronaut.png", 40))
    a, b = c.post("/v1/upscale?scale=2", content=img), c.post("/upscale?scale=2", content=img)
    assert a.status_code == b.status_code == 200 and a.content == b.content
    metrics = c.get("/metrics").text
    assert 'gendr_requests_total{model="tiny",status="200"} 2.0' in metrics  # both counted as /upscale


def test_health_probes_503_carry_a_request_id(make_client: Client) -> None:
    c = make_client()  # started: nothing changes the state behind the test's back
    st = c.app.state.gendr
    st.started, st.start_error = False, RuntimeError("a model was refused")  # as a failed start leaves it
    for path in ("/healthz", "/readyz"):
        r = c.get(path, headers={"X-Request-Id": "probe-7"})
        assert r.status_code == 503 and r.json()["request_id"] == "probe-7"
