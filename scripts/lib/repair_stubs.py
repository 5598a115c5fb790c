"""Repair the syntax errors pybind11-stubgen left in tensorrt-stubs, in place, so mypy can read them.

tensorrt-stubs 10.13 has lines Python cannot parse, and mypy stops at the first ("Non-default argument
follows default argument"): a required parameter after defaulted ones (`add_scale_nd(…, power: Weights =
None, channel_axis: int)`) and parameters named after keywords (`get_workspace_size(self, in: …)`). Each
such `def` line gets the smallest change that parses (`channel_axis: int = ...`, `in_: …`); anything
else it cannot repair is an error, so a new stubs release with other faults is noticed. Used by
scripts/typecheck_trt.sh on its own venv only.

Usage: python scripts/lib/repair_stubs.py FILE.pyi...
"""

from __future__ import annotations

import ast
import keyword
import re
import sys

_PARAM_SPLIT = re.compile(r",\s*(?![^\[]*\])")  # commas outside [...] (list[int, str] stays whole)
_KEYWORD_PARAM = re.compile(r"(\(|,\s*)(" + "|".join(keyword.kwlist) + r")(\s*:)")


def _repair_line(line: str, msg: str) -> str:
    head, paren, tail = line.partition("(")
    params, arrow, rest = tail.rpartition(") ->")
    if not paren or not arrow:
        return line
    if "default" in msg:  # "non-default argument follows default argument" (wording varies by version)
        out, seen_default = [], False
        for p in _PARAM_SPLIT.split(params):
            if "=" in p:
                seen_default = True
            elif seen_default and ":" in p and not p.lstrip().startswith("*"):
                p += " = ..."
            out.append(p)
        params = ", ".join(out)
    else:
        params = _KEYWORD_PARAM.sub(r"\1\2_\3", "(" + params)[1:]
    return head + paren + params + arrow + rest


def repair(path: str) -> list[int]:
    """Rewrite `path` so it parses; the line numbers changed (empty when it already parsed)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    changed: list[int] = []
    while True:
        try:
            ast.parse("\n".join(lines), path)
            break
        except SyntaxError as e:
            i = (e.lineno or 1) - 1
            new = _repair_line(lines[i], e.msg)
            if new == lines[i] or len(changed) > 200:
                bad = lines[i].strip()[:120]
                raise SystemExit(f"{path}:{e.lineno}: cannot repair: {e.msg}: {bad}") from e
            lines[i] = new
            changed.append(i + 1)
    if changed:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return changed


if __name__ == "__main__":
    for p in sys.argv[1:]:
        fixed = repair(p)
        if fixed:
            print(f"repair_stubs: {p}: repaired lines {fixed}", file=sys.stderr)
