"""Prometheus metrics of the scheduler (queue time per priority and tenant, refusals)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram

from router.scheduling.ticket import Ticket

QUEUE_SECONDS = Histogram(
    "shardmesh_queue_seconds",
    "Time a request (or generation step) waited in the router's scheduler queue",
    ["priority", "tenant", "kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REFUSED = Counter(
    "shardmesh_schedule_refused_total",
    "Requests the scheduler refused: full (queue size), timeout (queue timeout), deadline, cancelled",
    ["priority", "tenant", "reason"],
)
MAX_TENANT_LABELS = 64  # tenants from unauthenticated metadata must not grow the label set without bound
OTHER = "other"


class SchedulerMetrics:
    """The scheduler's observer: records each wait; tenants past the first 64 (not named in the
    weights) are labelled ``other``."""

    def __init__(self, known_tenants: Iterable[str] = ()) -> None:
        self._labels: set[str] = set(known_tenants)
        self._limit = len(self._labels) + MAX_TENANT_LABELS

    def tenant_label(self, tenant: str) -> str:
        if tenant in self._labels:
            return tenant
        if len(self._labels) < self._limit:
            self._labels.add(tenant)
            return tenant
        return OTHER

    def __call__(self, ticket: Ticket, waited_s: float, outcome: str) -> None:
        tenant = self.tenant_label(ticket.tenant)
        if outcome == "run":
            QUEUE_SECONDS.labels(priority=str(ticket.priority), tenant=tenant, kind=ticket.kind).observe(waited_s)
        else:
            REFUSED.labels(priority=str(ticket.priority), tenant=tenant, reason=outcome).inc()
