"""The module graph docs/architecture.md draws: one-way (the runtime never imports the build stage),
and free of import cycles, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "engine_build", "gendr_client")


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
