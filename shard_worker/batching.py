"""Dynamic batching on a worker: which queued requests run together, and in what order. Pure: no torch, no I/O.

The engine keeps its stateless requests in one list of :class:`Pending` entries; when the compute thread
frees it asks :func:`select_batch` which ones to run next. The rules, as Triton's dynamic batcher has them:

* Order: ``ForwardRequest.priority`` (1 = highest, larger = lower, 0 = unset -> :data:`DEFAULT_PRIORITY`),
  then the earliest deadline (requests without one last), then arrival. The first entry in that order
  (the head) always runs next, alone if nothing fits with it.
* Compatibility: only entries with the same ``key`` (the engine's key: same stage input dtype and hidden
  size) run together; ``key=None`` (an opaque job, e.g. a session's prefill) always runs alone.
* Size: at most ``max_batch_size`` sequences (rows) in one forward, and at most ``max_batch_tokens``
  padded tokens (rows x longest length), the same limit that bounds one request. A head larger than
  either still runs alone: it was admitted under ``--max-batch-tokens`` on its own.
* Padding bound: a batch only mixes sequence lengths where the longest is at most
  ``max(shortest + PAD_SLACK_TOKENS, shortest * (1 + PAD_RATIO))`` tokens, so every row carries at most
  25 % padding, or 8 tokens for short inputs, where padding costs less than a separate forward.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# Worker-side level of a request that carries no priority (the router resolves it, so only direct
# callers send 0): the level below the highest, so explicitly urgent requests (1) still go first.
DEFAULT_PRIORITY = 2
PAD_RATIO = 0.25
PAD_SLACK_TOKENS = 8


@dataclass
class Pending(Generic[T]):
    """One queued request as the batcher sees it; ``payload`` is the engine's own record."""

    key: Hashable | None  # requests with equal keys may share a forward; None = always alone
    rows: int  # sequences in the request (its batch dimension)
    length: int  # tokens per sequence
    priority: int  # 1 = highest; 0 = unset
    deadline: float | None  # monotonic instant, None = none
    seq: int  # arrival number: the last tie-breaker
    enqueued: float  # monotonic instant it was queued (for --max-queue-delay-us)
    payload: T = field(repr=False)


def effective_priority(priority: int) -> int:
    return priority if priority > 0 else DEFAULT_PRIORITY


def order_key(item: Pending[T]) -> tuple[int, float, int]:
    """Sort key: priority level, then remaining deadline (none = last), then arrival."""
    return (effective_priority(item.priority), math.inf if item.deadline is None else item.deadline, item.seq)


def lengths_compatible(shortest: int, longest: int) -> bool:
    """Whether sequences of ``shortest`` and ``longest`` tokens may be padded into one batch."""
    return longest <= max(shortest + PAD_SLACK_TOKENS, math.floor(shortest * (1 + PAD_RATIO)))


def select_batch(queue: Sequence[Pending[T]], *, max_batch_size: int, max_batch_tokens: int) -> list[int]:
    """Indices into ``queue`` of the requests to run next, head first, the rest in order; [] if empty.

    Greedy in queue order: each next compatible request joins if the batch stays within the size,
    token and padding bounds; one that does not fit is skipped, not waited for (it heads a later batch).
    """
    if not queue:
        return []
    ranked = sorted(range(len(queue)), key=lambda i: order_key(queue[i]))
    head = queue[ranked[0]]
    chosen = [ranked[0]]
    if head.key is None or max_batch_size <= 1:
        return chosen
    rows, shortest, longest = head.rows, head.length, head.length
    for index in ranked[1:]:
        item = queue[index]
        if item.key != head.key:
            continue
        new_rows = rows + item.rows
        low, high = min(shortest, item.length), max(longest, item.length)
        if new_rows > max_batch_size or new_rows * high > max_batch_tokens or not lengths_compatible(low, high):
            continue
        chosen.append(index)
        rows, shortest, longest = new_rows, low, high
        if rows == max_batch_size:
            break
    return chosen


def batch_is_full(queue: Sequence[Pending[T]], chosen: Sequence[int], max_batch_size: int) -> bool:
    """Whether the chosen batch needs no more requests (so no reason to wait --max-queue-delay-us)."""
    if not chosen:
        return True
    head = queue[chosen[0]]
    return head.key is None or sum(queue[i].rows for i in chosen) >= max_batch_size


def wait_for_more_s(head: Pending[T], now: float, max_queue_delay_s: float) -> float:
    """Seconds the head may still wait for batch-mates (0 = run now): its queue delay budget, and never
    past its own deadline."""
    remaining = head.enqueued + max_queue_delay_s - now
    if head.deadline is not None:
        remaining = min(remaining, head.deadline - now)
    return max(0.0, remaining)
