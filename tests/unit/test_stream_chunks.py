"""textgen.chunked: how decode steps are grouped into streamed items (no model, no Ray)."""
from __future__ import annotations

import time

from inference.textgen import chunked


def _steps(n: int, every_s: float, log: list):
    try:
        for i in range(n):
            time.sleep(every_s)
            yield i
    finally:
        log.append("closed")


def test_first_step_alone_then_one_item_per_interval():
    log: list = []
    items = list(chunked(_steps(40, 0.005, log), 0.05))
    assert [x for item in items for x in item] == list(range(40))  # nothing lost, order kept
    assert items[0] == [0]  # the first token is not held back
    assert len(items) <= 8 and max(len(item) for item in items) >= 5  # about 10 steps per 50 ms item
    assert log == ["closed"]


def test_zero_interval_is_one_item_per_step():
    assert list(chunked(_steps(5, 0.0, []), 0.0)) == [[0], [1], [2], [3], [4]]


def test_a_reader_that_stops_early_closes_the_steps():
    log: list = []
    items = chunked(_steps(1000, 0.001, log), 0.01)
    next(items), next(items)
    items.close()
    assert log == ["closed"]  # a batcher's generator frees the request's rows in its finally
