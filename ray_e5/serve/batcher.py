"""The serving batcher: continuous batching for the embedding replica; whenever the model is free, it takes
everything queued. (A batcher of live requests, hence its name; the training batch plan is ``ray_e5.data.batching``.)

Ray Serve's ``@serve.batch`` forms a batch as soon as its wait timeout passes, even while the previous batch is still
computing; under load on a CPU replica that turns into a queue of tiny batches (about one request each) waiting
behind the semaphore. Here a batch is formed only when the model thread is free, from every request queued at that
moment (up to a token budget and a request cap), as TEI's and infinity's queues do. Requests are never split or
reordered inside a batch, and one failing forward fails only the requests in that batch.

Back-pressure (TEI's max_concurrent_requests, per replica): at most ``max_queued_requests`` requests and
``max_queued_tokens`` tokens wait for the model at once (the batch computing is not counted). A request beyond either
bound is refused at once with ``Overloaded`` (the app answers 429 with Retry-After) instead of joining a queue whose
wait grows without limit: an accepted request waits for at most the batch computing now plus the queue ahead of it.

A request that stops waiting (its timeout cancelled it, or the client left) costs no more compute: while queued it is
dropped when the next batch is formed, and a forward that takes an ``alive`` argument skips, between its
sub-batches, the texts of requests that are gone. Both are counted (``dropped_requests``, ``dropped_texts``).
"""

import asyncio
import inspect
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

# forward(items) or forward(items, alive): alive(i) is False once item i's request is gone; its vector may be None
Forward = Callable[..., list]


class Overloaded(Exception):
    """The replica's queue is full: the request was not queued; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class ContinuousBatcher:
    """Queue of token-id requests served by one model thread (``forward`` maps flat token lists to vectors)."""

    def __init__(self, forward: Forward, max_tokens: int, max_requests: int, wait_s: float = 0.0,
                 max_queued_requests: int | None = None, max_queued_tokens: int | None = None):
        self.forward = forward
        self.forward_takes_alive = "alive" in inspect.signature(forward).parameters
        self.dropped_requests = 0  # requests gone before their batch was formed: never computed
        self.dropped_texts = 0  # texts of requests gone while their batch computed: skipped between sub-batches
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.queued_tokens = 0
        self.peak_queued_requests = 0
        self.peak_queued_tokens = 0
        self.refused = 0
        self.batch_seconds = 0.0  # the last forward's duration: the wait a refused client is told to back off for
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
        size = sum(len(x) for x in ids)
        self._admit(size)
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._serve())
        future = loop.create_future()
        self.pending.append((ids, future))
        self.queued_tokens += size
        self.peak_queued_requests = max(self.peak_queued_requests, len(self.pending))
        self.peak_queued_tokens = max(self.peak_queued_tokens, self.queued_tokens)
        self.ready.set()
        return await future

    def _admit(self, size: int) -> None:
        """Refuse a request that would push the queue past either bound (a lone request is always admitted)."""
        if self.max_queued_requests is not None and len(self.pending) >= self.max_queued_requests:
            self.refused += 1
            raise Overloaded(f"{len(self.pending)} requests are queued on this replica; the limit is "
                             f"{self.max_queued_requests}", self.retry_after_s())
        if self.max_queued_tokens is not None and self.pending and self.queued_tokens + size > self.max_queued_tokens:
            self.refused += 1
            raise Overloaded(f"{self.queued_tokens} tokens are queued on this replica and this request adds {size}; "
                             f"the limit is {self.max_queued_tokens}", self.retry_after_s())

    def retry_after_s(self) -> float:
        """About how long until the queue has room: the batch computing now, at least 50 ms."""
        return max(0.05, self.batch_seconds)

    def stats(self) -> dict[str, int | None]:
        return {"queued_requests": len(self.pending), "queued_tokens": self.queued_tokens,
                "peak_queued_requests": self.peak_queued_requests, "peak_queued_tokens": self.peak_queued_tokens,
                "max_queued_requests": self.max_queued_requests, "max_queued_tokens": self.max_queued_tokens,
                "refused": self.refused, "dropped_requests": self.dropped_requests,
                "dropped_texts": self.dropped_texts}

    def _take(self) -> list[tuple[list[list[int]], asyncio.Future]]:
        """The next batch: queued requests in arrival order while the token budget and request cap hold."""
        batch, tokens = [], 0
        while self.pending and len(batch) < self.max_requests:
            ids, future = self.pending[0]
            size = sum(len(x) for x in ids)
            if batch and tokens + size > self.max_tokens:
                break
            self.pending.popleft()
            self.queued_tokens -= size
            if future.done():  # timed out (cancelled) or the client went away while queued: never computed
                self.dropped_requests += 1
            else:
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
                began = time.monotonic()
                try:
                    if self.forward_takes_alive:
                        owners = [future for ids, future in batch for _ in ids]
                        # read from the model thread: a future's done flag only ever turns on
                        call = lambda: self.forward(flat, alive=lambda i: not owners[i].done())  # noqa: E731
                    else:
                        call = lambda: self.forward(flat)  # noqa: E731
                    vectors = await loop.run_in_executor(self.executor, call)
                except Exception as err:  # noqa: BLE001 - handed to the requests of this batch only
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                finally:
                    self.batch_seconds = time.monotonic() - began
                self.dropped_texts += sum(1 for v in vectors if v is None)
                start = 0
                for ids, future in batch:
                    if not future.done():
                        try:
                            rows = vectors[start:start + len(ids)]
                            if len(rows) != len(ids):
                                raise RuntimeError(f"forward returned {len(vectors)} vectors for {len(flat)} texts")
                            future.set_result(np.stack(rows))
                        except Exception as err:  # noqa: BLE001 - a bad result fails its request, not the worker
                            future.set_exception(err)
                    start += len(ids)
