"""The TensorRT/CUDA test double cannot drift from the real APIs.

Every class, method, property and attribute the fake `tensorrt` exposes, and each method's parameter
names, must exist in tensorrt-stubs (TensorRT's Python API as .pyi files, read with `ast` from the venv
scripts/typecheck_trt.sh makes); every function, enum member, class and constant the fake
`cuda.bindings.runtime` exposes must exist in the real module, with the same parameter names
(introspected by that venv's python, where cuda-bindings is installed). A test written against the
double therefore calls only what TensorRT and CUDA really have.
"""

from __future__ import annotations

import ast
import enum
import inspect
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trt_double
from cuda_double import CudaDouble

ROOT = Path(__file__).resolve().parents[2]
STUBS_VENV = ROOT / ".venv-trt-stubs"
#: Dunder methods of the double that are API (TensorRT's Dims is indexable and sized).
API_DUNDERS = {"__init__", "__getitem__", "__len__", "__eq__"}


def _site_packages() -> Path | None:
    found = sorted(STUBS_VENV.glob("lib/python*/site-packages/tensorrt_bindings/tensorrt.pyi"))
    return found[0].parents[1] if found else None


def _venv_python() -> Path | None:
    p = STUBS_VENV / "bin" / "python"
    return p if p.exists() else None


# ---------------------------------------------------------------- tensorrt-stubs, parsed


@dataclass
class StubClass:
    bases: list[str]
    methods: dict[str, list[list[str]]] = field(default_factory=dict)  # name → overloads' parameter names
    properties: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)
    nested: dict[str, StubClass] = field(default_factory=dict)


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    return names if is_static else names[1:]


def _parse_class(node: ast.ClassDef) -> StubClass:
    c = StubClass(bases=[b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases])
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            decorators = {ast.unparse(d) for d in item.decorator_list}
            if "property" in decorators:
                c.properties.add(item.name)
            elif any(d.endswith(".setter") for d in decorators):
                c.properties.add(item.name)
            else:
                c.methods.setdefault(item.name, []).append(_params(item))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            c.attributes.add(item.target.id)
        elif isinstance(item, ast.Assign):
            c.attributes.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif isinstance(item, ast.ClassDef):
            c.nested[item.name] = _parse_class(item)
    return c


@pytest.fixture(scope="module")
def stubs() -> tuple[dict[str, StubClass], set[str]]:
    """(classes of tensorrt_bindings.tensorrt, names the `tensorrt` package exports)."""
    site = _site_packages()
    if site is None:
        pytest.skip("no .venv-trt-stubs (run scripts/typecheck_trt.sh once to make it)")
    tree = ast.parse((site / "tensorrt_bindings" / "tensorrt.pyi").read_text(encoding="utf-8"))
    classes = {n.name: _parse_class(n) for n in tree.body if isinstance(n, ast.ClassDef)}
    init = ast.parse((site / "tensorrt" / "__init__.pyi").read_text(encoding="utf-8"))
    exported: set[str] = set()
    for n in init.body:
        if isinstance(n, ast.ImportFrom):
            exported.update(a.asname or a.name for a in n.names)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            exported.add(n.target.id)
    return classes, exported


def _lookup(classes: dict[str, StubClass], c: StubClass, kind: str, name: str) -> Any:
    """`name` in stub class `c` or its bases (kind: methods / properties / attributes / nested)."""
    found = getattr(c, kind)
    if name in found:
        return found[name] if isinstance(found, dict) else True
    for b in c.bases:
        if b in classes:
            hit = _lookup(classes, classes[b], kind, name)
            if hit is not None:
                return hit
    return None


def _compare_class(cls: type, stub: StubClass, classes: dict[str, StubClass], where: str) -> list[str]:
    problems: list[str] = []
    if issubclass(cls, enum.Enum):
        for member in cls.__members__:
            if _lookup(classes, stub, "attributes", member) is None:
                problems.append(f"{where}.{member}: no such member in tensorrt-stubs")
        return problems
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in API_DUNDERS:
            continue
        qual = f"{where}.{name}"
        if isinstance(value, type):
            nested = _lookup(classes, stub, "nested", name)
            problems += (
                [f"{qual}: no such class"] if nested is None else _compare_class(value, nested, classes, qual)
            )
        elif isinstance(value, property):
            if (
                _lookup(classes, stub, "properties", name) is None
                and _lookup(classes, stub, "attributes", name) is None
            ):
                problems.append(f"{qual}: no such property in tensorrt-stubs")
        elif inspect.isfunction(value):
            overloads = _lookup(classes, stub, "methods", name)
            if overloads is None:
                if name != "__init__":  # objects TensorRT makes itself have no public constructor
                    problems.append(f"{qual}(): no such method in tensorrt-stubs")
                continue
            mine = list(inspect.signature(value).parameters)[1:]
            if mine not in overloads:
                problems.append(f"{qual}{tuple(mine)}: tensorrt-stubs has {[tuple(o) for o in overloads]}")
        elif (
            _lookup(classes, stub, "attributes", name) is None
            and _lookup(classes, stub, "properties", name) is None
        ):
            problems.append(f"{qual}: no such attribute in tensorrt-stubs")
    return problems


