"""The micro-batching queue: what forms a batch, the bound, errors, and a clean stop."""

import asyncio
import threading

import pytest

from unicom_cli.serve.batcher import MicroBatcher, QueueFull


class Gate:
    """A batch function that records each batch and holds the first one until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list[int]) -> list[object]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(timeout=30)
        return [ValueError(f"odd {x}") if x % 2 else x * 10 for x in items]


async def _hold_first(batcher: MicroBatcher, gate: Gate, first: int) -> asyncio.Task:
    task = asyncio.create_task(batcher.submit(first))
    await asyncio.get_running_loop().run_in_executor(None, gate.started.wait)
    return task


async def _hold_and_queue(batcher: MicroBatcher, gate: Gate, first: int, others: tuple):
    """Start, submit ``first`` and hold it in the batch function, then queue ``others``."""
    await batcher.start()
    held = await _hold_first(batcher, gate, first)
    waiting = [asyncio.create_task(batcher.submit(x)) for x in others]
    await asyncio.sleep(0)  # every submit has queued its item
    return held, waiting


async def _held_then_released(batcher: MicroBatcher, gate: Gate, first: int, others: tuple) -> list:
    """``_hold_and_queue``, then release the batch function and collect every result."""
    held, waiting = await _hold_and_queue(batcher, gate, first, others)
    gate.release.set()
    results = await asyncio.gather(held, *waiting)
    await batcher.stop()
    return results


def test_requests_that_wait_are_embedded_together():
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=4, queue_size=10)
    results = asyncio.run(_held_then_released(batcher, gate, 0, (2, 4, 6, 8, 10, 12)))
    assert gate.batches == [[0], [2, 4, 6, 8], [10, 12]]  # the model was busy: the rest came in max_batch groups
    assert results == [0, 20, 40, 60, 80, 100, 120]
    assert (batcher.batches, batcher.items) == (3, 7)


def test_max_batch_one_turns_batching_off():
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=1, queue_size=10)
    assert asyncio.run(_held_then_released(batcher, gate, 0, (2, 4, 6))) == [0, 20, 40, 60]
    assert gate.batches == [[0], [2], [4], [6]]


def test_a_full_queue_refuses_instead_of_growing():
    async def main():
        gate = Gate()
        batcher = MicroBatcher(gate, max_batch=8, queue_size=3)
        first, queued = await _hold_and_queue(batcher, gate, 0, (2, 4, 6))
        with pytest.raises(QueueFull):
            await batcher.submit(8)
        gate.release.set()
        results = await asyncio.gather(first, *queued)
        after = await batcher.submit(8)  # room again once the queue drained
        await batcher.stop()
        return results, after

    results, after = asyncio.run(main())
    assert results == [0, 20, 40, 60]
    assert after == 80


def test_one_bad_item_fails_alone_and_a_crashing_batch_fails_every_caller():
    async def main():
        gate = Gate()
        gate.release.set()
        batcher = MicroBatcher(gate, max_batch=8, queue_size=8)
        await batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(x) for x in (2, 3, 4)), return_exceptions=True)
        await batcher.stop()

        def crash(items):
            raise RuntimeError("out of memory")

        broken = MicroBatcher(crash, max_batch=8, queue_size=8)
        await broken.start()
        crashed = await asyncio.gather(*(broken.submit(x) for x in (1, 2)), return_exceptions=True)
        still = await asyncio.gather(broken.submit(5), return_exceptions=True)  # the worker survived
        await broken.stop()
        return outcomes, crashed, still

    outcomes, crashed, still = asyncio.run(main())
    assert outcomes[0] == 20 and outcomes[2] == 40
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "odd 3"
    assert all(isinstance(c, RuntimeError) for c in crashed + still)


def test_stop_finishes_what_is_queued():
    async def main():
        gate = Gate()
        batcher = MicroBatcher(gate, max_batch=2, queue_size=8)
        first, queued = await _hold_and_queue(batcher, gate, 0, (2, 4, 6))
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0)
        gate.release.set()
        await stopping
        return await asyncio.gather(first, *queued)

    assert asyncio.run(main()) == [0, 20, 40, 60]


def test_the_queue_is_bounded_in_bytes_too():
    async def main():
        gate = Gate()
        batcher = MicroBatcher(gate, max_batch=8, queue_size=100, max_cost=1000)
        await batcher.start()
        first = await _hold_first(batcher, gate, 0)
        big = asyncio.create_task(batcher.submit(2, cost=1500))  # alone in the queue: accepted
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="1,500 of 1,000 bytes"):
            await batcher.submit(4, cost=1)
        gate.release.set()
        done = await asyncio.gather(first, big)
        small = await asyncio.gather(*(batcher.submit(x, cost=400) for x in (4, 6)))  # 800 fit
        await batcher.stop()
        return done + small

    assert asyncio.run(main()) == [0, 20, 40, 60]


def test_an_item_that_breaks_its_batch_fails_alone():
    """The batch function raises for a whole batch that holds one bad item (as a search over a
    non-finite vector does): the batch is retried item by item, so only that item's caller fails."""
    calls: list[list[int]] = []

    def strict(items: list[int]) -> list[int]:
        calls.append(list(items))
        if any(x < 0 for x in items):
            raise ValueError("a negative item")
        return [x * 10 for x in items]

    async def main():
        gate = Gate()
        first = MicroBatcher(lambda items: gate(items) and strict(items), max_batch=8, queue_size=8)
        await first.start()
        held = await _hold_first(first, gate, 0)
        waiting = [asyncio.create_task(first.submit(x)) for x in (2, -1, 4)]
        await asyncio.sleep(0)
        gate.release.set()
        results = await asyncio.gather(held, *waiting, return_exceptions=True)
        await first.stop()
        return results

    results = asyncio.run(main())
    assert results[0] == 0 and results[1] == 20 and results[3] == 40
    assert isinstance(results[2], ValueError)
    assert [2, -1, 4] in calls and [-1] in calls and [2] in calls and [4] in calls
