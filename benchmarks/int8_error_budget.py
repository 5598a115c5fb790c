"""Which CPU family's int8 misses the 40 dB bound, and why: NNCF int8 of a model, per arithmetic and per
error source.

    python benchmarks/int8_error_budget.py [--model-dir models/realesrgan-x4plus] [--json out/budget.json]

Each variant is quantized the way `gendr-build quantize --tool nncf` does (engine_build/quantize/nncf_ptq.py,
same float scope and calibration photos) and measured as PSNR against ONNX Runtime fp32 on held-out
photo tiles, in three arithmetics:
- `exact`: each Q/DQ pair and convolution in float (ONNX Runtime, no fusion), i.e. the integer sums VNNI
  and AMX compute exactly: the figure of the `amx`, `avx512_bf16` and `vnni` families, wherever this runs;
- `openvino` and `onnxruntime`: this CPU's own int8 kernels (on a CPU without VNNI, AVX2's saturating
  u8×s8 pairs): the figure of this machine's family.
Then the best variant's error is split by source, each in exact arithmetic: weights only (every
activation Q/DQ pair removed), activations only (the float weights back), and the activations without
the quantizers that follow a LeakyReLU/ReLU (what remains: the residual stream's block inputs and sums).
Last, the quality/speed frontier: the best variant with the last N residual blocks kept float too
(`--float-tails`; RRDB networks, blocks named `…/sub/sub.K/RDB…`), each with its exact PSNR, the share
of multiply-accumulates left in float (f, counted from the graph at the tile size) and the most any int8
unit could speed the tile up over the same runtime's fp32: 1/(f + (1−f)/k) for k = 4 (VNNI's and
AVX-512's int8:fp32 peak ratio per instruction) and k = ∞ (1/f).
The verdict table says, per family, the PSNR its arithmetic gives and whether the bound holds; measured
speed is benchmarks/cpu_efficiency.py's (a family that misses the bound on quality never gets int8).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine
from _cpu_measure import conv_macs, graph_with_tile, psnr

FAMILIES = ("amx", "avx512_bf16", "vnni", "avx2")
#: variant label → (weight bits, equalization strength)
VARIANTS = {"w7": (7, 0.0), "w8": (8, 0.0), "w8-eq": (8, 0.5)}


def drop_qdq(model: Any, float_weights: dict[str, np.ndarray] | None, keep_act: Any = None) -> Any:
    """A copy of the Q/DQ graph with weight DQs replaced by `float_weights` (None: kept) and activation
    Q/DQ pairs removed unless `keep_act(tensor)` (None: all kept)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name for t in g.initializer}
    writer = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = writer.get(n.input[0])
        if q is None and float_weights is not None:  # a weight: DQ over an int8 initializer
            reader = next(r for r in g.node if n.output[0] in r.input)
            name = f"{reader.name}.float_weight"
            g.initializer.append(numpy_helper.from_array(float_weights[reader.name], name))
            inits.add(name)
            rename[n.output[0]] = name
        elif (
            q is not None
            and q.op_type == "QuantizeLinear"
            and keep_act is not None
            and not keep_act(q.input[0])
        ):
            rename[n.output[0]] = q.input[0]
    for n in g.node:
        for i, v in enumerate(n.input):
            if v in rename:
                n.input[i] = rename[v]
    return m


def conv_weights(model: Any) -> dict[str, np.ndarray]:
    """Conv name → its float weight (of the float graph that was quantized)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    src = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    return {
        n.name: numpy_helper.to_array(inits[src.get(n.input[1], n.input[1])])
        for n in model.graph.node
        if n.op_type == "Conv"
    }


def float_mac_share(graph: Path, tile: int, scale: int) -> float:
    """Share of the tile's convolution multiply-accumulates whose weights are not quantized."""
    m = graph_with_tile(graph, tile, scale)
    dq = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    macs = {True: 0.0, False: 0.0}
    for n, mac in conv_macs(m):
        macs[n.input[1] not in dq] += mac
    return macs[True] / (macs[True] + macs[False])


def tail_pattern(graph: Path, n: int) -> str | None:
    """Regex over the node names of an RRDB network's last `n` residual blocks (None: not such a network)."""
    import onnx

    names = [x.name for x in onnx.load(str(graph), load_external_data=False).graph.node]
    blocks = {int(m.group(1)) for x in names if (m := re.search(r"/sub/sub\.(\d+)/RDB", x))}
    if not blocks or n <= 0:
        return None
    last = sorted(blocks)[-n:]
    return r".*/sub/sub\.(" + "|".join(map(str, last)) + r")/.*"


