"""The scripted server of tests/gendr_client/stub_server.py as a fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from stub_server import Stub, serve


@pytest.fixture
def stub() -> Iterator[Stub]:
    with serve() as s:
        yield s
