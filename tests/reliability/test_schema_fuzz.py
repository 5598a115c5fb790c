"""Schema-driven fuzzing (schemathesis) of every operation in the app's own OpenAPI document, in process
(ASGI) with the real runtime and the fake backend: no 500 ever; every error is JSON with a documented
code; 5xx only as documented 503/504. benchmarks/reliability_soak.py runs the same with more cases."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from reliability_helpers import write_fake_repo

from service.errors import ServiceError
from service.http.app import create_app
from service.settings import Settings


def _error_codes() -> dict[int, set[str]]:
    """(status → codes) of every ServiceError subclass: the API's codes (service/errors.py, docs/http.md)."""
    import service.http.app  # noqa: F401  (imports every module that defines errors)

    out: dict[int, set[str]] = {}
    todo = [ServiceError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        out.setdefault(cls.status, set()).add(cls.code)
    out[500].discard("internal_error")
    out[500].discard("engine_failure")  # the fake engine never fails here
    return out


ERROR_CODES = _error_codes()


def check_response(response: Any) -> None:
    """The service's contract for any request: no 500, errors are JSON with a documented code."""
    status = response.status_code
    assert status != 500, response.text
    if status < 400:
        return
    assert status in ERROR_CODES, (status, response.text)
    body = response.json()
    assert body["error"]["code"] in ERROR_CODES[status], body


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    repo = write_fake_repo(tmp_path_factory.mktemp("models"), tile=32, overlap=8, scale=2)
    app = create_app(
        Settings(model_repository=Path(repo), backend="fake", max_output_pixels=65_536, max_body_bytes=65_536)
    )
    st = app.state.gendr
    asyncio.run(st.start())  # what the lifespan does: requests may then be served without it
    assert st.ready
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    asyncio.run(st.close(5.0))


def fuzz(schema: Any, max_examples: int) -> dict[str, int]:
    """Run `max_examples` generated cases per operation through `check_response`; cases per operation."""
    from hypothesis import given

    tried: dict[str, int] = {}

    def runner(label: str, strategy: Any) -> Any:
        @given(case=strategy)
        @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            tried[label] += 1
            check_response(case.call())

        return run

    for result in schema.get_all_operations():
        op = result.ok()
        tried[op.label] = 0
        runner(op.label, op.as_strategy())()
    return tried


def test_every_operation_keeps_the_error_contract(api: Any) -> None:
    tried = fuzz(api, max_examples=40)
    assert "POST /v1/upscale" in tried and all(n > 0 for n in tried.values()), tried
