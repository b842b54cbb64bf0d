"""The resolved priority of the request the current task is serving, for the ForwardRequests it sends.

A context variable rather than a parameter: every hop (first call, failover, hedge, generation step)
is built in ``Pipeline._call``, and tasks it spawns copy the context, so the level travels with no
change to the pipeline's signatures.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("shardmesh_priority", default=0)
_fallback = [1]  # the router's default level (set by RouterCore): hops never carry 0


def set_default_level(level: int) -> None:
    _fallback[0] = max(1, level)


def current_priority() -> int:
    """The level set by :func:`hop_priority`, else the router's default level (never 0)."""
    return _PRIORITY.get() or _fallback[0]


@contextlib.contextmanager
def hop_priority(level: int) -> Iterator[None]:
    token = _PRIORITY.set(level)
    try:
        yield
    finally:
        _PRIORITY.reset(token)
