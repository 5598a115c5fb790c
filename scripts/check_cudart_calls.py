"""Check that every CUDA runtime name a source file uses exists in the real `cuda.bindings.runtime`.

The TensorRT backend calls cudart through a checked wrapper by name (`cuda("cudaMemcpyAsync", dst, …)`)
and reads enums off the module (`rt.cudaMemcpyKind.cudaMemcpyHostToDevice`); cuda-bindings is a Cython
module without type stubs, so mypy cannot see either. This reads the files' syntax trees and checks
each name — and, for calls, that the arguments bind to the function's real signature — against the
installed module (it imports on a machine without a GPU). Run by scripts/typecheck_trt.sh in its venv.

Usage: python scripts/check_cudart_calls.py FILE... ; exit 1 with one line per problem.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

CUDA_NAME = re.compile(r"^cuda[A-Z]\w*$")


@dataclass(frozen=True)
class Use:
    """One use of a cudart name: `path` is the attribute chain from the module, `nargs` set for calls."""

    file: str
    line: int
    path: tuple[str, ...]
    nargs: int | None = None
    keywords: tuple[str, ...] = ()


def _chain(node: ast.expr) -> list[str]:
    """a.b.c → ['a', 'b', 'c'] (stops at anything that is not a name or an attribute)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def uses(file: str, source: str) -> list[Use]:
    """The cudart names `source` uses: by-name calls `f("cudaX", *args)` and attributes `….cudaX[.Y]`."""
    tree = ast.parse(source, file)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    aliases = _aliases(tree)
    found: list[Use] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            if (
                isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and CUDA_NAME.match(first.value)
            ):
                if isinstance(node.func, ast.Name) and node.func.id == "hasattr":
                    continue  # a probe for an optional function
                if isinstance(node.func, ast.Name) and node.func.id == "getattr":
                    found.append(Use(file, node.lineno, (first.value,)))
                elif not any(isinstance(a, ast.Starred) for a in node.args[1:]):
                    kws = tuple(k.arg for k in node.keywords if k.arg is not None)
                    found.append(Use(file, node.lineno, (first.value,), len(node.args) - 1, kws))
        if isinstance(node, ast.Attribute) and not isinstance(parents.get(node), ast.Attribute):
            chain = _chain(node)
            if chain and chain[0] in aliases:  # kind = rt.cudaMemcpyKind; kind.cudaMemcpyHostToDevice
                chain = ["rt", *aliases[chain[0]], *chain[1:]]
            for i, part in enumerate(chain[1:], start=1):
                if CUDA_NAME.match(part):
                    call = parents.get(node)
                    if isinstance(call, ast.Call) and call.func is node:  # rt.cudaX(args)
                        if any(isinstance(a, ast.Starred) for a in call.args):
                            found.append(Use(file, node.lineno, tuple(chain[i:])))
                        else:
                            kws = tuple(k.arg for k in call.keywords if k.arg is not None)
                            found.append(Use(file, node.lineno, tuple(chain[i:]), len(call.args), kws))
                    else:
                        found.append(Use(file, node.lineno, tuple(chain[i:])))
                    break
    return found


def _aliases(tree: ast.AST) -> dict[str, tuple[str, ...]]:
    """Local names bound to a cudart attribute (`kind = self.rt.cudaMemcpyKind` → kind: (cudaMemcpyKind,))."""
    found: dict[str, tuple[str, ...]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            chain = _chain(node.value) if isinstance(node.value, ast.Attribute) else []
            for i, part in enumerate(chain[1:], start=1):
                if CUDA_NAME.match(part):
                    found[node.targets[0].id] = tuple(chain[i:])
                    break
    return found


def check(use: Use, rt: ModuleType) -> str | None:
    """A one-line problem with `use` against the module `rt`, or None."""
    obj: Any = rt
    for i, part in enumerate(use.path):
        if not hasattr(obj, part):
            where = "cuda.bindings.runtime" + "".join("." + p for p in use.path[:i])
            return f"{use.file}:{use.line}: {where} has no attribute {part!r}"
        obj = getattr(obj, part)
    if use.nargs is None:
        return None
    name = ".".join(use.path)
    if not callable(obj):
        return f"{use.file}:{use.line}: cuda.bindings.runtime.{name} is not callable"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None  # no introspectable signature: the name check is all we can do
    try:
        sig.bind(*range(use.nargs), **{k: None for k in use.keywords})
    except TypeError as e:
        return f"{use.file}:{use.line}: {name}{sig} called with {use.nargs} argument(s): {e}"
    return None


def main(files: list[str]) -> int:
    from cuda.bindings import runtime as rt

    problems: list[str] = []
    n = 0
    for file in files:
        with open(file, encoding="utf-8") as f:
            found = uses(file, f.read())
        n += len(found)
        problems += [p for p in (check(u, rt) for u in found) if p]
    for p in problems:
        print(p)
    print(f"check_cudart_calls: {n} cudart uses in {len(files)} file(s), {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
