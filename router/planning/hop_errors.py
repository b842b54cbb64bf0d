"""What a failed hop means: fail over or not, the worker's fault or not, a lost generation session or not.

Pure classification of the errors a hop raises (services/errors.py), so the direct, relay, hedged
and generation paths all decide the same way (Envoy's retry-on and consecutive-5xx rules).
"""

from __future__ import annotations

import re

from services.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    ShardmeshError,
    Unavailable,
)

DEADLINE_SLACK_S = 0.1
"""A DEADLINE_EXCEEDED with less than this left of the request's own deadline is the request's
timeout, not the worker's fault (covers the 50 ms each hop keeps back for its caller)."""

_POSITION = re.compile(r"\bposition\b", re.IGNORECASE)


def is_server_fault(exc: BaseException) -> bool:
    """INTERNAL or UNKNOWN from a worker: a bug or a broken replica, never the caller's mistake."""
    return type(exc) is ShardmeshError


def may_fail_over(exc: BaseException) -> bool:
    """Another replica may succeed: unreachable, timed out, overloaded, or a server fault."""
    return isinstance(exc, (Unavailable, DeadlineExceeded, ResourceExhausted)) or is_server_fault(exc)


def counts_against_worker(exc: BaseException, request_remaining_s: float) -> bool:
    """Whether a hop failure is an outlier failure of its worker (consecutive errors lead to ejection).

    Not counted: overload (RESOURCE_EXHAUSTED is back-pressure, not breakage), a cancelled call, and a
    timeout when the request's own deadline (the client's timeout) is what ran out.
    """
    if isinstance(exc, (ResourceExhausted, Cancelled)):
        return False
    if isinstance(exc, DeadlineExceeded):
        return request_remaining_s >= DEADLINE_SLACK_S
    return isinstance(exc, Unavailable) or is_server_fault(exc)


def is_lost_session(exc: BaseException) -> bool:
    """The worker no longer holds the session as the router left it (restarted: NOT_FOUND; a position
    refusal: FAILED_PRECONDITION naming the position): replay on a fresh session, the worker is fine."""
    if isinstance(exc, NotFound):
        return True
    return isinstance(exc, FailedPrecondition) and bool(_POSITION.search(exc.message))
