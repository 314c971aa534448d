"""serve_app.batching.GreedyBatcher: no wait when idle, everything that queued while busy goes next."""
import asyncio
import time

import pytest

from serve_app.batching import GreedyBatcher


class Model:
    """Records each batch; each run waits until the test opens the gate."""

    def __init__(self, gate: bool = True):
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        if gate:
            self.gate.set()
        self.running = 0
        self.most_running = 0

    async def run(self, items: list[int]) -> list:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await self.gate.wait()
        self.running -= 1
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


def test_lone_request_runs_at_once():
    async def main():
        model = Model()
        batcher = GreedyBatcher(model.run, max_batch_size=32)
        start = time.perf_counter()
        assert await batcher.submit(3) == 30
        return time.perf_counter() - start, model.batches

    elapsed, batches = asyncio.run(main())
    assert batches == [[3]]
    assert elapsed < 0.05


def test_without_a_size_limit_the_next_batch_takes_everything_waiting():
    """max_batch_size=None: a merger (an ingress merging requests into one call; the receiver decides batches)."""
    async def main():
        model = Model(gate=False)
        batcher = GreedyBatcher(model.run, max_batch_size=None)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 101)]
        await asyncio.sleep(0.01)
        model.gate.set()
        return await asyncio.gather(first, *rest), model.batches

    results, batches = asyncio.run(main())
    assert results == [i * 10 for i in range(101)]
    assert batches == [[0], list(range(1, 101))]


def test_requests_queued_while_busy_form_the_next_batches():
    async def main():
        model = Model(gate=False)
        batcher = GreedyBatcher(model.run, max_batch_size=4)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch is running, held at the gate
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.01)
        assert model.batches == [[0]]
        model.gate.set()
        return await asyncio.gather(first, *rest), model.batches, list(batcher.sizes)

    results, batches, sizes = asyncio.run(main())
    assert results == [i * 10 for i in range(11)]
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert sizes == [1, 4, 4, 2]


def test_an_item_error_fails_only_its_caller_and_a_batch_error_fails_all():
    async def main():
        model = Model(gate=False)
        batcher = GreedyBatcher(model.run, max_batch_size=8)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, -2, 3)]
        await asyncio.sleep(0)
        model.gate.set()
        per_item = await asyncio.gather(*tasks, return_exceptions=True)

        async def broken(items):
            raise RuntimeError("session failed")

        failing = GreedyBatcher(broken, max_batch_size=8)
        whole = await asyncio.gather(*(failing.submit(i) for i in range(3)), return_exceptions=True)
        return per_item, whole

    per_item, whole = asyncio.run(main())
    assert per_item[0] == 10 and per_item[2] == 30
    assert isinstance(per_item[1], ValueError) and str(per_item[1]) == "bad -2"
    assert all(isinstance(e, RuntimeError) and str(e) == "session failed" for e in whole)


def test_a_caller_that_gave_up_is_not_run():
    async def main():
        model = Model(gate=False)
        batcher = GreedyBatcher(model.run, max_batch_size=8)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(2), 0.01)  # times out while the model is busy
        third = asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0)
        model.gate.set()
        return await asyncio.gather(first, third), model.batches

    results, batches = asyncio.run(main())
    assert results == [10, 30]
    assert batches == [[1], [3]]


def test_in_flight_limit_and_wait():
    async def main():
        model = Model(gate=False)
        batcher = GreedyBatcher(model.run, max_batch_size=2, max_in_flight=2)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(6)]
        await asyncio.sleep(0.02)
        running_before = model.most_running
        model.gate.set()
        await asyncio.gather(*tasks)

        waiting = GreedyBatcher(Model().run, max_batch_size=8, wait_s=0.05)
        start = time.perf_counter()
        await waiting.submit(1)
        return running_before, time.perf_counter() - start

    running, waited = asyncio.run(main())
    assert running == 2  # two batches at once, not three
    assert waited >= 0.05


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        GreedyBatcher(Model().run, max_batch_size=0)


def test_weights_bound_a_batch_and_a_heavy_item_runs_alone():
    """With ``weight``, max_batch_size bounds the summed weight (an embedder's item is a group of requests)."""
    async def main():
        gate, batches = asyncio.Event(), []

        async def run(groups):
            batches.append([len(g) for g in groups])
            await gate.wait()
            return [sum(g) for g in groups]

        batcher = GreedyBatcher(run, max_batch_size=4, weight=len)
        first = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0.01)
        groups = [[2, 2], [3, 3, 3], [4], [5] * 5, [6]]
        rest = [asyncio.create_task(batcher.submit(g)) for g in groups]
        await asyncio.sleep(0.01)
        gate.set()
        return await asyncio.gather(first, *rest), batches, list(batcher.sizes)

    results, batches, sizes = asyncio.run(main())
    assert results == [1, 4, 9, 4, 25, 6]
    assert batches == [[1], [2], [3, 1], [5], [1]]  # 2 + 3 > 4; 3 + 1 = 4; 5 > 4 alone
    assert sizes == [1, 1, 2, 1, 1]  # items per batch
