"""The docs name only what the code has: every error code, `X-` header, metric and `GENDR_` setting a doc
mentions is found in the code, and every error code the code can send is in docs/http.md. Drift (a
renamed metric, a removed setting, an undocumented code) fails here instead of misleading a user."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ("service", "engine_build", "gendr_client", "benchmarks", "scripts", "k8s", "deploy", ".ci")


def _doc_text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def _code_text() -> str:
    parts = []
    for d in CODE_DIRS:
        for p in (ROOT / d).rglob("*"):
            if p.is_file() and p.suffix in {
                ".py",
                ".sh",
                ".yaml",
                ".yml",
                ".js",
                ".html",
                ".toml",
                ".json",
                "",
            }:
                try:
                    parts.append(p.read_text())
                except UnicodeDecodeError:
                    continue
    parts += [(ROOT / n).read_text() for n in ("Dockerfile", "docker-compose.yml", "pyproject.toml")]
    return "\n".join(parts)


def error_codes_in_code() -> set[str]:
    """`code = "..."` of every ServiceError subclass, and error codes written as `"code": "..."`."""
    codes: set[str] = set()
    for p in (ROOT / "service").rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Tuple):
                        names = [
                            t.id for t in getattr(stmt.targets[0], "elts", []) if isinstance(t, ast.Name)
                        ]
                        if names == ["status", "code"]:
                            codes.add(ast.literal_eval(stmt.value.elts[1]))
                    elif isinstance(stmt, ast.AnnAssign | ast.Assign):
                        target = stmt.target if isinstance(stmt, ast.AnnAssign) else stmt.targets[0]
                        if getattr(target, "id", None) == "code" and isinstance(stmt.value, ast.Constant):
                            codes.add(stmt.value.value)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):  # err.code = "…"
                if any(isinstance(t, ast.Attribute) and t.attr == "code" for t in node.targets):
                    codes.add(node.value.value)
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "code" and isinstance(v, ast.Constant):
                        codes.add(v.value)
    return {c for c in codes if isinstance(c, str)}


def documented_codes() -> set[str]:
    """The codes in docs/http.md's error table (rows `| status | \\`code\\` … |`)."""
    text = (ROOT / "docs" / "http.md").read_text()
    out: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"\|\s*(?:\d{3}|\dxx|job)\s*\|(.*?)\|", line)
        if m:
            out.update(re.findall(r"`([a-z_]+)`", m.group(1)))
    return out


def test_every_error_code_the_code_sends_is_documented() -> None:
    missing = error_codes_in_code() - documented_codes()
    assert not missing, f"docs/http.md's error table lacks {sorted(missing)}"


def test_every_documented_error_code_exists() -> None:
    stale = documented_codes() - error_codes_in_code()
    assert not stale, f"docs/http.md lists codes the code never sends: {sorted(stale)}"


def test_every_metric_the_docs_name_exists() -> None:
    metrics_py = (ROOT / "service" / "metrics.py").read_text()
    defined = set(re.findall(r'"(gendr_[a-z0-9_]+)"', metrics_py))
    named = set(re.findall(r"\b(gendr_[a-z0-9_]+)", _doc_text()))
    suffixes = ("_total", "_bucket", "_count", "_sum", "_created")
    stale = set()
    for n in named:
        base = next(
            (n.removesuffix(s) for s in suffixes if n.endswith(s) and n.removesuffix(s) in defined), n
        )
        if base not in defined and not n.startswith(("gendr_serve", "gendr_client", "gendr_build")):
            stale.add(n)
    # names that are not metrics: Python packages, folders, consumer groups and keys
    stale -= {n for n in stale if re.search(rf"\b{n}\b", _code_text()) and not n.endswith(suffixes)}
    assert not stale, f"the docs name metrics that service/metrics.py does not define: {sorted(stale)}"


def test_every_setting_the_docs_name_exists() -> None:
    from service.settings import CONFIG_FILE_ENV, Settings

    fields = {f"GENDR_{n.upper()}" for n in Settings.model_fields} | {CONFIG_FILE_ENV}
    named = set(re.findall(r"\b(GENDR_[A-Z0-9_]+[A-Z0-9])", _doc_text()))
    code = _code_text()
    stale = {n for n in named if n not in fields and n not in code}
    assert not stale, f"the docs name settings or variables the code does not read: {sorted(stale)}"


def test_every_header_the_docs_name_is_sent_or_read() -> None:
    named = set(re.findall(r"\b(X-[A-Z][A-Za-z-]*[a-z])\b", _doc_text()))
    code = _code_text().lower()
    stale = {h for h in named if h.lower() not in code}
    assert not stale, f"the docs name headers the code neither sends nor reads: {sorted(stale)}"


def test_the_checks_catch_drift() -> None:
    """The extractors see real entries (a check that finds nothing passes for the wrong reason)."""
    assert {"job_not_found", "rate_limited", "job_store_unavailable", "http_error"} <= error_codes_in_code()
    assert {"job_not_found", "bad_request"} <= documented_codes()
    assert "X-Request-Id" in set(re.findall(r"\b(X-[A-Z][A-Za-z-]*[a-z])\b", _doc_text()))