def test_fake_tensorrt_matches_the_stubs(stubs: tuple[dict[str, StubClass], set[str]]) -> None:
    classes, exported = stubs
    problems: list[str] = []
    for name in [*trt_double._TRT_NAMES, "__version__"]:
        if name not in exported:
            problems.append(f"tensorrt.{name}: not exported by tensorrt-stubs")
    for name in trt_double._TRT_NAMES:
        cls = getattr(trt_double, name)
        if name not in classes:
            problems.append(f"tensorrt.{name}: no such class in tensorrt-stubs")
            continue
        problems += _compare_class(cls, classes[name], classes, f"tensorrt.{name}")
    # public attributes a constructible double sets on its instances
    for obj, name in ((trt_double.Logger(), "Logger"), (trt_double.Dims((1, 2)), "Dims")):
        for attr in (a for a in vars(obj) if not a.startswith("_")):
            if _lookup(classes, classes[name], "attributes", attr) is None:
                problems.append(f"tensorrt.{name}().{attr}: no such attribute in tensorrt-stubs")
    assert problems == []


def test_the_stub_check_catches_a_misnamed_parameter(stubs: tuple[dict[str, StubClass], set[str]]) -> None:
    """The comparison itself can fail: a double with TensorRT 8's parameter name is reported."""
    classes, _ = stubs

    class IExecutionContext:
        def set_optimization_profile_async(self, profile: int, stream_handle: int) -> bool:
            return True

        def execute_async_v2(self, bindings: list[int], stream_handle: int) -> bool:  # gone in TensorRT 10
            return True

    problems = _compare_class(IExecutionContext, classes["IExecutionContext"], classes, "ctx")
    assert len(problems) == 2
    assert "set_optimization_profile_async('profile', 'stream_handle')" in problems[0]
    assert "execute_async_v2(): no such method" in problems[1]


# ---------------------------------------------------------------- the real cuda.bindings.runtime

_INTROSPECT = r"""
import inspect, json, sys
from cuda.bindings import runtime as rt
want = json.load(sys.stdin)
out = {}
for name, kind in want.items():
    if not hasattr(rt, name):
        out[name] = None
        continue
    obj = getattr(rt, name)
    if kind == "function":
        out[name] = list(inspect.signature(obj).parameters)
    elif kind == "enum":
        out[name] = [m for m in dir(obj) if not m.startswith("_")]
    elif kind == "class":
        out[name] = [a for a in dir(obj()) if not a.startswith("_")]
    else:
        out[name] = int(obj)
print(json.dumps(out))
"""


def _double_names() -> dict[str, Any]:
    m = CudaDouble().module()
    names: dict[str, Any] = {}
    for name in (n for n in dir(m) if n.startswith("cuda")):
        obj = getattr(m, name)
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            names[name] = ("enum", list(obj.__members__))
        elif isinstance(obj, type):
            names[name] = ("class", [a for a in vars(obj()) if not a.startswith("_")])
        elif callable(obj):
            names[name] = ("function", list(inspect.signature(obj).parameters))
        else:
            names[name] = ("constant", int(obj))
    return names


def _real(want: dict[str, str]) -> dict[str, Any]:
    python = _venv_python()
    if python is None:
        pytest.skip("no .venv-trt-stubs (run scripts/typecheck_trt.sh once to make it)")
    res = subprocess.run(
        [str(python), "-c", _INTROSPECT], input=json.dumps(want), capture_output=True, text=True, timeout=120
    )
    if res.returncode != 0 and "No module named 'cuda'" in res.stderr:
        pytest.skip(f"cuda-bindings is not installed in {STUBS_VENV}")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_fake_cudart_matches_the_real_module() -> None:
    mine = _double_names()
    real = _real({k: v[0] for k, v in mine.items()})
    problems: list[str] = []
    for name, (kind, detail) in sorted(mine.items()):
        theirs = real[name]
        if theirs is None:
            problems.append(f"cuda.bindings.runtime.{name}: no such {kind}")
        elif kind == "function" and detail != theirs:
            problems.append(f"{name}{tuple(detail)}: the real signature is {name}{tuple(theirs)}")
        elif kind in ("enum", "class") and set(detail) - set(theirs):
            problems.append(f"{name}: {sorted(set(detail) - set(theirs))} not in the real {kind}")
        elif kind == "constant" and detail != theirs:
            problems.append(f"{name} = {detail}, the real value is {theirs}")
    assert problems == []
    assert {"cudaMemcpyAsync", "cudaStreamBeginCapture", "cudaGraphLaunch"} <= set(mine)  # not vacuous


def test_enum_values_match_the_real_module() -> None:
    """Members' values too: a test that compares `int(err)` must see what CUDA returns."""
    python = _venv_python()
    if python is None:
        pytest.skip("no .venv-trt-stubs")
    m = CudaDouble().module()
    enums = {
        n: {k: int(v) for k, v in getattr(m, n).__members__.items()}
        for n in dir(m)
        if n.startswith("cuda") and isinstance(getattr(m, n), type) and issubclass(getattr(m, n), enum.Enum)
    }
    code = (
        "import json,sys\nfrom cuda.bindings import runtime as rt\nw=json.load(sys.stdin)\n"
        "print(json.dumps({e:{k:int(getattr(getattr(rt,e),k)) for k in ks} for e,ks in w.items()}))"
    )
    res = subprocess.run([str(python), "-c", code], input=json.dumps(enums), capture_output=True, text=True)
    if res.returncode != 0 and "No module named 'cuda'" in res.stderr:
        pytest.skip("cuda-bindings missing")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == enums
