"""Retry budget: retries may add at most a fixed share of load, plus a small floor (Linkerd/Finagle).

Per-request retry limits multiply under an outage (every request retries N times); a budget shared
by all requests caps the extra load instead, so retries cannot turn a brownout into a collapse.
"""

from __future__ import annotations

from collections import deque

from services.errors import ConfigError

_BUCKETS = 10
"""Time buckets per window: memory stays bounded whatever the request rate."""


class RetryBudget:
    """Allows a retry while ``retries <= ratio x requests + min_retries_per_s x window_s`` over the window.

    Call :meth:`record_request` once per original request (not per retry) and
    :meth:`try_acquire_retry` before each retry; a granted retry is counted at once.
    """

    def __init__(self, ratio: float = 0.2, min_retries_per_s: float = 10.0, window_s: float = 10.0) -> None:
        if ratio < 0 or min_retries_per_s < 0 or window_s <= 0:
            raise ConfigError(
                f"retry budget ratio={ratio} min_retries_per_s={min_retries_per_s} window_s={window_s}: "
                "need ratio >= 0, min_retries_per_s >= 0 and window_s > 0"
            )
        self.ratio = ratio
        self.min_retries_per_s = min_retries_per_s
        self.window_s = window_s
        self._bucket_s = window_s / _BUCKETS
        self._buckets: deque[list[int]] = deque()  # [bucket index, requests, retries], oldest first

    def record_request(self, now: float) -> None:
        self._bucket(now)[1] += 1

    def try_acquire_retry(self, now: float) -> bool:
        """True (and the retry is counted) when the budget has room for one more retry."""
        bucket = self._bucket(now)
        if self.available(now) < 1.0:
            return False
        bucket[2] += 1
        return True

    def available(self, now: float) -> float:
        """Retries still allowed in the current window (for metrics and tests)."""
        self._expire(now)
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        return self.ratio * requests + self.min_retries_per_s * self.window_s - retries

    def _bucket(self, now: float) -> list[int]:
        self._expire(now)
        index = int(now // self._bucket_s)
        if not self._buckets or self._buckets[-1][0] < index:
            self._buckets.append([index, 0, 0])
        return self._buckets[-1]

    def _expire(self, now: float) -> None:
        oldest_kept = int(now // self._bucket_s) - _BUCKETS + 1
        while self._buckets and self._buckets[0][0] < oldest_kept:
            self._buckets.popleft()
