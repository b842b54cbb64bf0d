"""Queue orderings: which waiting ticket gets the next free pipeline slot. Pure, clock passed in.

* ``fcfs``: arrival order; priorities ignored; a generation holds its slot until its last token.
* ``priority``: strict priority levels (1 first), arrival order within a level.
* ``mlfq``: strict priority, then a multi-level feedback queue within a level: new requests enter
  level 0; a generation session's decode steps are demoted as the session produces tokens (level k
  holds sessions with quantum * (2**k - 1) .. quantum * (2**(k+1) - 1) tokens), so short requests pass
  long generations. A ticket waiting longer than ``boost_s`` is served as if on level 0 (no starvation).
* ``fair``: strict priority, then self-clocked weighted fair queuing (SCFQ) across tenants: each
  ticket's finish tag is max(V, tenant's last tag) + cost / weight, the smallest tag runs next and V
  becomes its tag, so backlogged tenants share dispatches in proportion to their weights.

Every policy but ``fcfs`` schedules each generation step separately (``preempts_sessions``).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping

from router.scheduling.request import weight_of
from router.scheduling.ticket import Ticket

POLICY_NAMES = ("fcfs", "priority", "mlfq", "fair")


class _LazyRemoval:
    """Counts queued tickets; ``remove`` only marks a ticket, and the queue skips it when it surfaces."""

    name = ""
    preempts_sessions = True

    def __init__(self) -> None:
        self._size = 0

    def remove(self, ticket: Ticket) -> bool:
        if ticket.removed:
            return False
        ticket.removed = True
        self._size -= 1
        return True

    def __len__(self) -> int:
        return self._size


class _HeapPolicy(_LazyRemoval):
    """Orders tickets by ``key`` in a heap; removed tickets are skipped when they surface."""

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[tuple[float, ...], Ticket]] = []

    def key(self, ticket: Ticket, now: float) -> tuple[float, ...]:
        raise NotImplementedError

    def push(self, ticket: Ticket, now: float) -> None:
        heapq.heappush(self._heap, (self.key(ticket, now), ticket))
        self._size += 1

    def pop(self, now: float) -> Ticket:
        while self._heap:
            _, ticket = heapq.heappop(self._heap)
            if not ticket.removed:
                self._size -= 1
                ticket.removed = True
                self.dispatched(ticket)
                return ticket
        raise IndexError("pop from an empty queue")

    def dispatched(self, ticket: Ticket) -> None:
        """Hook for policies with state that advances on dispatch."""


class FcfsPolicy(_HeapPolicy):
    name = "fcfs"
    preempts_sessions = False

    def key(self, ticket: Ticket, now: float) -> tuple[float, ...]:
        return (ticket.seq,)


class PriorityPolicy(_HeapPolicy):
    name = "priority"

    def key(self, ticket: Ticket, now: float) -> tuple[float, ...]:
        return (ticket.priority, ticket.seq)


def mlfq_level(tokens: int, quantum: int, levels: int) -> int:
    """The feedback level of a session that has produced ``tokens`` tokens (0 = top)."""
    return min(levels - 1, int(math.log2(1 + tokens / quantum)))


class MlfqPolicy(_LazyRemoval):
    name = "mlfq"

    def __init__(self, quantum: int = 8, levels: int = 4, boost_s: float = 1.0) -> None:
        if quantum < 1 or levels < 1:
            raise ValueError("mlfq quantum and levels must be at least 1")
        super().__init__()
        self.quantum, self.levels, self.boost_s = quantum, levels, boost_s
        self._queues: dict[int, list[deque[Ticket]]] = {}  # priority -> one FIFO per feedback level

    def level(self, ticket: Ticket) -> int:
        return 0 if ticket.is_new else mlfq_level(ticket.tokens, self.quantum, self.levels)

    def push(self, ticket: Ticket, now: float) -> None:
        queues = self._queues.setdefault(ticket.priority, [deque() for _ in range(self.levels)])
        queues[self.level(ticket)].append(ticket)
        self._size += 1

    def pop(self, now: float) -> Ticket:
        for priority in sorted(self._queues):
            queues = self._queues[priority]
            heads: list[deque[Ticket]] = []
            for q in queues:
                while q and q[0].removed:
                    q.popleft()
                if q:
                    heads.append(q)
            if not heads:
                del self._queues[priority]
                continue
            starved = [q for q in heads if now - q[0].enqueued >= self.boost_s]
            chosen = min(starved, key=lambda q: q[0].seq) if starved else heads[0]
            ticket = chosen.popleft()
            ticket.removed = True
            self._size -= 1
            return ticket
        raise IndexError("pop from an empty queue")


class FairPolicy(_HeapPolicy):
    name = "fair"

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.virtual = 0.0
        self._last: dict[str, float] = {}  # tenant -> finish tag of its latest queued ticket

    def key(self, ticket: Ticket, now: float) -> tuple[float, ...]:
        start = max(self.virtual, self._last.get(ticket.tenant, 0.0))
        finish = start + ticket.cost / weight_of(self.weights, ticket.tenant)
        self._last[ticket.tenant] = finish
        return (ticket.priority, finish, ticket.seq)

    def pop(self, now: float) -> Ticket:
        while self._heap:
            key, ticket = heapq.heappop(self._heap)
            if not ticket.removed:
                self._size -= 1
                ticket.removed = True
                self.virtual = max(self.virtual, key[1])
                if len(self._last) > 1024:  # idle tenants' tags are below V: forgetting them changes nothing
                    self._last = {t: f for t, f in self._last.items() if f > self.virtual}
                return ticket
        raise IndexError("pop from an empty queue")


Policy = FcfsPolicy | PriorityPolicy | MlfqPolicy | FairPolicy


def make_policy(
    name: str,
    *,
    tenant_weights: Mapping[str, float] | None = None,
    mlfq_quantum: int = 8,
    mlfq_levels: int = 4,
    mlfq_boost_s: float = 1.0,
) -> Policy:
    if name == "fcfs":
        return FcfsPolicy()
    if name == "priority":
        return PriorityPolicy()
    if name == "mlfq":
        return MlfqPolicy(mlfq_quantum, mlfq_levels, mlfq_boost_s)
    if name == "fair":
        return FairPolicy(tenant_weights or {})
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(POLICY_NAMES)}")