def run_all(fn: Any, tiles: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(t[None]) for t in tiles])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models" / "realesrgan-x4plus")
    ap.add_argument("--calib-tiles", type=int, default=8)
    ap.add_argument("--eval-tiles", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--float-tails", default="6,12", help="residual blocks kept float for the frontier")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import onnx

    from engine_build.quantize.calib import calibration_tiles
    from engine_build.quantize.equalize import equalize
    from engine_build.quantize.nncf_ptq import (
        exact_runner,
        float_scope,
        ort_runner,
        ov_runner,
        quantize_nncf_int8,
    )
    from service.hardware import cpu_family, cpu_flags
    from service.manifest import read_manifest

    manifest = read_manifest(args.model_dir, verify=False)
    fp32 = args.model_dir / manifest.onnx["fp32"].graph.path
    name = manifest.onnx["fp32"].input_name
    here = cpu_family(cpu_flags())
    calib = calibration_tiles(manifest, "builtin", args.calib_tiles, 0, disjoint=True)
    held_out = calibration_tiles(manifest, "builtin", args.eval_tiles, 1000)  # the parity photos
    ref = run_all(ort_runner(fp32, name), held_out)
    scope = float_scope(fp32, manifest.kind).names()
    rows: dict[str, dict[str, Any]] = {}
    best: tuple[str, Path, float, float] | None = None  # label, graph, equalization, exact PSNR
    work = Path(tempfile.mkdtemp(prefix="int8-budget-"))
    for label in args.variants.split(","):
        bits, alpha = VARIANTS[label]
        out = work / f"{label}.onnx"
        t0 = time.perf_counter()
        info = quantize_nncf_int8(fp32, out, name, calib, scope, weight_bits=bits, equalize_alpha=alpha)
        row: dict[str, Any] = {
            "weight_bits": bits,
            "equalize": alpha,
            "quantize_s": round(time.perf_counter() - t0),
        }
        row["exact"] = psnr(ref, run_all(exact_runner(out, name), held_out))
        row["openvino"] = psnr(ref, run_all(ov_runner(out), held_out))
        row["onnxruntime"] = psnr(ref, run_all(ort_runner(out, name), held_out))
        row["equalized_groups"] = info["equalization"]["groups"]
        rows[label] = row
        print(f"{label}: {row}", flush=True)
        if best is None or row["exact"] > best[3]:
            best = (label, out, alpha, row["exact"])
    assert best is not None
    label, graph, alpha, _ = best
    float_model = onnx.load(str(fp32))
    if alpha > 0:  # the float weights that were quantized are the equalized ones (same tiles: same gains)
        equalize(float_model, calib, name, alpha)
    q = onnx.load(str(graph))
    writer = {o: n.op_type for n in q.graph.node for o in n.output}

    def exact_psnr_of(path: Path) -> float:
        return psnr(ref, run_all(exact_runner(path, name), held_out))

    def exact(model: Any) -> float:
        return exact_psnr_of(_save(model, work))

    budget = {
        "variant": label,
        "both": rows[label]["exact"],
        "weights_only": exact(drop_qdq(q, None, keep_act=lambda t: False)),
        "activations_only": exact(drop_qdq(q, conv_weights(float_model))),
        "activations_but_after_activation_fns": exact(
            drop_qdq(
                q, conv_weights(float_model), keep_act=lambda t: writer.get(t) not in ("LeakyRelu", "Relu")
            )
        ),
    }
    print(f"error budget ({label}, exact arithmetic): {budget}", flush=True)
    g = manifest.tile
    frontier = [{"float_blocks": 0, "exact": rows[label]["exact"], "float_mac_share": None}]
    frontier[0]["float_mac_share"] = round(float_mac_share(graph, g.tile, g.graph_scale), 3)
    bits = VARIANTS[label][0]
    for n in [int(x) for x in args.float_tails.split(",") if x.strip()]:
        pattern = tail_pattern(fp32, n)
        if pattern is None:
            continue
        out = work / f"{label}-tail{n}.onnx"
        names = float_scope(fp32, manifest.kind, [pattern]).names()
        quantize_nncf_int8(fp32, out, name, calib, names, weight_bits=bits, equalize_alpha=alpha)
        share = round(float_mac_share(out, g.tile, g.graph_scale), 3)
        frontier.append({"float_blocks": n, "exact": exact_psnr_of(out), "float_mac_share": share})
    for f in frontier:
        share = f["float_mac_share"]
        f["max_speedup_k4"] = round(1 / (share + (1 - share) / 4), 2)
        f["max_speedup_int8_free"] = round(1 / share, 2)
        print(f"frontier: {f}", flush=True)
    verdict = []
    for fam in FAMILIES:
        exact_fam = fam != "avx2"
        if exact_fam:
            fig, how = rows[label]["exact"], "exact int32 sums (VNNI/AMX), emulated here"
        elif here == "avx2":
            fig, how = min(rows[label]["openvino"], rows[label]["onnxruntime"]), "this CPU's AVX2 kernels"
        else:
            fig, how = None, "not measured (this CPU is not avx2)"
        verdict.append({"family": fam, "psnr_db": fig, "how": how, "passes": fig is not None and fig >= 40.0})
    report = {
        "machine": machine(),
        "family_here": here,
        "model": manifest.name,
        "variants": rows,
        "budget": budget,
        "frontier": frontier,
        "families": verdict,
    }
    print("\n| CPU family | best int8 PSNR vs fp32 | arithmetic | ≥ 40 dB |\n| --- | --- | --- | --- |")
    for v in verdict:
        print(f"| {v['family']} | {v['psnr_db']} | {v['how']} | {'yes' if v['passes'] else 'no'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _save(model: Any, work: Path) -> Path:
    import onnx

    p = work / "probe.onnx"
    onnx.save(model, str(p))
    return p


if __name__ == "__main__":
    sys.exit(main())
