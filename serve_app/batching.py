"""Greedy dynamic batching: nobody waits for company while the model is idle; while it is busy,
requests pile up and the next batch takes all of them.

Ray Serve's ``@serve.batch`` forms the next batch as soon as the previous one has been formed, before it
has run, so with a short wait it sends many small batches to a busy model, and with a long wait it delays
a lone request (BENCHMARKS.md, "Served embeddings on one GPU"). Here a batch is formed only when a run slot
is free, which is what Triton's dynamic batcher does with no queue delay.
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GreedyBatcher(Generic[T, R]):
    """``await submit(item)`` returns ``run_batch(items)[i]`` for that item.

    ``run_batch`` gets at most ``max_batch_size`` items and returns one result per item, in order; a result
    that is an exception is raised to that item's caller alone, and an exception raised by ``run_batch``
    goes to every caller in the batch. At most ``max_in_flight`` batches run at once. ``wait_s`` > 0
    holds a batch that is not full for up to that long, once a slot is free. ``weight(item)`` is what an item
    counts against ``max_batch_size`` (1 each by default); a batch always takes at least one item.
    ``max_batch_size=None``: every waiting item (a merger whose receiver decides the batches).
    ``metrics`` (serve_app.http.metrics.Metrics, set by whoever holds the model): each batch's size and its
    items' queue waits, labelled ``name``.
    """

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[Sequence[Any]]], max_batch_size: int | None,
                 wait_s: float = 0.0, max_in_flight: int = 1, weight: Callable[[T], int] | None = None):
        if (max_batch_size is not None and max_batch_size < 1) or max_in_flight < 1 or wait_s < 0:
            raise ValueError("max_batch_size and max_in_flight must be >= 1, wait_s >= 0")
        self.run_batch, self.max_batch_size, self.wait_s = run_batch, max_batch_size, wait_s
        self.max_in_flight, self.weight = max_in_flight, weight
        self.sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self._queue: collections.deque[tuple[T, asyncio.Future, float]] = collections.deque()
        self.metrics, self.name = None, ""
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()

    async def submit(self, item: T) -> R:
        if self._worker is None or self._worker.done():
            self._arrived, self._slots = asyncio.Event(), asyncio.Semaphore(self.max_in_flight)
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, time.perf_counter()))
        self._arrived.set()
        return await future

    def configure(self, user_config: dict[str, Any]) -> None:
        """``max_batch_size`` and ``batch_wait_timeout_s`` from a deployment's user_config, where given."""
        if "max_batch_size" in user_config:
            self.max_batch_size = int(user_config["max_batch_size"])
        if "batch_wait_timeout_s" in user_config:
            self.wait_s = float(user_config["batch_wait_timeout_s"])

    async def submit_groups(self, requests: Sequence[T]) -> list:
        """Requests merged by a caller, as items of at most ``max_batch_size`` requests each (one future and one
        wake-up per item, not per request); for a batcher whose items are lists of requests (``weight=len``)
        and whose ``run_batch`` answers each item with one result per request. Results in request order."""
        size = self.max_batch_size
        items = [list(requests[i : i + size]) for i in range(0, len(requests), size)]
        results = await asyncio.gather(*(self.submit(item) for item in items))
        return [result for item in results for result in item]

    def _queued(self) -> int:
        return sum(self.weight(item) for item, *_ in self._queue) if self.weight else len(self._queue)

    def _take(self) -> list[tuple[T, asyncio.Future]]:
        batch, total, limit, waits, now = [], 0, self.max_batch_size, [], time.perf_counter()
        while self._queue and (limit is None or total < limit):
            item, future, queued_at = self._queue[0]
            size = self.weight(item) if self.weight else 1
            if batch and limit is not None and total + size > limit:
                break
            self._queue.popleft()
            if not future.done():  # a caller that gave up (timeout, disconnect) is dropped here
                batch.append((item, future))
                total += size
                waits.append(now - queued_at)
        if not self._queue:
            self._arrived.clear()
        if batch and self.metrics is not None:
            self.metrics.batch(self.name, total, waits)
        return batch

    async def _loop(self) -> None:
        while True:
            await self._arrived.wait()
            await self._slots.acquire()  # requests keep arriving while every slot is busy
            if self.wait_s and (self.max_batch_size is None or self._queued() < self.max_batch_size):
                await asyncio.sleep(self.wait_s)
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            self.sizes.append(len(batch))
            try:
                results = await self.run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - every caller of this batch gets it
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._slots.release()


def rows_per_request(outputs, groups: Sequence[Sequence[Sequence[Any]]]) -> list[list]:
    """A run's output rows (one per prepared item, the groups' requests' items in order) split back: per group,
    one slice of rows per request."""
    lengths = [len(request) for group in groups for request in group]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    slices = iter(outputs[bounds[i] : bounds[i + 1]] for i in range(len(lengths)))
    return [[next(slices) for _ in group] for group in groups]
