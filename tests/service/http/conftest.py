"""Fixtures for the HTTP tests (helpers live in http_helpers.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from http_helpers import FakeModelRuntime, FakeRuntime


@pytest.fixture
def fake_runtime() -> FakeRuntime:
    return FakeRuntime(FakeModelRuntime("tiny"), FakeModelRuntime("other", native_scale=2))


@pytest.fixture
def make_client() -> Iterator[Callable[..., Any]]:
    """Build a TestClient around create_app(settings, runtime); waits until /readyz unless told not to."""
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.settings import Settings

    clients: list[TestClient] = []

    def make(
        runtime: Any = None, *, wait_ready: bool = True, raise_server_exceptions: bool = True, **settings: Any
    ):
        runtime = runtime if runtime is not None else FakeRuntime()
        settings.setdefault("model_repository", "/nonexistent")
        app = create_app(Settings(**settings), runtime=runtime)
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
