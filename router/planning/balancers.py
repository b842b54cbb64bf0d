"""The router's replica-choice policies (``--balancer``), each a pure choice over one stage's replicas.

Every policy reads this router's :class:`ReplicaStats` (outstanding requests, peak-EWMA latency) and,
for ``weighted``, the speed workers report; none modifies them. Ties go to a random candidate (the
router's seeded ``rng``), so idle replicas share the work instead of the first one taking it all.

- ``p2c`` (default): power of two choices over EWMA latency x (outstanding + 1), see balancer.py.
- ``round_robin``: replicas in turn, one rotation per stage (checksum and layer span).
- ``least_connections``: fewest requests outstanding from this router.
- ``least_response_time``: lowest expected time to finish if sent now, EWMA latency x (outstanding + 1),
  over every replica (as NGINX ``least_time`` and NetScaler's least response time combine latency and
  active connections: latency alone would send every concurrent request to the one fastest replica).
- ``weighted``: at random in proportion to measured capacity: the speed each worker reports
  (Capacity.speed) when known, else the inverse of its EWMA latency, else equal shares.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

from services.errors import ConfigError

from router.planning.balancer import ReplicaStats, choose_replica, eligible, neutral_latency
from router.planning.types import WorkerInfo

ROUND_ROBIN = "round_robin"
LEAST_CONNECTIONS = "least_connections"
LEAST_RESPONSE_TIME = "least_response_time"
P2C = "p2c"
WEIGHTED = "weighted"
POLICIES = (ROUND_ROBIN, LEAST_CONNECTIONS, LEAST_RESPONSE_TIME, P2C, WEIGHTED)
DEFAULT_POLICY = P2C

Stats = Mapping[str, ReplicaStats]
Policy = Callable[[Sequence[WorkerInfo], Stats, random.Random], WorkerInfo]


def _lowest(candidates: Sequence[WorkerInfo], score: Callable[[WorkerInfo], float], rng: random.Random) -> WorkerInfo:
    scores = [score(c) for c in candidates]
    best = min(scores)
    return rng.choice([c for c, s in zip(candidates, scores) if s == best])


def least_connections(candidates: Sequence[WorkerInfo], stats: Stats, rng: random.Random) -> WorkerInfo:
    """The replica with the fewest requests outstanding from this router; ties at random."""

    def outstanding(worker: WorkerInfo) -> float:
        s = stats.get(worker.worker_id)
        return float(s.outstanding) if s is not None else 0.0

    return _lowest(candidates, outstanding, rng)


def least_response_time(candidates: Sequence[WorkerInfo], stats: Stats, rng: random.Random) -> WorkerInfo:
    """The replica expected to finish a request sent now soonest: EWMA latency x (outstanding + 1).

    An unsampled replica is costed at the mean latency of the sampled ones (as in p2c), so it is tried
    soon but not flooded.
    """
    neutral = neutral_latency([stats.get(c.worker_id) for c in candidates])

    def expected(worker: WorkerInfo) -> float:
        s = stats.get(worker.worker_id)
        return s.cost(neutral) if s is not None else neutral

    return _lowest(candidates, expected, rng)


def capacity_weights(candidates: Sequence[WorkerInfo], stats: Stats) -> list[float]:
    """Each candidate's share for ``weighted``: reported speed, else 1 / EWMA latency, else equal.

    Speed wins when any candidate reports one (a replica that reports none gets the mean of those that
    do); otherwise measured latency stands in for capacity (an unsampled replica gets the mean rate).
    """
    speeds = [c.speed if math.isfinite(c.speed) and c.speed > 0 else 0.0 for c in candidates]
    known_speeds = [s for s in speeds if s > 0]
    if known_speeds:
        mean = sum(known_speeds) / len(known_speeds)
        return [s if s > 0 else mean for s in speeds]
    latencies = [
        s.latency_ewma_s if s is not None and s.latency_ewma_s is not None and s.latency_ewma_s > 0 else None
        for s in (stats.get(c.worker_id) for c in candidates)
    ]
    rates = [1.0 / latency for latency in latencies if latency is not None]
    if not rates:
        return [1.0] * len(candidates)
    mean_rate = sum(rates) / len(rates)
    return [1.0 / latency if latency is not None else mean_rate for latency in latencies]


def weighted(candidates: Sequence[WorkerInfo], stats: Stats, rng: random.Random) -> WorkerInfo:
    """A replica at random, in proportion to :func:`capacity_weights`."""
    return rng.choices(list(candidates), weights=capacity_weights(candidates, stats), k=1)[0]


class RoundRobin:
    """Replicas in turn; one rotation per stage (checksum and span), so stages do not share a counter."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, object], int] = {}

    def __call__(self, candidates: Sequence[WorkerInfo], stats: Stats, rng: random.Random) -> WorkerInfo:
        key = (candidates[0].checksum, candidates[0].span)
        turn = self._next.get(key, 0)
        self._next[key] = turn + 1
        return candidates[turn % len(candidates)]


def _p2c(candidates: Sequence[WorkerInfo], stats: Stats, rng: random.Random) -> WorkerInfo:
    return choose_replica(candidates, stats, rng)


class Balancer:
    """The router's chosen policy, applied wherever it picks a replica (route, hedge, generation, replay).

    Candidates are what planning left routable (failed and ejected workers already removed, panic
    spans keeping their ejected ones); ``exclude`` removes more, and an empty choice is UNAVAILABLE.
    """

    def __init__(self, policy: str = DEFAULT_POLICY) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"--balancer {policy!r}: unknown policy; choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self._choose: Policy = {
            ROUND_ROBIN: RoundRobin(),
            LEAST_CONNECTIONS: least_connections,
            LEAST_RESPONSE_TIME: least_response_time,
            P2C: _p2c,
            WEIGHTED: weighted,
        }[policy]

    def choose(
        self,
        replicas: Sequence[WorkerInfo],
        stats: Stats,
        rng: random.Random,
        exclude: frozenset[str] = frozenset(),
    ) -> WorkerInfo:
        candidates = eligible(replicas, exclude)
        if len(candidates) == 1:
            return candidates[0]
        return self._choose(candidates, stats, rng)
