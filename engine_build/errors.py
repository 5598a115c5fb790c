"""The one base of every error the build tools report to a user: a step that cannot run here or failed,
said in one line. `gendr-build` maps it to exit code 2 in one place (engine_build/cli.py)."""

from __future__ import annotations


class BuildError(Exception):
    """A build step that cannot run (missing input, tool or GPU) or failed; the message is for the user."""
