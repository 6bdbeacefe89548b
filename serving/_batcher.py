"""Micro-batching for the HTTP server: concurrent requests share one retriever call.

Requests are queued in a bounded ``asyncio.Queue``; one worker takes the first waiting request,
then keeps taking more until the batch holds ``max_batch`` users or ``max_wait_s`` has passed
since the first was taken, runs ``process(payloads)`` once for the whole batch in a thread
(the event loop stays responsive while JAX computes) and hands every request its own result.

A request larger than what is left of a batch waits for the next one (it is never split or
dropped); a request larger than ``max_batch`` on its own forms a batch by itself.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

log = logging.getLogger("serving.server")


class QueueFullError(RuntimeError):
    """The request queue is full: the server is overloaded; retry later (HTTP 503)."""


class ShuttingDownError(RuntimeError):
    """The server stopped before this request was served (HTTP 503)."""


@dataclasses.dataclass
class _Job:
    payload: Any
    size: int
    future: asyncio.Future


class Batcher:
    """Bounded queue + one batching worker.

    Args:
      process: ``process(payloads: list) -> list`` (same length), run in ``executor``; an
        entry that is an ``Exception`` instance is raised to that request's caller. If
        ``process`` itself raises, every request of the batch gets the exception.
      max_batch: users per batch (sum of the ``size`` of the requests taken together).
      max_wait_s: how long the worker waits for more requests after taking the first.
      queue_size: requests that may wait; one more gets :class:`QueueFullError`.
      on_batch: optional ``on_batch(num_requests, num_users, seconds)`` after each batch.
    """

    def __init__(self, process: Callable[[list], Sequence], *, max_batch: int,
                 max_wait_s: float, queue_size: int, executor: Executor,
                 on_batch: Callable[[int, int, float], None] | None = None):
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch and queue_size must be >= 1 and max_wait_s >= 0; got "
                             f"{max_batch}, {queue_size}, {max_wait_s}")
        self.process = process
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.queue_size = int(queue_size)
        self.executor = executor
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: _Job | None = None
        self._task: asyncio.Task | None = None

    # --- lifecycle (inside the server's event loop) -------------------------------------------
    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    async def stop(self) -> None:
        """Stops the worker; requests still waiting get :class:`ShuttingDownError`."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        pending = [self._carry] if self._carry else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("the server is shutting down"))

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a running batch)."""
        q = 0 if self._queue is None else self._queue.qsize()
        return q + (self._carry is not None)

    # --- requests -----------------------------------------------------------------------------
    async def submit(self, payload: Any, size: int) -> Any:
        """Queues one request of ``size`` users and waits for its result.

        Raises:
          QueueFullError: ``queue_size`` requests are already waiting.
        """
        if self._queue is None or self._task is None or self._task.done():
            raise ShuttingDownError("the batching worker is not running")
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(payload, int(size), fut))
        except asyncio.QueueFull:
            raise QueueFullError(f"the request queue is full ({self.queue_size} waiting): "
                                 "the server is overloaded, retry later") from None
        return await fut

    # --- the worker ---------------------------------------------------------------------------
    async def _collect(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, n = [first], first.size
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if n + job.size > self.max_batch:
                self._carry = job                      # first in the next batch
                break
            batch.append(job)
            n += job.size
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [j for j in batch if not j.future.done()]       # skip cancelled callers
            if not live:
                continue
            t0 = loop.time()
            try:
                results = await loop.run_in_executor(self.executor, self.process,
                                                     [j.payload for j in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch processing returned {len(results)} results "
                                       f"for {len(live)} requests")
            except asyncio.CancelledError:
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(ShuttingDownError("the server is shutting down"))
                raise
            except Exception as e:  # noqa: BLE001 - handed to every caller, worker keeps going
                log.exception("batch of %d requests failed", len(live))
                results = [e] * len(live)
            for j, r in zip(live, results):
                if j.future.done():
                    continue
                if isinstance(r, BaseException):
                    j.future.set_exception(r)
                else:
                    j.future.set_result(r)
            if self.on_batch is not None:
                try:
                    self.on_batch(len(live), sum(j.size for j in live), loop.time() - t0)
                except Exception:  # noqa: BLE001
                    log.exception("on_batch hook failed")
