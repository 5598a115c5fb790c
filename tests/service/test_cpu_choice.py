"""`auto` on the CPU by family (service/backends/select.py: cpu_choice): NNCF's int8 graph only where its
parity passes and a figure measured on that family says it is the fastest path; bf16 on a bf16 unit
otherwise; ONNX Runtime fp32 where nothing was measured. Flags and figures are fake tables: nothing
here depends on this machine's CPU or speed."""

from __future__ import annotations

from typing import Any

import pytest

from service.backends import openvino as ovmod
from service.backends import select
from service.backends.select import openvino_candidate  # tests/conftest.py turns it off; restored below
from service.hardware import cpu_family, cpu_units
from service.manifest import Artifact, Manifest, OnnxVariant, TileGeometry
from service.settings import Settings

#: /proc/cpuinfo flags of the families, as their CPUs report them (the parts that matter).
FLAGS = {
    "xeon-sapphire-rapids": {
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
    },
    "epyc-zen4": {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"},
    "xeon-ice-lake": {"avx2", "fma", "avx512f", "avx512_vnni"},
    "core-alder-lake": {"avx2", "fma", "avx_vnni"},
    "epyc-zen3": {"avx2", "fma"},
    "xeon-skylake": {"avx2", "fma", "avx512f"},
    "atom-old": {"sse4_2"},
}
FAMILY = {
    "xeon-sapphire-rapids": "amx",
    "epyc-zen4": "avx512_bf16",
    "xeon-ice-lake": "vnni",
    "core-alder-lake": "vnni",
    "epyc-zen3": "avx2",
    "xeon-skylake": "avx2",  # AVX-512 without VNNI: int8 saturates at int16 as on AVX2
    "atom-old": "baseline",
}
SHA = "0" * 64


def _variant(precision: str, quantization: dict[str, Any] | None = None) -> OnnxVariant:
    art = Artifact(path=f"onnx/{precision}/model.onnx", sha256=SHA, size=1)
    return OnnxVariant(precision=precision, graph=art, opset=18, key="k", quantization=quantization)  # type: ignore[arg-type]


def _manifest(
    psnr: float = 44.0,
    tool: str = "nncf",
    speed: dict[str, Any] | None = None,
    kind: str = "single",
    weight_bits: int | None = None,
    parity_family: str | None = None,
) -> Manifest:
    q: dict[str, Any] = {"tool": tool, "base": "fp32", "parity": {"psnr_db": psnr, "passes": psnr >= 40}}
    if weight_bits is not None:
        q["weight_bits"] = weight_bits
    if parity_family is not None:
        q["parity"]["family"] = parity_family
    if speed is not None:
        q["speed"] = speed
    return Manifest(
        name="m",
        kind=kind,  # type: ignore[arg-type]
        native_scale=4,
        tile=TileGeometry(tile=32, overlap=8, graph_scale=4, size_multiple=8),
        onnx={"fp32": _variant("fp32"), "int8": _variant("int8", q)},
    )


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A CPU machine with OpenVINO installed, whose flags and figure table the test sets."""
    state: dict[str, Any] = {"flags": set(), "openvino": True}
    monkeypatch.setattr(select, "openvino_candidate", openvino_candidate)
    monkeypatch.setattr(ovmod, "cpu_flags", lambda: state["flags"])
    monkeypatch.setattr(select, "gpu_info", lambda _i=0: None)
    monkeypatch.setattr(select, "tensorrt_version", lambda: None)
    monkeypatch.setattr(select, "ort_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(select, "has_package", lambda name: name != "openvino" or state["openvino"])
    monkeypatch.setattr(
        select,
        "CPU_FIGURES",
        {  # fake figures, s per tile: int8 wins on avx2 and vnni, bf16 on amx
            "amx": {"ort-fp32": 1.6, "ov-bf16": 0.44, "ov-int8": 0.5},
            "avx2": {"ort-fp32": 1.0, "ort-int8": 1.2, "ov-fp32": 0.9, "ov-int8": 0.6},
            "vnni": {"ort-fp32": 1.0, "ort-int8": 0.7, "ov-int8": 0.3},
        },
    )
    return state


def test_families_from_flags() -> None:
    for cpu_name, flags in FLAGS.items():
        assert cpu_family(flags) == FAMILY[cpu_name], cpu_name
    assert cpu_units(FLAGS["epyc-zen4"]) == {
        "bf16": ["avx512_bf16"],
        "vnni": ["avx512_vnni"],
        "avx512": ["avx512f"],
        "avx2": ["avx2", "fma"],
    }
    assert ovmod.int8_flags(FLAGS["core-alder-lake"]) == ["avx_vnni"] and not ovmod.int8_flags(
        FLAGS["epyc-zen3"]
    )


@pytest.mark.parametrize(
    ("cpu_name", "openvino", "ort"),
    [
        ("epyc-zen3", "int8", "fp32"),  # int8 measured 1.67× ORT fp32 in OpenVINO, slower in ONNX Runtime
        ("xeon-ice-lake", "int8", "auto"),  # VNNI: int8 fastest in both runtimes
        ("xeon-sapphire-rapids", "bf16", "fp32"),  # AMX: int8 0.5 s is not 1.1× faster than bf16's 0.44
        ("epyc-zen4", "bf16", "fp32"),  # avx512_bf16 family: no figures, int8 unmeasured → bf16
        ("core-alder-lake", "int8", "auto"),  # AVX-VNNI is the vnni family
        ("atom-old", None, "fp32"),  # nothing measured, no bf16 unit: ONNX Runtime fp32
    ],
)
def test_auto_per_family(cpu: dict[str, Any], cpu_name: str, openvino: str | None, ort: str) -> None:
    cpu["flags"] = FLAGS[cpu_name]
    c = select.cpu_choice(_manifest(), Settings(backend="auto"))
    assert (c.family, c.openvino, c.ort_precision) == (FAMILY[cpu_name], openvino, ort)
    names = [x.name for x in select.candidates(_manifest(), Settings(backend="auto"))]
    assert names == (["openvino-cpu", "onnxruntime-cpu"] if openvino else ["onnxruntime-cpu"])
    if openvino == "int8":
        assert "OpenVINO int8 (NNCF" in c.reason and "≥ 40 dB" in c.reason and FAMILY[cpu_name] in c.reason


def test_int8_needs_its_parity(cpu: dict[str, Any]) -> None:
    cpu["flags"] = FLAGS["epyc-zen3"]
    c = select.cpu_choice(_manifest(psnr=39.9), Settings(backend="auto"))
    assert (c.openvino, c.ort_precision) == (None, "fp32") and "below the 40 dB bound" in c.reason
    cpu["flags"] = FLAGS["xeon-sapphire-rapids"]  # still bf16 there
    assert select.cpu_choice(_manifest(psnr=39.9), Settings(backend="auto")).openvino == "bf16"


@pytest.mark.parametrize(
    ("weight_bits", "parity_family", "cpu_name", "served"),
    [
        (8, "vnni", "xeon-ice-lake", True),  # VNNI sums exactly: the parity's exact row speaks for it
        (8, "amx", "core-alder-lake", True),
        (8, "vnni", "epyc-zen3", False),  # measured on VNNI, served on AVX2: saturation unmeasured
        (8, None, "xeon-skylake", False),  # no family recorded
        (8, "avx2", "epyc-zen3", True),  # measured on a CPU that saturates like this one
        (7, "vnni", "epyc-zen3", True),  # 7-bit weights never saturate
        (None, None, "epyc-zen3", True),  # graphs from before weight_bits: 7-bit
    ],
)
def test_eight_bit_weights_on_a_cpu_without_vnni(
    cpu: dict[str, Any], weight_bits: int | None, parity_family: str | None, cpu_name: str, served: bool
) -> None:
    """AVX2 adds u8×s8 pairs in saturating int16: an 8-bit-weight graph's parity holds there only when it
    was measured on such a CPU."""
    cpu["flags"] = FLAGS[cpu_name]
    m = _manifest(weight_bits=weight_bits, parity_family=parity_family)
    c = select.cpu_choice(m, Settings(backend="auto"))
    assert (c.openvino == "int8") is served, c.reason
    if not served:
        assert "saturate" in c.reason and "--weight-bits 7" in c.reason and c.ort_precision == "fp32"


def test_the_repository_figure_for_this_family_beats_the_table(cpu: dict[str, Any]) -> None:
    """`gendr-build quantize --tool nncf` on a Zen 4 records a figure for its family: `auto` uses it there,
    and only there."""
    zen4 = {
        "family": "avx512_bf16",
        "cpu": "AMD EPYC 9R14",
        "s_per_tile": {"ort-fp32": 1.0, "ov-bf16": 0.7, "ov-int8": 0.3},
    }
    cpu["flags"] = FLAGS["epyc-zen4"]
    c = select.cpu_choice(_manifest(speed=zen4), Settings(backend="auto"))
    assert c.openvino == "int8" and "AMD EPYC 9R14" in c.reason and "2.33× ov-bf16" in c.reason
    slow = dict(zen4, s_per_tile={"ort-fp32": 1.0, "ov-bf16": 0.5, "ov-int8": 0.48})
    assert select.cpu_choice(_manifest(speed=slow), Settings(backend="auto")).openvino == "bf16"
    cpu["flags"] = FLAGS["epyc-zen3"]  # another family: the table's avx2 figures decide
    assert select.cpu_choice(_manifest(speed=slow), Settings(backend="auto")).openvino == "int8"
    cpu["flags"] = FLAGS["xeon-sapphire-rapids"]
    assert select.cpu_choice(_manifest(speed=zen4), Settings(backend="auto")).openvino == "bf16"


def test_what_is_not_nncf_or_not_single_or_not_installed(cpu: dict[str, Any]) -> None:
    cpu["flags"] = FLAGS["xeon-ice-lake"]
    ort_graph = select.cpu_choice(_manifest(tool="onnxruntime.quantization"), Settings(backend="auto"))
    assert (ort_graph.openvino, ort_graph.ort_precision) == (None, "auto")  # ORT's own int8 rule, unchanged
    gendr = _manifest().model_copy(update={"kind": "gendr"})  # GenDR's bf16/int8 quality is unmeasured
    assert select.cpu_choice(gendr, Settings(backend="auto")).openvino is None
    cpu["openvino"] = False
    assert [x.name for x in select.candidates(_manifest(), Settings(backend="auto"))] == ["onnxruntime-cpu"]
    cpu["openvino"] = True
    explicit = select.cpu_choice(_manifest(), Settings(backend="auto", precision="fp32"))
    assert (
        explicit.openvino is None and explicit.ort_precision == "auto"
    )  # an explicit precision is served as asked


def test_build_passes_the_chosen_precision(cpu: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend gets the rule's precision, not `auto`: OpenVINO int8, ONNX Runtime fp32."""
    seen: dict[str, str] = {}

    class Spy:
        @classmethod
        def from_settings(cls, name: str, manifest: Manifest, model_dir: Any, settings: Settings) -> str:
            seen[name] = settings.precision
            return name

    monkeypatch.setattr(select, "backend_class", lambda _name: Spy)
    cpu["flags"] = FLAGS["epyc-zen3"]
    for name in ("openvino-cpu", "onnxruntime-cpu"):
        select.build(name, _manifest(), None, Settings(backend="auto"))  # type: ignore[arg-type]
    assert seen == {"openvino-cpu": "int8", "onnxruntime-cpu": "fp32"}
    select.build("onnxruntime-cpu", _manifest(), None, Settings(backend="auto", precision="int8"))  # type: ignore[arg-type]
    assert seen["onnxruntime-cpu"] == "int8"


def test_openvino_serves_only_nncf_int8() -> None:
    assert ovmod.resolve_precision("int8", {"avx2"}, nncf=True) == "int8"
    with pytest.raises(select.BackendUnavailable, match="made by NNCF"):
        ovmod.resolve_precision("int8", {"amx_int8"}, nncf=False)
    assert ovmod.nncf_int8(_manifest()) is not None
    assert ovmod.nncf_int8(_manifest(tool="nvidia-modelopt")) is None


def test_openvino_fp32_where_measured_well_ahead(
    cpu: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a passing int8 graph or a bf16 unit, OpenVINO fp32 (the same graph, ≈90 dB from ONNX
    Runtime) serves only where measured ≥ 1.3× ONNX Runtime fp32 on this family."""
    cpu["flags"] = FLAGS["epyc-zen3"]
    figures = {"avx2": {"ort-fp32": 3.3, "ov-fp32": 2.1, "ov-int8": 1.1}}
    monkeypatch.setattr(select, "CPU_FIGURES", figures)
    c = select.cpu_choice(_manifest(psnr=35.3), Settings(backend="auto"))
    assert c.openvino == "fp32" and "1.57× ONNX Runtime fp32" in c.reason and "below the 40 dB" in c.reason
    figures["avx2"]["ov-fp32"] = 2.8  # 1.18×: ONNX Runtime keeps it
    assert select.cpu_choice(_manifest(psnr=35.3), Settings(backend="auto")).openvino is None
    figures["avx2"]["ov-fp32"] = 1.05  # int8 passing but not 1.1× ahead of OpenVINO fp32: fp32 serves
    assert select.cpu_choice(_manifest(psnr=44.0), Settings(backend="auto")).openvino == "fp32"
