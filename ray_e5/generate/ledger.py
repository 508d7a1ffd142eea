"""One ledger per run, shared by every generator actor (a Ray actor): client-side requests- and tokens-per-minute
limits, and the budget cap.

Limits are token buckets refilled continuously at ``limit / 60`` per second with about one second of burst, so
a pool of actors never sends a minute's quota at once (hosted APIs enforce their per-minute limits over shorter
windows too). A request reserves its worst-case cost (estimated prompt tokens + ``max_tokens`` at the model's price)
before it is sent and settles the real cost from the usage the server reports, so concurrent requests can never
together overshoot the budget: once the next request might, the ledger says no and the run stops asking.
"""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    def __init__(self, per_minute: float, burst_s: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` may be taken (an amount above the capacity waits for a full bucket)."""
        self._refill()
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount  # may go negative: a big request is paid back before the next one goes

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class Ledger:
    """Use as ``ray.remote(Ledger)``; every method is async so that waiting requests do not block the others."""

    def __init__(self, requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
                 budget_usd: float | None = None, price: tuple[float, float] | None = None,
                 spent_usd: float = 0.0):
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self.budget, self.price = budget_usd, price or (0.0, 0.0)
        self.spent, self.reserved = spent_usd, 0.0
        self.granted = self.refused = 0
        self.lock = asyncio.Lock()

    def worst_cost(self, prompt_tokens: int, max_tokens: int) -> float:
        return (prompt_tokens * self.price[0] + max_tokens * self.price[1]) / 1e6

    async def acquire(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Wait for the rate limits; False (and nothing reserved) when the request could exceed the budget."""
        cost = self.worst_cost(prompt_tokens, max_tokens)
        if self.budget is not None and self.spent + self.reserved + cost > self.budget * (1 + 1e-9):
            self.refused += 1
            return False
        self.reserved += cost
        async with self.lock:  # first come, first served
            while True:
                wait = max(self.requests.wait_s(1) if self.requests else 0.0,
                           self.tokens.wait_s(prompt_tokens + max_tokens) if self.tokens else 0.0)
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self.requests:
                self.requests.take(1)
            if self.tokens:
                self.tokens.take(prompt_tokens + max_tokens)
        self.granted += 1
        return True

    async def settle(self, prompt_estimate: int, max_tokens: int, prompt_tokens: int, completion_tokens: int) -> None:
        """Replace a granted request's reservation with what it really used."""
        self.reserved = max(0.0, self.reserved - self.worst_cost(prompt_estimate, max_tokens))
        self.spent += (prompt_tokens * self.price[0] + completion_tokens * self.price[1]) / 1e6
        if self.tokens:
            self.tokens.give(prompt_estimate + max_tokens - prompt_tokens - completion_tokens)

    async def state(self) -> dict:
        return {"spent_usd": self.spent, "reserved_usd": self.reserved, "granted": self.granted,
                "refused": self.refused}
