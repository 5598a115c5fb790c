"""The runtime as the HTTP layer sees it (docs/runtime-api.md), as typed Protocols — like vLLM's
`EngineClient`: routes depend on this contract, not on the runtime's classes, so the HTTP layer can be
read (and tested) against the contract alone. `service.runtime.Runtime` and `ModelRuntime` implement it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from service.backends.base import BackendInfo
    from service.pixels.pipeline import RequestPlan
    from service.requests import UpscaleJob, UpscaleOutcome
    from service.scheduling.batcher import TileBatcher
    from service.scheduling.tickets import Reservation


class ModelClient(Protocol):
    """One served model."""

    name: str
    batcher: TileBatcher  # the job API reads its measured tiles/s for ETAs

    @property
    def info(self) -> BackendInfo: ...

    @property
    def default_color_fix(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def healthy(self) -> bool: ...

    def plan(self, in_h: int, in_w: int, out_h: int, out_w: int) -> RequestPlan:
        """Cost in tiles from header sizes alone (BadRequest / ImageTooLarge)."""

    def reserve(self, plan: RequestPlan) -> Reservation:
        """Admission of the plan's tile units, before decoding (Overloaded / Draining / NotReady, with
        Retry-After); the reservation carries the plan, so upscale() does not compute it again."""

    async def upscale(self, job: UpscaleJob, reservation: Reservation) -> UpscaleOutcome:
        """Run the job; always releases the reservation."""

    def describe(self) -> dict[str, object]: ...


class RuntimeClient(Protocol):
    """Every served model, and the process-wide lifecycle (start, drain, close)."""

    models: Mapping[str, ModelClient]

    def get(self, name: str | None) -> ModelClient:
        """The named model, or the default (ModelNotFound)."""

    @property
    def ready(self) -> bool: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    async def start(self) -> None: ...

    async def drain(self, timeout_s: float) -> bool: ...

    async def close(self) -> None: ...
