"""Scheduling: shortest remaining work with aging, one shape per call. Pure: tickets are written by the test
with the times and costs it chooses."""

from __future__ import annotations

import numpy as np

from service.scheduling.lanes import AGING, next_batch_plan, take
from service.scheduling.tickets import Ticket

SIZES = (1, 2, 4, 8)


def ticket(
    i: int, n_tiles: int, submitted: float, shape: tuple[int, int] = (128, 128), cost: float = 0.01
) -> Ticket:
    src = np.zeros((8, 8, 3), np.uint8)
    t = Ticket(i, src, ((0, 0),) * n_tiles, shape, 1e9, submitted, lambda i, x: None, submitted=submitted)
    t.tile_cost_s = cost
    return t


def test_a_one_tile_request_overtakes_every_large_one_queued_before_it() -> None:
    queue = [ticket(i, 81, submitted=0.001 * i) for i in range(16)]  # 16 large requests
    tiny = ticket(99, 1, submitted=0.1)
    queue.append(tiny)
    choice = next_batch_plan(queue, 0.1, None, SIZES, (128,), 0.0)
    assert choice.tickets[0] is tiny and choice.take == 8
    entries, n = take(queue, choice)
    assert entries[0] == (tiny, [0]) and n == 8 and tiny not in queue  # the rest of the batch: large tiles


def test_aging_a_large_request_that_waited_long_goes_first() -> None:
    big = ticket(1, 10, submitted=0.0)  # 10 tiles × 10 ms = 0.1 s of work
    late_tiny = ticket(2, 1, submitted=AGING * 0.1 + 0.01)
    choice = next_batch_plan([big, late_tiny], late_tiny.submitted, None, SIZES, (128,), 0.0)
    assert choice.tickets[0] is big
    early_tiny = ticket(3, 1, submitted=AGING * 0.1 - 0.05)
    choice = next_batch_plan([big, early_tiny], early_tiny.submitted, None, SIZES, (128,), 0.0)
    assert choice.tickets[0] is early_tiny


def test_a_call_holds_one_shape_and_dynamic_shapes_run_alone() -> None:
    small = [ticket(i, 1, submitted=0.0, shape=(64, 64), cost=0.001) for i in range(3)]
    big = ticket(9, 4, submitted=0.0, shape=(128, 128), cost=0.01)
    choice = next_batch_plan([big, *small], 0.0, None, SIZES, (64, 128), 0.0)
    assert choice.shape == (64, 64) and set(choice.tickets) == set(small) and choice.take == 3
    assert choice.batch == 4  # padded to the next size the engine runs
    whole = ticket(5, 1, submitted=0.0, shape=(1000, 752), cost=0.001)
    choice = next_batch_plan([big, whole], 0.0, None, SIZES, (64, 128), 0.0)
    assert choice.tickets == (whole,) and (choice.take, choice.batch) == (1, 1)


def test_a_partial_batch_waits_for_company_only_up_to_the_delay() -> None:
    t = ticket(1, 2, submitted=1.0)
    choice = next_batch_plan([t], 1.001, None, SIZES, (128,), 0.005)
    assert choice.take == 0 and 0.0039 < choice.wait_s <= 0.004 + 1e-9
    choice = next_batch_plan([t], 1.006, None, SIZES, (128,), 0.005)
    assert (choice.take, choice.batch) == (2, 2)
