"""The module and package graph docs/architecture.md draws: one-way (the runtime never imports the build
stage), free of import cycles (imports inside functions count too), and every package importing only
the packages `ALLOWED` names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "engine_build", "gendr_client")


# A module belongs to the first entry of LAYERS its dotted name starts with (the longest prefix wins);
# each layer may import itself and what ALLOWED names for it, nothing else. Written once, as data.
SERVICE_BASE = "service"  # errors, settings, manifest, metrics, hardware: everything may use them
ALLOWED: dict[str, set[str]] = {
    "service": set(),
    "service.backends": {"service"},
    "service.pixels": {"service"},
    "service.scheduling": {"service", "service.backends", "service.pixels"},
    "service.runtime": {"service", "service.backends", "service.pixels", "service.scheduling"},
    "service.jobs": {"service", "service.runtime", "service.pixels", "service.scheduling"},
    "service.http": {
        "service",
        "service.backends",
        "service.pixels",
        "service.scheduling",
        "service.runtime",
        "service.jobs",
    },
    "service.cli": {"service", "service.http"},
    "engine_build": {"service"},  # errors, repository, gpu_targets
    "engine_build.gendr": {"engine_build", "service", "service.pixels"},
    "engine_build.sr": {"engine_build", "engine_build.gendr", "service"},
    "engine_build.torch_backend": {"engine_build.gendr", "engine_build.sr", "service", "service.backends"},
    "engine_build.verify": {
        "engine_build",
        "engine_build.gendr",
        "engine_build.sr",
        "engine_build.torch_backend",
        "service",
        "service.backends",
        "service.pixels",
    },
    "engine_build.trt": {"engine_build", "service"},
    "engine_build.storage": {"engine_build", "service"},  # torch-free: the serving pods' init container
    "engine_build.export": {
        "engine_build",
        "engine_build.gendr",
        "engine_build.trt",
        "engine_build.verify",
        "service",
    },
    "engine_build.quantize": {
        "engine_build",
        "engine_build.export",
        "engine_build.verify",
        "service",
        "service.backends",
    },
    "engine_build.commands": {
        "engine_build",
        "engine_build.export",
        "engine_build.gendr",
        "engine_build.quantize",
        "engine_build.sr",
        "engine_build.storage",
        "engine_build.trt",
        "engine_build.verify",
        "service",
        "service.backends",
        "service.pixels",
    },
    "engine_build.cli": {"engine_build"},  # finds engine_build.commands by name (importlib)
    "gendr_client": set(),
}
# Modules that form a layer with a package: the runtime's contract and its request type sit above the
# scheduler and the pixel path they compose.
LAYER_OF = {"service.runtime_api": "service.runtime", "service.requests": "service.runtime"}


def layer(module: str) -> str:
    module = LAYER_OF.get(module, module)
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in ALLOWED:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer of ALLOWED")


def module_graph() -> dict[str, set[str]]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_runtime_never_imports_the_build_stage() -> None:
    g = module_graph()
    bad = sorted(
        (m, t) for m, ts in g.items() for t in ts if m.startswith("service") and t.startswith("engine_build")
    )
    assert not bad, bad
    client = sorted(
        (m, t) for m, ts in g.items() for t in ts if m.startswith("gendr_client") and "gendr_client" not in t
    )
    assert not client, client  # the client is httpx only: installable without the server


def test_no_import_cycles() -> None:
    assert cycles(module_graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_http_package_imports_a_web_framework() -> None:
    web = ("fastapi", "starlette", "uvicorn", "h11", "multipart")
    bad = []
    for p in (ROOT / "service").rglob("*.py"):
        rel = p.relative_to(ROOT).as_posix()
        if rel.startswith("service/http/") or rel == "service/cli.py":  # cli.py starts uvicorn
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{rel}: {n}" for n in names if n.split(".")[0] in web]
    assert not bad, bad


def test_every_package_imports_only_what_the_package_graph_allows() -> None:
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in module_graph().items()
        for t in ts
        if layer(t) != layer(m) and layer(t) not in ALLOWED[layer(m)]
    )
    assert not bad, bad


def test_the_package_graph_itself_has_no_cycle() -> None:
    assert cycles({k: set(v) for k, v in ALLOWED.items()}) == []


def test_the_package_check_catches_a_forbidden_import() -> None:
    assert layer("service.pixels.tiling") == "service.pixels"
    assert layer("service.requests") == "service.runtime"
    assert "service.http" not in ALLOWED[layer("service.jobs.records")]


def test_every_package_says_what_it_holds_and_may_import() -> None:
    """Each package's __init__ docstring names what it holds (and, for the layers, what it may import)."""
    missing = []
    for pkg in PACKAGES:
        for init in (ROOT / pkg).rglob("__init__.py"):
            tree = ast.parse(init.read_text())
            if not (ast.get_docstring(tree) or "").strip():
                missing.append(init.relative_to(ROOT).as_posix())
    assert not missing, missing


def test_no_module_file_names_repeat_their_package_name() -> None:
    """`engine_build/trt/rules.py`, not `trt_rules.py`: a prefix is a package not yet made."""
    bad = [
        p.relative_to(ROOT).as_posix()
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if p.parent.name not in PACKAGES and p.stem.startswith(p.parent.name + "_")
    ]
    assert not bad, bad
