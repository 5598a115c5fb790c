"""The README stays true: its settings table is the one the code generates, its commands exist."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_settings_table_matches_code() -> None:
    from service.settings import settings_table

    assert settings_table() in (ROOT / "README.md").read_text(), (
        "README settings table is stale: paste the output of "
        "`python -c 'from service.settings import settings_table; print(settings_table())'`"
    )


def test_readme_commands_are_the_ci_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/run.sh" in readme and "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "scripts" / "run.sh").is_file()


def test_readme_lists_every_gendr_build_command() -> None:
    from engine_build.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    readme = (ROOT / "README.md").read_text()
    for name in sub.choices:
        assert f"`{name}" in readme, f"gendr-build {name} is missing from the README CLI table"


def test_docs_links_exist() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link
