"""Micro-batching: requests that arrive while the model is busy are embedded together.

One worker thread runs the batch function; the event loop only queues work and hands back
results. There is no waiting window: a request that finds the model idle runs at once (no
added latency for one client), and everything that queued up meanwhile forms the next batch.
The queue is bounded in items and, optionally, in a cost such as bytes, so a flood of
requests is refused instead of growing memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(Exception):
    """The queue is at ``queue_size`` items or ``max_cost`` (the service answers 503)."""


class MicroBatcher(Generic[Item, Result]):
    """Runs ``fn(items) -> results`` (same length and order) on batches of submitted items.

    ``fn`` may return an Exception in place of one item's result; that item's caller gets it
    raised and the others are unaffected. ``max_batch=1`` turns batching off (one item per
    call), which is the baseline the load benchmark compares against.
    """

    def __init__(self, fn: Callable[[list[Item]], Sequence[Result | BaseException]], *,
                 max_batch: int = 32, queue_size: int = 64, max_cost: int | None = None) -> None:
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be at least 1")
        self.fn = fn
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.max_cost = max_cost
        self._cost = 0  # of the items waiting
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0  # calls of fn so far
        self.items = 0  # items through fn so far

    async def start(self) -> None:
        """Start the worker (call from the event loop that will submit)."""
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unicom-batch")
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker and its thread."""
        if self._worker is None:
            return
        await self._queue.put(None)  # the stop mark, after everything already queued
        await self._worker
        self._executor.shutdown(wait=True)
        self._worker = None

    async def submit(self, item: Item, cost: int = 0) -> Result:
        """Queue one item and wait for its result.

        Raises:
            QueueFull: when ``queue_size`` items are already waiting, or when ``cost`` would
                take the waiting items past ``max_cost`` (an item alone is always accepted).
        """
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self.max_cost is not None and self._cost and self._cost + cost > self.max_cost:
            raise QueueFull(f"the waiting requests hold {self._cost:,} of {self.max_cost:,} bytes")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future, cost))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.queue_size} requests are already waiting") from None
        self._cost += cost
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._cost -= sum(cost for _, _, cost in batch)
            # A caller that went away (client disconnected) no longer needs its item computed.
            batch = [(item, fut) for item, fut, _ in batch if not fut.done()]
            if batch:
                await self._process(loop, batch)

    async def _process(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Item, Any]]) -> None:
        items = [item for item, _ in batch]
        results = await self._call(loop, items)
        if len(items) > 1 and isinstance(results[0], Exception) and all(r is results[0] for r in results):
            # The whole batch failed: one item may be at fault. Each alone, so only its caller fails.
            results = [(await self._call(loop, [item]))[0] for item in items]
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _call(self, loop: asyncio.AbstractEventLoop, items: list[Item]) -> list:
        """``fn(items)`` in the worker thread; an exception becomes every item's result."""
        try:
            results = await loop.run_in_executor(self._executor, self.fn, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:  # noqa: BLE001 - handed to the waiting callers
            results = [exc] * len(items)
        self.batches += 1
        self.items += len(items)
        return list(results)
