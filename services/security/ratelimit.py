"""Token buckets per tenant. Pure: the caller passes the time, so tests need no clock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # tokens added per second
    burst: float  # capacity
    tokens: float
    updated: float

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class TenantRateLimiter:
    """One bucket per tenant; a tenant whose limit changed (token file reload) gets a fresh bucket."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, tenant: str, rate: float, burst: float | None, now: float) -> bool:
        """``rate`` <= 0 means no limit. ``burst`` defaults to one second's worth (at least 1)."""
        if rate <= 0:
            return True
        capacity = burst if burst else max(1.0, rate)
        bucket = self._buckets.get(tenant)
        if bucket is None or bucket.rate != rate or bucket.burst != capacity:
            bucket = self._buckets[tenant] = TokenBucket(rate, capacity, capacity, now)
        return bucket.take(now)
