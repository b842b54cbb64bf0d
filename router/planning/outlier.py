"""Passive outlier detection: eject replicas that keep failing, as Envoy does.

Pure state over injected ``now`` values; the router records call results, asks which replicas are
eligible, and actively probes the ejected ones that :meth:`OutlierDetector.due_for_probe` lists.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from services.errors import ConfigError
from services.telemetry import EJECTIONS


@dataclass(frozen=True)
class OutlierConfig:
    """Ejection settings; defaults are Envoy's (see docs REFERENCE, "Load balancing and failure handling").

    consecutive_failures: failures (errors or timeouts) in a row that eject a replica (Envoy: 5).
    base_ejection_s: first ejection time; the n-th ejection lasts n x this (Envoy: 30 s).
    max_ejection_s: cap on one ejection (Envoy: 300 s).
    max_ejection_percent: most of a stage's replicas ejected at once; at least one may always be
        ejected (Envoy: 10 %).
    panic_threshold_percent: below this healthy share, a stage balances over all replicas, since
        ejecting most of a stage would overload the rest (Envoy: 50 %; 0 disables panic).
    readmit_on_expiry: True returns a replica to rotation as soon as its ejection time elapses
        (Envoy without active health checks); False (default) keeps it out until an active probe
        succeeds and the router calls :meth:`OutlierDetector.readmit`.
    """

    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 10.0
    panic_threshold_percent: float = 50.0
    readmit_on_expiry: bool = False

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ConfigError(f"outlier consecutive_failures={self.consecutive_failures}: must be >= 1")
        if self.base_ejection_s <= 0 or self.max_ejection_s < self.base_ejection_s:
            raise ConfigError(
                f"outlier ejection times base={self.base_ejection_s}s max={self.max_ejection_s}s: "
                "need 0 < base_ejection_s <= max_ejection_s"
            )
        for name in ("max_ejection_percent", "panic_threshold_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ConfigError(f"outlier {name}={value}: must be a percentage between 0 and 100")


class _ReplicaState:
    __slots__ = ("consecutive_failures", "times_ejected", "ejected_until", "healthy_since")

    def __init__(self) -> None:
        self.consecutive_failures = 0
        self.times_ejected = 0
        self.ejected_until: float | None = None  # None: in rotation
        self.healthy_since = 0.0  # for decaying times_ejected while the replica behaves


class OutlierDetector:
    """Tracks consecutive failures per worker and decides ejection, back-off and panic."""

    def __init__(self, config: OutlierConfig | None = None) -> None:
        self.config = config or OutlierConfig()
        self._states: dict[str, _ReplicaState] = {}

    def record_success(self, worker_id: str, now: float) -> None:
        """A call succeeded: the failure streak ends (an ejection still needs a probe to lift)."""
        state = self._states.get(worker_id)
        if state is not None:
            self._decay(state, now)
            state.consecutive_failures = 0

    def record_failure(self, worker_id: str, now: float, stage_replica_ids: Sequence[str]) -> bool:
        """Counts a failure or timeout; returns True when this failure ejected the worker.

        ``stage_replica_ids`` must be the stage's full membership (every worker that serves these
        layers), not the replicas a request could still use: the share is of the whole stage.
        Ejection is refused while ``max_ejection_percent`` of the stage (at least one replica) is
        already out, and when no other replica of the stage would be left in rotation, so no
        failure streak can empty a stage (a lone replica is never ejected).
        """
        state = self._states.setdefault(worker_id, _ReplicaState())
        self._decay(state, now)
        state.consecutive_failures += 1
        if state.ejected_until is not None or state.consecutive_failures < self.config.consecutive_failures:
            return False
        members = set(stage_replica_ids) | {worker_id}
        others_ejected = sum(1 for r in members if r != worker_id and self.is_ejected(r, now))
        allowed = max(1, int(len(members) * self.config.max_ejection_percent / 100.0))
        if others_ejected >= allowed or others_ejected >= len(members) - 1:
            return False
        self._eject(state, now)
        EJECTIONS.labels(worker=worker_id).inc()
        return True

    def record_probe_failure(self, worker_id: str, now: float) -> None:
        """An active probe of an ejected worker failed: eject it again for the next, longer period."""
        state = self._states.setdefault(worker_id, _ReplicaState())
        self._eject(state, now)
        EJECTIONS.labels(worker=worker_id).inc()

    def readmit(self, worker_id: str, now: float = 0.0) -> None:
        """An active health probe succeeded: return the worker to rotation with a clean streak."""
        state = self._states.get(worker_id)
        if state is not None:
            state.ejected_until = None
            state.consecutive_failures = 0
            state.healthy_since = now

    def forget(self, worker_id: str) -> None:
        """The worker left discovery; a new one with this id starts with a clean record."""
        self._states.pop(worker_id, None)

    def is_ejected(self, worker_id: str, now: float) -> bool:
        state = self._states.get(worker_id)
        if state is None or state.ejected_until is None:
            return False
        if self.config.readmit_on_expiry and now >= state.ejected_until:
            state.healthy_since = state.ejected_until
            state.ejected_until = None
            state.consecutive_failures = 0
            return False
        return True

    def ejected(self, now: float) -> frozenset[str]:
        """Every ejected worker, e.g. as the planner's ``excluded`` set."""
        return frozenset(w for w in list(self._states) if self.is_ejected(w, now))

    def eligible(self, replica_ids: Sequence[str], now: float) -> list[str]:
        """Replicas to balance over: the non-ejected ones, or all of them when the stage is in panic."""
        healthy = [r for r in replica_ids if not self.is_ejected(r, now)]
        if replica_ids and len(healthy) * 100.0 < self.config.panic_threshold_percent * len(replica_ids):
            return list(replica_ids)
        return healthy

    def excluded(self, stages: Iterable[Sequence[str]], failed: Collection[str], now: float) -> frozenset[str]:
        """Workers planning must avoid: ``failed`` (this request's own failures) plus ejected replicas.

        ``stages`` lists each span's full membership. A span in panic (too few healthy replicas, see
        :meth:`eligible`) keeps its ejected replicas routable, and when every replica a request could
        still use is ejected they stay routable too: ejection alone never removes a span's last replica.
        """
        failed = frozenset(failed)
        if not failed and all(s.ejected_until is None for s in self._states.values()):
            return failed  # the common case, on every request: nothing failed, nobody ejected
        out = set(failed)
        for members in stages:
            usable = [r for r in self.eligible(members, now) if r not in failed]
            if not usable:
                usable = [r for r in members if r not in failed]
            out.update(r for r in members if r not in usable)
        return frozenset(out)

    def due_for_probe(self, now: float) -> list[str]:
        """Ejected workers whose ejection time has elapsed: probe them, then readmit or re-eject."""
        return sorted(
            worker_id
            for worker_id, state in self._states.items()
            if state.ejected_until is not None and now >= state.ejected_until
        )

    def ejection_count(self, worker_id: str) -> int:
        state = self._states.get(worker_id)
        return 0 if state is None else state.times_ejected

    def _eject(self, state: _ReplicaState, now: float) -> None:
        state.times_ejected += 1
        duration = min(self.config.base_ejection_s * state.times_ejected, self.config.max_ejection_s)
        state.ejected_until = now + duration
        state.consecutive_failures = 0

    def _decay(self, state: _ReplicaState, now: float) -> None:
        """Each base_ejection_s spent in rotation forgives one past ejection, as Envoy's multiplier does."""
        if state.ejected_until is not None or state.times_ejected == 0:
            return
        steps = int(max(0.0, now - state.healthy_since) // self.config.base_ejection_s)
        if steps:
            state.times_ejected = max(0, state.times_ejected - steps)
            state.healthy_since += steps * self.config.base_ejection_s
