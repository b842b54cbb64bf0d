"""Holding a request that finds no route until coverage returns (``--route-wait-s``).

When the last replica of some layers leaves (a planned rebalance, a rolling restart, a worker that died),
planning raises UNAVAILABLE. Failing at once loses every request issued in the seconds until another worker
covers those layers again; instead the request waits, re-planning each time the topology changes (and on a
short poll), for at most ``--route-wait-s`` in total and never past its own deadline. Only UNAVAILABLE
(an outage: the layers were served, or their replicas are all excluded) waits; FAILED_PRECONDITION (spans or
checksums that can never form a route) is a configuration error and fails at once.

The decision (:class:`RouteWait`) is pure; :func:`plan_waiting` is the small loop around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.errors import Unavailable

log = logging.getLogger(__name__)

POLL_S = 0.5  # re-plan at least this often while waiting: exclusions (ejections, probes) change without an event
RESERVE_S = 0.5  # the wait ends this long before the request's deadline, so the client gets UNAVAILABLE and why
T = TypeVar("T")


@dataclass
class RouteWait:
    """One request's coverage wait: ``limit_s`` in total over the request, ending ``reserve_s`` before
    ``deadline`` (a wait that ran into the deadline would reach the client as DEADLINE_EXCEEDED, without the reason)."""

    limit_s: float
    deadline: float
    waited_s: float = 0.0  # spent so far, over every wait of this request
    poll_s: float = POLL_S
    reserve_s: float = RESERVE_S

    def next_wait(self, now: float, since: float) -> float:
        """Seconds to wait for a change before planning again, from the current wait that began at ``since``;
        0 = give up now (the wait budget or the deadline is spent)."""
        left = min(self.limit_s - self.waited_s - (now - since), self.deadline - self.reserve_s - now)
        return 0.0 if left <= 0 else min(self.poll_s, left)

    def finish(self, now: float, since: float) -> None:
        """Ends one wait that began at ``since`` (coverage returned, or the request gave up)."""
        self.waited_s += max(0.0, now - since)

    def explain(self, error: Unavailable) -> Unavailable:
        """The original error, saying how long this request waited for coverage."""
        if self.waited_s > 0:
            error.message = (f"{error.message}; waited {self.waited_s:.1f} s for coverage "
                             f"(--route-wait-s {self.limit_s:g}, or the request's deadline)")
        return error


async def plan_waiting(
    plan: Callable[[], T],
    wait: RouteWait | None,
    changed: Callable[[int, float], Awaitable[int]],
    version: Callable[[], int],
    *,
    on_change: Callable[[], Awaitable[None]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``plan()``; while it raises Unavailable, waits for a topology change (``changed(version, timeout)``)
    or the poll and plans again, within ``wait``'s budget. ``on_change`` runs before each re-plan (e.g. to
    forgive replicas that re-joined). Raises the last Unavailable, annotated, when the wait ends."""
    try:
        return plan()
    except Unavailable as first:
        if wait is None or wait.limit_s <= 0:
            raise
        error = first
    since = clock()
    seen = version()
    log.info("no route (%s); waiting up to %.1f s for coverage", error.message,
             max(0.0, min(wait.limit_s - wait.waited_s, wait.deadline - wait.reserve_s - since)))
    while True:
        timeout = wait.next_wait(clock(), since)
        if timeout <= 0:
            wait.finish(clock(), since)
            raise wait.explain(error) from None
        seen = await changed(seen, timeout)
        if on_change is not None:
            await on_change()
        try:
            result = plan()
        except Unavailable as again:
            error = again
            continue
        wait.finish(clock(), since)
        log.info("route found after waiting %.1f s for coverage", clock() - since)
        return result
