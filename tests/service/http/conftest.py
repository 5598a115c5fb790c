"""Fixtures for the HTTP tests (helpers live in http_helpers.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from http_helpers import fake_app, write_http_repo


@pytest.fixture(scope="session")
def http_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest-only models `tiny` (GenDR kind, ×4) and `other` (×2) for the real runtime + fake backend."""
    return write_http_repo(tmp_path_factory.mktemp("http-models"))


@pytest.fixture
def make_client(http_repo: Path) -> Iterator[Callable[..., Any]]:
    """Build a TestClient around create_app over the real runtime (fake backend) with these settings.

    `behaviour` (FakeBehaviour) and `backend` (a FakeBackend class) steer the engine; the runtime is
    `client.app.state.gendr.runtime`. Waits until /readyz unless told not to.
    """
    from fastapi.testclient import TestClient

    clients: list[TestClient] = []

    def make(*, wait_ready: bool = True, raise_server_exceptions: bool = True, **kw: Any) -> TestClient:
        app = fake_app(http_repo, **kw)
        client = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        clients.append(client)
        if wait_ready:
            end = time.monotonic() + 10
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < end, "app never became ready"
                time.sleep(0.01)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)
