"""Router-side coalescing (``--coalesce N``): Infer requests that wait for the pipeline travel as one batch.

Why: on a small host most of a mesh request's CPU is spent per message (gRPC, event loop and thread hand-offs
in the router and in every worker), not per row. Worker batching (``--max-batch-size``) shares a stage's
forward, but every request is still its own message on every hop. A coalesced group is one message per hop,
so that per-message work is paid once for the whole group.

When: a request leaves at once, alone, while fewer than ``depth`` groups are in flight: a lone client never
waits and nothing changes for it. Past that it waits for the next group to finish, and then every waiting
request with the same key (same mode, priority, input dtype and shape) leaves together, up to ``max_rows``,
oldest first. ``depth`` defaults to the route's stage count + 1, so each stage has a group to work on while
the next one forms.

Each member keeps its own deadline and may leave (its client cancels, its time runs out) without disturbing
the others; the group's work stops only when every member has left. A group that fails fails each member
with the same error. Numerics: a group is a batched forward, so outputs are within the stated batching bound
of one process (``docs/architecture.md``), not bit-identical; that is why it is off by default.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.errors import DeadlineExceeded

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)  # compared by identity: leaving the queue must remove this waiter, not an equal one
class _Waiter(Generic[T, R]):
    key: Hashable
    item: T
    future: asyncio.Future[R]
    context: contextvars.Context = field(default_factory=contextvars.Context)  # the submitter's (trace, logs)


@dataclass
class _Group(Generic[T, R]):
    members: list[_Waiter[T, R]]
    task: asyncio.Task[None] | None = None
    left: int = field(default=0)


def take_group(waiting: collections.deque[_Waiter[T, R]], max_rows: int) -> list[_Waiter[T, R]]:
    """Removes and returns the oldest waiter and every later one with its key, up to ``max_rows`` (pure)."""
    if not waiting:
        return []
    key = waiting[0].key
    chosen: list[_Waiter[T, R]] = []
    kept: list[_Waiter[T, R]] = []
    for waiter in waiting:
        (chosen if waiter.key == key and len(chosen) < max_rows else kept).append(waiter)
    waiting.clear()
    waiting.extend(kept)
    return chosen


class Coalescer(Generic[T, R]):
    """Runs items alone while there is room, else in groups; ``run`` gets a group's items, returns their results."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_rows: int,
        depth: Callable[[], int],
        on_batch: Callable[[int], None] = lambda _size: None,
    ) -> None:
        if max_rows < 2:
            raise ValueError(f"max_rows must be at least 2 to coalesce anything, not {max_rows}")
        self._run = run
        self.max_rows = max_rows
        self._depth = depth
        self._on_batch = on_batch  # called with the size of each batch of two or more (metrics)
        self._inflight = 0
        self._waiting: collections.deque[_Waiter[T, R]] = collections.deque()
        self.groups = 0  # groups of two or more sent (metrics, tests)
        self.grouped = 0  # requests that went in them

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def submit(self, key: Hashable, item: T, deadline: float) -> R:
        """``item``'s result; ``deadline`` (loop time) bounds the wait for a group, and the group's own run."""
        if self._inflight < max(1, self._depth()) and not self._waiting:
            self._inflight += 1
            try:
                return (await self._run([item]))[0]
            finally:
                self._inflight -= 1
                self._dispatch()
        loop = asyncio.get_running_loop()
        waiter: _Waiter[T, R] = _Waiter(key, item, loop.create_future(), contextvars.copy_context())
        self._waiting.append(waiter)
        try:
            return await asyncio.wait_for(waiter.future, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise DeadlineExceeded("the request ran out of time waiting for its coalesced batch (--coalesce)") from None
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
            if waiter in self._waiting:  # it left before its group formed
                self._waiting.remove(waiter)

    def _dispatch(self) -> None:
        while self._waiting and self._inflight < max(1, self._depth()):
            members = take_group(self._waiting, self.max_rows)
            live = [m for m in members if not m.future.done()]
            if not live:
                continue
            group: _Group[T, R] = _Group(live)
            if len(live) > 1:
                self.groups += 1
                self.grouped += len(live)
                self._on_batch(len(live))
            self._inflight += 1
            # In the oldest member's context (a copy): the batch's hop spans join that member's trace.
            group.task = asyncio.get_running_loop().create_task(self._run_group(group), context=live[0].context.copy())
            for member in live:
                member.future.add_done_callback(lambda _f, g=group: self._member_done(g))

    def _member_done(self, group: _Group[T, R]) -> None:
        group.left += 1
        if group.left == len(group.members) and group.task is not None and not group.task.done():
            if all(m.future.cancelled() for m in group.members):
                group.task.cancel()  # every member left: stop the work

    async def _run_group(self, group: _Group[T, R]) -> None:
        try:
            results = await self._run([m.item for m in group.members])
        except asyncio.CancelledError:
            for member in group.members:
                if not member.future.done():
                    member.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every member gets the group's error
            for member in group.members:
                if not member.future.done():
                    member.future.set_exception(exc)
        else:
            for member, result in zip(group.members, results, strict=True):
                if not member.future.done():
                    member.future.set_result(result)
        finally:
            self._inflight -= 1
            self._dispatch()
