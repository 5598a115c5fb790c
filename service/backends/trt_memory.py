"""How many TensorRT instances a GPU holds, from memory measured while loading (cudaMemGetInfo).

A plan is matched to a GPU by compute capability and TensorRT version; a plan built on an L20 also loads
on an L4 or L40S (same sm_89) with very different memory. So the memory a model really takes here is
measured: the plans' weights (free memory before vs after deserialising) and one instance (its
contexts' shared activation block and I/O buffers). The asked instances must fit what is left with
headroom, or the backend is unavailable (an environmental failure: the runtime falls back, and says
why); `GENDR_INSTANCES_PER_DEVICE=auto` takes as many as fit, at most MAX_AUTO_INSTANCES.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.backends.base import BackendUnavailable
from service.backends.cuda_rt import CudaRuntime

HEADROOM = 0.10  # of the free memory left after one instance: other processes, fragmentation, CUDA graphs
MAX_AUTO_INSTANCES = 8  # past a few contexts a GPU gains nothing; each costs memory and a worker


@dataclass(frozen=True)
class Fit:
    instances: int
    per_instance: int  # bytes one instance took
    weights: int  # bytes the plans took
    note: str


def free_memory(cuda: CudaRuntime) -> int:
    free, _total = cuda("cudaMemGetInfo")
    return int(free)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def fit_instances(
    free_at_start: int, free_with_plans: int, free_with_one: int, asked: int, auto: bool
) -> Fit:
    """From free memory before the plans, after them, and after the first instance → how many fit."""
    weights = max(0, free_at_start - free_with_plans)
    per = max(1, free_with_plans - free_with_one)
    usable = int(free_with_one * (1.0 - HEADROOM))
    more = usable // per
    if auto:
        n = max(1, min(MAX_AUTO_INSTANCES, 1 + more))
    else:
        n = asked
        if asked - 1 > more:
            raise BackendUnavailable(
                f"{asked} instances need {_mib(weights + asked * per)} of GPU memory (plans {_mib(weights)}, "
                f"{_mib(per)} each), {_mib(free_at_start)} was free; lower GENDR_INSTANCES_PER_DEVICE or "
                "set it to auto"
            )
    note = f"{n} instance(s) × {_mib(per)} + plans {_mib(weights)} fit in {_mib(free_at_start)} free"
    return Fit(n, per, weights, note)
