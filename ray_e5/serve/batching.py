"""Continuous batching for the embedding replica: whenever the model is free, it takes everything queued.

Ray Serve's ``@serve.batch`` forms a batch as soon as its wait timeout passes, even while the previous batch is still
computing; under load on a CPU replica that turns into a queue of tiny batches (about one request each) waiting
behind the semaphore. Here a batch is formed only when the model thread is free, from every request queued at that
moment (up to a token budget and a request cap), as TEI's and infinity's queues do. Requests are never split or
reordered inside a batch, and one failing forward fails only the requests in that batch.
"""

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

Forward = Callable[[list[list[int]]], list[np.ndarray]]


class ContinuousBatcher:
    """Queue of token-id requests served by one model thread (``forward`` maps flat token lists to vectors)."""

    def __init__(self, forward: Forward, max_tokens: int, max_requests: int, wait_s: float = 0.0):
        self.forward = forward
        self.max_tokens = max_tokens
        self.max_requests = max_requests
        self.wait_s = wait_s
        self.pending: deque[tuple[list[list[int]], asyncio.Future]] = deque()
        self.ready = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-e5-forward")
        self.worker: asyncio.Task | None = None

    async def embed(self, ids: list[list[int]]) -> np.ndarray:
        """Vectors for one request's texts, computed in a batch with whatever else is queued."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._serve())
        future = loop.create_future()
        self.pending.append((ids, future))
        self.ready.set()
        return await future

    def _take(self) -> list[tuple[list[list[int]], asyncio.Future]]:
        """The next batch: queued requests in arrival order while the token budget and request cap hold."""
        batch, tokens = [], 0
        while self.pending and len(batch) < self.max_requests:
            ids, future = self.pending[0]
            size = sum(len(x) for x in ids)
            if batch and tokens + size > self.max_tokens:
                break
            self.pending.popleft()
            if not future.cancelled():  # the client went away while queued
                batch.append((ids, future))
                tokens += size
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.ready.wait()
            self.ready.clear()
            if self.wait_s:  # the model was idle: give concurrent arrivals a moment to join the first batch
                deadline = time.monotonic() + self.wait_s
                while time.monotonic() < deadline and sum(len(ids) for ids, _ in self.pending) < self.max_tokens:
                    await asyncio.sleep(min(0.001, self.wait_s))
            while self.pending:
                batch = self._take()
                if not batch:
                    continue
                flat = [x for ids, _ in batch for x in ids]
                try:
                    vectors = await loop.run_in_executor(self.executor, self.forward, flat)
                except Exception as err:  # noqa: BLE001 - handed to the requests of this batch only
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                start = 0
                for ids, future in batch:
                    if not future.done():
                        future.set_result(np.stack(vectors[start:start + len(ids)]))
                    start += len(ids)
