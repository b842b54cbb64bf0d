"""The concurrency gate: at most ``limit`` tickets run through the pipeline; the rest wait in a policy.

Without a limit there is no queue to order, so the router admits at most ``--max-concurrency``
requests (or generation steps) into the pipeline at once; the policy picks who gets each freed slot.
A new request (not a later step of a running generation) is refused at once when its priority's
queue is full (RESOURCE_EXHAUSTED naming the queue and ``--queue-size``) or when it cannot finish
before its deadline: the time left is shorter than the expected service time (EWMA of recent
requests of its kind) plus the expected wait for the requests queued ahead of it (DEADLINE_EXCEEDED).
While queued it waits at most ``--queue-timeout-ms`` (RESOURCE_EXHAUSTED), and leaves the queue as
soon as the time left drops below the expected service time (DEADLINE_EXCEEDED), not after the
deadline. Steps of a running generation wait up to the generation's deadline and are never refused
for queue size: refusing one would waste the tokens already produced.

Asyncio futures only, no I/O; the clock and the slot limit are injected, so tests drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from services.config import RouterSchedule
from services.errors import DeadlineExceeded, ResourceExhausted
from router.scheduling.estimate import Ewma
from router.scheduling.policies import make_policy
from router.scheduling.ticket import KINDS, Ticket

# outcome of a wait: "run" (got a slot), "full", "timeout", "deadline", "cancelled"
Observer = Callable[[Ticket, float, str], None]


@dataclass(frozen=True)
class SchedulerSettings:
    schedule: str = "fcfs"
    priority_levels: int = 3
    default_priority: int = 2
    queue_size: int = 128  # waiting new requests per priority level
    queue_timeout_s: float = 0.0  # 0 = wait up to the request's deadline
    max_concurrency: int = 0  # 0 = the injected capacity
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    mlfq_quantum: int = 8
    mlfq_levels: int = 4
    mlfq_boost_s: float = 1.0
    deadline_admission: bool = True

    @classmethod
    def from_config(cls, config: RouterSchedule) -> SchedulerSettings:
        return cls(
            schedule=config.schedule, priority_levels=config.priority_levels, default_priority=config.default_priority,
            queue_size=config.queue_size, queue_timeout_s=config.queue_timeout_s, max_concurrency=config.max_concurrency,
            tenant_weights=dict(config.tenant_weights), mlfq_quantum=config.mlfq_quantum, mlfq_levels=config.mlfq_levels,
            mlfq_boost_s=config.mlfq_boost_s, deadline_admission=config.deadline_admission,
        )

    def __post_init__(self) -> None:
        if not 1 <= self.default_priority <= self.priority_levels:
            raise ValueError(
                f"--default-priority {self.default_priority} must be within 1 .. --priority-levels {self.priority_levels}"
            )


class Scheduler:
    def __init__(
        self,
        settings: SchedulerSettings,
        capacity: Callable[[], int] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self.policy = make_policy(
            settings.schedule, tenant_weights=settings.tenant_weights, mlfq_quantum=settings.mlfq_quantum,
            mlfq_levels=settings.mlfq_levels, mlfq_boost_s=settings.mlfq_boost_s,
        )
        self._capacity = capacity or (lambda: 64)
        self._clock = clock
        self._observer = observer
        self._seq = itertools.count()
        self._waiters: dict[Ticket, asyncio.Future[None]] = {}
        self.waiting: Counter[int] = Counter()  # new requests queued, per priority level
        self.running = 0
        self.estimates = {kind: Ewma() for kind in KINDS}

    @property
    def preempts_sessions(self) -> bool:
        """True when each generation step is scheduled on its own (else a session holds its slot)."""
        return self.policy.preempts_sessions

    @property
    def limit(self) -> int:
        return max(1, self.settings.max_concurrency or self._capacity())

    @property
    def queued(self) -> int:
        return len(self.policy)

    def ticket(self, kind: str, priority: int, tenant: str, *, tokens: int = 0) -> Ticket:
        return Ticket(next(self._seq), kind, priority, tenant, tokens=tokens)

    def expected_service_s(self, kind: str) -> float | None:
        return self.estimates[kind].value

    def expected_wait_s(self, ticket: Ticket) -> float:
        """Rough wait for the new requests queued ahead of ``ticket`` (0 with a slot free)."""
        if self.running < self.limit and not self.queued:
            return 0.0
        estimate = self.expected_service_s("infer") or self.expected_service_s("generate") or 0.0
        if self.policy.name == "fcfs":
            ahead = sum(self.waiting.values())
        else:
            ahead = sum(n for level, n in self.waiting.items() if level <= ticket.priority)
        return ahead / self.limit * estimate

    def check_admission(self, ticket: Ticket, remaining_s: float) -> None:
        """Raises for a new request that must be refused at once (queue full, deadline unreachable)."""
        busy = self.running >= self.limit or self.queued > 0
        level = ticket.priority
        if busy and self.waiting[level] >= self.settings.queue_size:
            raise ResourceExhausted(
                f"scheduler queue priority-{level} is full: {self.waiting[level]} requests waiting "
                f"(limit --queue-size {self.settings.queue_size}); retry later, or send at a higher priority"
            )
        service = self.expected_service_s(ticket.kind)
        if not self.settings.deadline_admission or service is None:
            return
        wait = self.expected_wait_s(ticket) if busy else 0.0
        if remaining_s < service + wait:
            raise DeadlineExceeded(
                f"refused at admission: {max(0.0, remaining_s) * 1000:.0f} ms left before the deadline, less than "
                f"the expected {1000 * (service + wait):.0f} ms ({1000 * service:.0f} ms expected service time, EWMA of "
                f"recent {ticket.kind} requests, + {1000 * wait:.0f} ms queue wait at priority {level}); "
                "send a longer deadline or a higher priority"
            )

    def _observe(self, ticket: Ticket, waited: float, outcome: str) -> None:
        if self._observer is not None:
            self._observer(ticket, waited, outcome)

    async def acquire(self, ticket: Ticket, deadline: float) -> None:
        """Returns once ``ticket`` holds a slot (release it with :meth:`release`); raises if refused."""
        now = self._clock()
        remaining = deadline - now
        if ticket.is_new:
            try:
                self.check_admission(ticket, remaining)
            except ResourceExhausted:
                self._observe(ticket, 0.0, "full")
                raise
            except DeadlineExceeded:
                self._observe(ticket, 0.0, "deadline")
                raise
        self._dispatch()
        if self.running < self.limit and not self.queued:
            self.running += 1
            self._observe(ticket, 0.0, "run")
            return
        ticket.enqueued = now
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = future
        self.policy.push(ticket, now)
        if ticket.is_new:
            self.waiting[ticket.priority] += 1
        timeout, reason = remaining, "deadline"
        service = self.expected_service_s(ticket.kind) if ticket.is_new and self.settings.deadline_admission else None
        if service is not None:
            timeout, reason = remaining - service, "service"
        if ticket.is_new and self.settings.queue_timeout_s and self.settings.queue_timeout_s < timeout:
            timeout, reason = self.settings.queue_timeout_s, "timeout"
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, timeout))
        except (TimeoutError, asyncio.TimeoutError):
            if not future.done():
                self._leave(ticket)
                waited = self._clock() - now
                self._observe(ticket, waited, "timeout" if reason == "timeout" else "deadline")
                raise self._wait_error(ticket, waited, reason, deadline) from None
        except BaseException:  # cancelled (client gone): give back a slot granted meanwhile
            if future.done():
                self.release(ticket, None)
            else:
                self._leave(ticket)
            self._observe(ticket, self._clock() - now, "cancelled")
            raise
        finally:
            self._waiters.pop(ticket, None)
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the grant raced a cancel that wait_for swallowed
            self.release(ticket, None)
            self._observe(ticket, self._clock() - now, "cancelled")
            raise asyncio.CancelledError
        self._observe(ticket, self._clock() - now, "run")

    def _wait_error(self, ticket: Ticket, waited: float, reason: str, deadline: float) -> Exception:
        where = f"waited {1000 * waited:.0f} ms in scheduler queue priority-{ticket.priority}"
        if reason == "timeout":
            return ResourceExhausted(
                f"{where} without a free slot (limit --queue-timeout-ms {1000 * self.settings.queue_timeout_s:.0f}, "
                f"{self.running} running, --max-concurrency {self.limit}); retry later, or send at a higher priority"
            )
        if reason == "service":
            service = self.expected_service_s(ticket.kind) or 0.0
            left = max(0.0, deadline - self._clock())
            return DeadlineExceeded(
                f"{where}; dropped before running: the {1000 * left:.0f} ms left before the deadline are less than the "
                f"expected service time {1000 * service:.0f} ms (EWMA of recent {ticket.kind} requests)"
            )
        return DeadlineExceeded(f"{where}; the deadline passed before a slot was free")

    def _leave(self, ticket: Ticket) -> None:
        if self.policy.remove(ticket) and ticket.is_new:
            self.waiting[ticket.priority] -= 1

    def release(self, ticket: Ticket, service_s: float | None) -> None:
        """Frees ``ticket``'s slot; ``service_s`` (a success's run time) feeds the estimate of its kind."""
        self.running -= 1
        if service_s is not None:
            self.estimates[ticket.kind].observe(service_s)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.running < self.limit and len(self.policy):
            ticket = self.policy.pop(self._clock())
            if ticket.is_new:
                self.waiting[ticket.priority] -= 1
            future = self._waiters.get(ticket)
            if future is not None and not future.done():
                self.running += 1
                future.set_result(None)

    @contextlib.asynccontextmanager
    async def slot(self, ticket: Ticket, deadline: float, *, record: bool = True) -> AsyncIterator[None]:
        """Holds a slot for the block; its run time feeds the estimate when the block succeeds and ``record``."""
        await self.acquire(ticket, deadline)
        started = self._clock()
        ok = False
        try:
            yield
            ok = record
        finally:
            self.release(ticket, self._clock() - started if ok else None)
