"""Fixtures of the reliability suite: the real app and runtime with the fake backend (no model, no
machine-speed dependence), in process for the input tests and as a real process for the protocol
and shutdown tests (reliability_helpers.start_server)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import write_fake_repo


@pytest.fixture(scope="session")
def fake_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture
def make_app(fake_repo: Path) -> Iterator[Callable[..., Any]]:
    """A started TestClient around create_app(Settings(backend="fake", ...)); `.app.state.gendr` is live."""
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.settings import Settings

    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        settings.setdefault("model_repository", fake_repo)
        settings.setdefault("backend", "fake")
        client = TestClient(create_app(Settings(**settings)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        for _ in range(500):
            if client.get("/readyz").status_code == 200:
                return client
            import time

            time.sleep(0.01)
        raise AssertionError("app never became ready")

    yield make
    for c in clients:
        c.__exit__(None, None, None)
