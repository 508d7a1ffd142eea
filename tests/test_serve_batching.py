"""ContinuousBatcher: requests queued while the model is busy share the next forward, within budget and in order."""

import asyncio
import threading

import numpy as np
import pytest

from ray_e5.serve.batcher import ContinuousBatcher


class GatedForward:
    """A model stand-in whose forward blocks until released; it records each batch and maps ids to [first id]."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        self.fail_on = fail_on

    def __call__(self, flat: list[list[int]]) -> list[np.ndarray]:
        self.batches.append(flat)
        self.started.set()
        self.gate.wait(timeout=10)
        if self.fail_on is not None and any(x[0] == self.fail_on for x in flat):
            raise RuntimeError("forward failed")
        return [np.array([float(x[0])]) for x in flat]


async def wait_started(forward: GatedForward) -> None:
    await asyncio.to_thread(forward.started.wait, 10)
    forward.started.clear()


def request(first: int, texts: int = 1, length: int = 4) -> list[list[int]]:
    return [[first + i] + [0] * (length - 1) for i in range(texts)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_requests_queued_behind_a_busy_model_share_one_batch_in_order():
    async def main():
        forward = GatedForward()
        batcher = ContinuousBatcher(forward, max_tokens=10_000, max_requests=64)
        first = asyncio.ensure_future(batcher.embed(request(1000)))
        await wait_started(forward)  # the model is now busy with the first request
        queued = [asyncio.ensure_future(batcher.embed(request(100 * k, texts=k))) for k in range(1, 6)]
        await asyncio.sleep(0.05)
        forward.gate.set()
        results = await asyncio.gather(first, *queued)
        return forward.batches, results

    batches, results = run(main())
    assert len(batches) == 2, [len(b) for b in batches]
    assert [x[0] for x in batches[1]] == [100 * k + i for k in range(1, 6) for i in range(k)]
    assert results[0].tolist() == [[1000.0]]
    for k, vectors in enumerate(results[1:], start=1):  # each request gets back exactly its own rows
        assert vectors.shape == (k, 1)
        assert vectors[:, 0].tolist() == [100.0 * k + i for i in range(k)]


@pytest.mark.parametrize("max_tokens, max_requests, expected_sizes", [
    (12, 64, [3, 3, 2]),  # 4 tokens a request: three fit in 12
    (10_000, 2, [2, 2, 2, 2]),  # the request cap
    (3, 64, [1] * 8),  # a request larger than the budget still runs, alone
])
def test_token_budget_and_request_cap_bound_each_batch(max_tokens, max_requests, expected_sizes):
    async def main():
        forward = GatedForward()
        batcher = ContinuousBatcher(forward, max_tokens=max_tokens, max_requests=max_requests)
        blocker = asyncio.ensure_future(batcher.embed(request(9999)))
        await wait_started(forward)
        queued = [asyncio.ensure_future(batcher.embed(request(k))) for k in range(8)]
        await asyncio.sleep(0.05)
        forward.gate.set()
        results = await asyncio.gather(blocker, *queued)
        return forward.batches[1:], results[1:]

    batches, results = run(main())
    assert [len(b) for b in batches] == expected_sizes
    assert [r[0, 0] for r in results] == list(range(8))


def test_a_failing_forward_fails_only_its_own_batch():
    async def main():
        forward = GatedForward(fail_on=7)
        batcher = ContinuousBatcher(forward, max_tokens=8, max_requests=64)
        blocker = asyncio.ensure_future(batcher.embed(request(9999)))
        await wait_started(forward)
        doomed = [asyncio.ensure_future(batcher.embed(request(k))) for k in (6, 7)]  # one batch of 8 tokens
        survivor = asyncio.ensure_future(batcher.embed(request(8)))  # over budget: the next batch
        await asyncio.sleep(0.05)
        forward.gate.set()
        outcomes = await asyncio.gather(blocker, *doomed, survivor, return_exceptions=True)
        after = await batcher.embed(request(5))  # the batcher keeps serving
        return outcomes, after

    outcomes, after = run(main())
    assert isinstance(outcomes[1], RuntimeError) and isinstance(outcomes[2], RuntimeError)
    assert outcomes[3].tolist() == [[8.0]]
    assert after.tolist() == [[5.0]]


def test_requests_cancelled_while_queued_never_reach_the_model():
    async def main():
        forward = GatedForward()
        batcher = ContinuousBatcher(forward, max_tokens=10_000, max_requests=64)
        blocker = asyncio.ensure_future(batcher.embed(request(9999)))
        await wait_started(forward)
        gone = asyncio.ensure_future(batcher.embed(request(1)))
        timed_out = asyncio.ensure_future(asyncio.wait_for(batcher.embed(request(3)), 0.005))  # as the app's timeout
        kept = asyncio.ensure_future(batcher.embed(request(2)))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnected
        await asyncio.sleep(0.01)
        assert timed_out.done() and isinstance(timed_out.exception(), asyncio.TimeoutError)
        forward.gate.set()
        await blocker
        return forward.batches, await kept, batcher.stats()

    batches, kept, stats = run(main())
    assert [[x[0] for x in b] for b in batches] == [[9999], [2]]
    assert kept.tolist() == [[2.0]]
    assert stats["dropped_requests"] == 2  # counted: the cancelled one and the timed-out one


@pytest.mark.parametrize("wait_s, batches_expected", [(0.2, 1), (0.0, 5)])
def test_an_idle_model_waits_briefly_so_near_simultaneous_arrivals_share_the_first_batch(wait_s, batches_expected):
    async def main():
        forward = GatedForward()
        forward.gate.set()
        batcher = ContinuousBatcher(forward, max_tokens=10_000, max_requests=64, wait_s=wait_s)

        async def arrive(k):
            await asyncio.sleep(0.01 * k)  # arrivals 10 ms apart
            return await batcher.embed(request(k))

        await asyncio.gather(*(arrive(k) for k in range(5)))
        return forward.batches

    batches = run(main())
    assert len(batches) == batches_expected
    assert sorted(x[0] for b in batches for x in b) == list(range(5))


def test_queue_bounds_refuse_at_once_and_admit_again_when_drained():
    """Past max_queued_requests (or max_queued_tokens) a request is refused with Overloaded, never queued; the batch
    computing does not count; once the queue drains, requests are admitted again."""
    from ray_e5.serve.batcher import Overloaded

    async def main():
        forward = GatedForward()
        batcher = ContinuousBatcher(forward, max_tokens=10_000, max_requests=64, max_queued_requests=3,
                                    max_queued_tokens=20)
        computing = asyncio.ensure_future(batcher.embed(request(1)))
        await wait_started(forward)
        queued = [asyncio.ensure_future(batcher.embed(request(10 * k))) for k in range(1, 4)]  # 3 x 4 tokens
        await asyncio.sleep(0)
        refused = []
        for ids in (request(99), ):  # a 4th queued request: over the request bound
            try:
                await batcher.embed(ids)
            except Overloaded as err:
                refused.append(err)
        batcher.max_queued_requests = 10
        try:
            await batcher.embed(request(77, length=10))  # 12 + 10 tokens > 20: over the token bound
        except Overloaded as err:
            refused.append(err)
        stats = batcher.stats()
        forward.gate.set()
        await asyncio.gather(computing, *queued)
        again = await batcher.embed(request(5))
        return refused, stats, again

    refused, stats, again = run(main())
    assert len(refused) == 2 and all(err.retry_after_s > 0 for err in refused)
    assert "requests are queued" in refused[0].message and "tokens are queued" in refused[1].message
    assert stats["peak_queued_requests"] == 3 and stats["queued_tokens"] == 12 and stats["refused"] == 2
    assert again.tolist() == [[5.0]]
