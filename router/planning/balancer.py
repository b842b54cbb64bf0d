"""Replica choice within a stage: power of two choices over a peak-EWMA latency x load cost.

Two random candidates and the cheaper one wins (Envoy least-request, Finagle/Linkerd peak EWMA):
nearly as good as checking every replica, without herding all routers onto the same "best" one.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping, Sequence

from services.errors import Unavailable

from router.planning.types import WorkerInfo

DEFAULT_LATENCY_S = 0.05
"""Cost basis for a replica with no latency sample when no other candidate has one either."""
DEFAULT_DECAY_S = 10.0
"""Time constant of the latency EWMA: an old sample weighs 1/e after this many seconds."""
DEFAULT_WINDOW = 64
"""Recent latencies kept for :meth:`ReplicaStats.p95_estimate` (bounded ring)."""


class ReplicaStats:
    """Load and latency of one replica as seen by this router (mutable; one per worker)."""

    def __init__(self, *, decay_s: float = DEFAULT_DECAY_S, window: int = DEFAULT_WINDOW) -> None:
        self.decay_s = decay_s
        self.outstanding = 0
        self.latency_ewma_s: float | None = None
        self._last_observed = 0.0
        self._recent: deque[float] = deque(maxlen=window)

    def start(self) -> None:
        """A request was sent to this replica."""
        self.outstanding += 1

    def finish(self) -> None:
        """A request to this replica ended (success, failure or cancellation alike)."""
        self.outstanding = max(0, self.outstanding - 1)

    def observe(self, latency_s: float, now: float) -> None:
        """Adds a latency sample: a slower sample is taken at once (peak), a faster one decays in.

        Reacting to spikes immediately but forgetting them over ``decay_s`` is what keeps traffic
        away from a replica that just started to stall, before its average has caught up.
        """
        latency_s = max(0.0, latency_s)
        self._recent.append(latency_s)
        if self.latency_ewma_s is None or latency_s > self.latency_ewma_s:
            self.latency_ewma_s = latency_s
        else:
            weight = math.exp(-max(0.0, now - self._last_observed) / self.decay_s)
            self.latency_ewma_s = self.latency_ewma_s * weight + latency_s * (1.0 - weight)
        self._last_observed = now

    def cost(self, default_latency_s: float = DEFAULT_LATENCY_S) -> float:
        latency = self.latency_ewma_s if self.latency_ewma_s is not None else default_latency_s
        return (self.outstanding + 1) * latency

    def p95_estimate(self) -> float | None:
        """95th percentile (nearest rank) of recent latencies, for hedging delays; None before any sample."""
        if not self._recent:
            return None
        ordered = sorted(self._recent)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def eligible(replicas: Sequence[WorkerInfo], exclude: frozenset[str] = frozenset()) -> list[WorkerInfo]:
    """``replicas`` without ``exclude``; Unavailable naming the stage when nothing is left to choose from."""
    candidates = [r for r in replicas if r.worker_id not in exclude]
    if not candidates:
        spans = sorted({str(r.span) for r in replicas}) or ["?"]
        raise Unavailable(
            f"no replica left for layers {', '.join(spans)}: all {len(replicas)} are excluded "
            f"({', '.join(sorted(r.worker_id for r in replicas)) or 'none known'}); retry after one recovers"
        )
    return candidates


def neutral_latency(stats: Sequence[ReplicaStats | None]) -> float:
    """Mean EWMA latency of the sampled replicas among ``stats`` (DEFAULT_LATENCY_S when none is sampled):
    the latency assumed for an unsampled replica, so a new worker neither attracts a flood nor starves."""
    known = [s.latency_ewma_s for s in stats if s is not None and s.latency_ewma_s is not None]
    return sum(known) / len(known) if known else DEFAULT_LATENCY_S


def choose_replica(
    replicas: Sequence[WorkerInfo],
    stats: Mapping[str, ReplicaStats],
    rng: random.Random,
    exclude: frozenset[str] = frozenset(),
) -> WorkerInfo:
    """Picks a replica by power of two choices; ``stats`` is read, never modified.

    A replica without latency samples is costed at the mean latency of the sampled candidates, so
    new workers neither attract a flood (cost 0) nor starve (huge cost).
    """
    candidates = eligible(replicas, exclude)
    if len(candidates) == 1:
        return candidates[0]
    first, second = rng.sample(candidates, 2)
    neutral = neutral_latency([stats.get(first.worker_id), stats.get(second.worker_id)])
    first_cost = _cost(stats.get(first.worker_id), neutral)
    second_cost = _cost(stats.get(second.worker_id), neutral)
    return first if first_cost <= second_cost else second


def _cost(stats: ReplicaStats | None, neutral_latency_s: float) -> float:
    return neutral_latency_s if stats is None else stats.cost(neutral_latency_s)
