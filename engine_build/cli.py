"""`gendr-build`: the export stage and the PyTorch reference tools.

Each subcommand lives beside the code it drives; a module listed in COMMAND_MODULES exposes
`register(subparsers)` that adds its parser(s) and sets `func` (args → exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from engine_build.errors import BuildError

COMMAND_MODULES = [
    "engine_build.commands.reference",  # make-tiny, upscale
    "engine_build.commands.export",  # export, verify
    "engine_build.commands.quantize",  # quantize
    "engine_build.commands.engine",  # engine
    "engine_build.commands.sr.cli",  # default, import-sr
    "engine_build.commands.storage",  # push, pull
]
# Commands that must run where only the `storage` extra is installed (the serving image's init
# container: no torch, no Pillow needed): for these only their own module is imported.
LIGHT_COMMANDS = {"push": "engine_build.commands.storage", "pull": "engine_build.commands.storage"}


def build_parser(modules: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gendr-build", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES if modules is None else modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # subcommand not shipped in this build
                continue
            raise
        module.register(sub)
    return parser


def _light_modules(argv: list[str]) -> list[str] | None:
    """The one module a light command needs (the first word that is not an option), else None: all."""
    command = next((a for a in argv if not a.startswith("-")), None)
    return [LIGHT_COMMANDS[command]] if command in LIGHT_COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_light_modules(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except BuildError as e:  # every build error, one line on stderr, exit 2 (commands need not catch)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
