"""Which tiles the next engine call runs: shortest remaining work first, with aging, one shape per call.

Kept apart from the batcher's threads so the policy is a pure function of the queue (and testable as
one). A request's priority is `submitted + AGING × remaining engine seconds` (its unqueued tiles × the
measured seconds per tile at its shape): the smallest goes first, so a one-tile request overtakes a
large one that arrived up to AGING × the large one's remaining work earlier, and waits for at most
the call that is running. Aging keeps large requests from starving: once one has waited AGING × its
remaining work, nothing new overtakes it. The batch is filled from the chosen request's lane (same
shape) in priority order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.scheduling.costs import CostTable
from service.scheduling.tickets import Ticket

#: Seconds of waiting that outweigh one second of remaining engine work (GENDR_SCHEDULING_WORK_WEIGHT).
#: 1 in the peer benchmark kept the overall p95 at the hand-written app's while small requests' p95 stayed
#: below it; 4 gave small requests about half that p95 again but large ones +30 % (docs/benchmarks.md).
AGING = 1.0

Entry = tuple[Ticket, list[int]]  # a ticket and the indices of its tiles in one batch


@dataclass(frozen=True)
class BatchChoice:
    shape: tuple[int, int]
    tickets: tuple[Ticket, ...]  # the lane, in priority order
    take: int  # tiles to run
    batch: int  # batch size to run them at (padded up to it)
    wait_s: float = 0.0  # > 0: wait this long for company first (nothing is taken)


def priority(t: Ticket, weight: float = AGING) -> float:
    return t.submitted + weight * t.unqueued * t.tile_cost_s


def next_batch_plan(
    queue: Sequence[Ticket],
    now: float,
    costs: CostTable | None,
    batch_sizes: tuple[int, ...],
    tiles: tuple[int, ...],
    max_delay_s: float,
    weight: float = AGING,
) -> BatchChoice:
    """The next call for a non-empty queue of tickets that still have unqueued tiles; `weight`: seconds
    of waiting one second of remaining work is worth (0: first come, first served)."""

    def key(t: Ticket) -> float:
        return priority(t, weight)

    head = min(queue, key=key)
    shape = head.shape
    h, w = shape
    if not (h == w and h in tiles):  # a dynamic shape: one request's one tile per call
        return BatchChoice(shape, (head,), 1, 1)
    lane = sorted((t for t in queue if t.shape == shape), key=key)
    avail = sum(t.unqueued for t in lane)
    top = batch_sizes[-1]
    if avail < top and max_delay_s > 0:
        wait = min(t.submitted for t in lane) + max_delay_s - now
        if wait > 0:
            return BatchChoice(shape, (), 0, 0, wait)
    n = min(avail, top)
    if costs is not None:
        k, b = costs.batch_for(h, w, n)
    else:
        k, b = n, next(b for b in batch_sizes if b >= n)
    return BatchChoice(shape, tuple(lane), k, b)


def take(queue: list[Ticket], choice: BatchChoice) -> tuple[list[Entry], int]:
    """Hand `choice.take` tiles to a batch: advance each ticket, drop fully queued ones from `queue`."""
    entries: list[Entry] = []
    n = 0
    for t in choice.tickets:
        if n >= choice.take:
            break
        k = min(choice.take - n, t.unqueued)
        entries.append((t, list(range(t.next, t.next + k))))
        t.next += k
        n += k
        if not t.unqueued:
            queue.remove(t)
    return entries, n
