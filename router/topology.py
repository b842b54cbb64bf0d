"""The router's live view of the mesh: discovery snapshots turned into described workers and plans.

A background task follows the discovery backend and calls Describe on endpoints it has not described
yet; the table it keeps is swapped whole, so requests in flight keep the snapshot they planned with.
Described workers are described again when discovery's entry for them changes (Consul Meta), when a
caller reports a hop that contradicts the table (:meth:`Topology.suspect`), and every ``REDESCRIBE_S``:
a worker restarted at the same address may serve another layer range or checksum, and nothing else
would tell the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Mapping

from services.discovery.base import Discovery, DiscoverySnapshot, Endpoint
from services.errors import FailedPrecondition, ShardmeshError, Unavailable
from services.layers import LayerSpan
from services.telemetry import DISCOVERY_STALE, ROUTE_COMPLETE
from router.peers import WorkerPool
from router.planning.planner import coverage_problems, plan_route, stage_groups
from router.planning.types import RoutePlan, WorkerInfo

log = logging.getLogger(__name__)

DESCRIBE_TIMEOUT_S = 2.0
RETRY_UNDESCRIBED_S = 0.5  # endpoints whose Describe failed (e.g. still loading) are retried this often
REDESCRIBE_S = 3.0  # every described worker is asked again this often (one small unary call each)
UNLISTED_GRACE_S = 30.0  # a worker discovery stopped listing while it still answers SERVING stays this long
PROBE_TIMEOUT_S = 0.5
PLAN_MEMO_SIZE = 256


class Topology:
    def __init__(
        self,
        discovery: Discovery,
        pool: WorkerPool,
        on_change: Callable[[bool, list[WorkerInfo]], Awaitable[None]] | None = None,
        *,
        redescribe_s: float = REDESCRIBE_S,
        unlisted_grace_s: float = UNLISTED_GRACE_S,
    ) -> None:
        self.discovery = discovery
        self._pool = pool
        self._on_change = on_change
        self._workers: Mapping[str, WorkerInfo] = MappingProxyType({})  # by address
        self._snapshot = DiscoverySnapshot((), 0)
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.last_problem = "no workers described yet"
        self._departed: dict[str, WorkerInfo] = {}  # workers that left, by id: their spans were once served
        self._described_from: dict[str, Endpoint] = {}  # by address: the discovery entry last described
        self._suspects: set[str] = set()  # addresses to describe again at the next round
        self._redescribe_s = redescribe_s
        self._next_redescribe = time.monotonic() + redescribe_s
        self._wake = asyncio.Event()
        self.redescribes = 0  # workers found changed at the same address (metrics, tests)
        self._unlisted: dict[str, float] = {}  # address -> since when discovery omits it while it still serves
        self._unlisted_grace_s = unlisted_grace_s
        self._version = 0  # bumped whenever the worker set or a worker's layers/weights change
        self._version_event = asyncio.Event()  # set (and replaced) at each bump: wakes every waiter once
        self._joins: dict[str, int] = {}  # worker id -> times it joined (or re-joined changed) the table
        # Plans are pure in (table, arguments) and the table is swapped whole: memoised per table object.
        self._plans: dict[tuple[frozenset[str], int, str | None], RoutePlan] = {}
        self._plans_for: Mapping[str, WorkerInfo] | None = None
        self._groups: dict[tuple[str, LayerSpan], tuple[str, ...]] = {}

    @property
    def workers(self) -> tuple[WorkerInfo, ...]:
        return tuple(self._workers.values())

    @property
    def snapshot(self) -> DiscoverySnapshot:
        return self._snapshot

    def plan(self, *, excluded: frozenset[str] = frozenset(), start_layer: int = 0, checksum: str | None = None) -> RoutePlan:
        """The route for these arguments over the current table; every request plans, so plans are memoised."""
        table = self._memo_table()
        key = (excluded, start_layer, checksum)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        try:
            plan = plan_route(table.values(), excluded=excluded, start_layer=start_layer, checksum=checksum)
        except FailedPrecondition as exc:
            lost = self._lost_spans()
            if not lost:
                raise
            # A gap left by workers that served before is an outage, not a misconfiguration.
            detail = "; ".join(f"layers {span} (last served by {', '.join(sorted(ids))})" for span, ids in lost.items())
            raise Unavailable(f"no healthy replica left for {detail}; retry when a replica returns ({exc})") from None
        if len(self._plans) < PLAN_MEMO_SIZE:  # exclusion sets vary with faults: bound the memo
            self._plans[key] = plan
        return plan

    def _memo_table(self) -> Mapping[str, WorkerInfo]:
        """The current table, with the memos derived from it dropped if it was swapped since."""
        table = self._workers
        if table is not self._plans_for:
            self._plans, self._plans_for = {}, table
            self._groups = stage_groups(table.values())
        return table

    def stage_groups(self) -> Mapping[tuple[str, LayerSpan], tuple[str, ...]]:
        """:func:`stage_groups` of the current table (asked on every request, so memoised with it)."""
        self._memo_table()
        return self._groups

    def _lost_spans(self) -> dict[LayerSpan, set[str]]:
        live = {w.span for w in self._workers.values()}
        lost: dict[LayerSpan, set[str]] = {}
        for worker in self._departed.values():
            if worker.span not in live:
                lost.setdefault(worker.span, set()).add(worker.worker_id)
        return lost

    def is_complete(self) -> bool:
        try:
            self.plan()
        except ShardmeshError as exc:
            self.last_problem = str(exc)
            return False
        self.last_problem = ""
        return True

    def problems(self) -> list[str]:
        return coverage_problems(self.workers) if self.workers else ["no workers described yet"]

    async def start(self) -> None:
        await self.discovery.start()
        await self._refresh(self.discovery.snapshot())
        self._task = asyncio.create_task(self._follow(), name="topology")

    @property
    def version(self) -> int:
        """Changes whenever the routing table does (workers joined, left or changed layers or weights)."""
        return self._version

    def joins(self, worker_id: str) -> int:
        """How often ``worker_id`` has joined the table: a request may try again a worker that re-joined
        since it failed (e.g. restarted in a rolling restart)."""
        return self._joins.get(worker_id, 0)

    async def wait_version(self, version: int, timeout_s: float) -> int:
        """Waits until the table's version differs from ``version`` or ``timeout_s``; returns the version.
        Any number of requests may wait at once (each change wakes them all)."""
        if self._version == version:
            event = self._version_event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
        return self._version

    async def wait_changed(self, timeout_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    def suspect(self, address: str, reason: str = "") -> None:
        """Asks for ``address`` to be described again soon, e.g. after a hop answered FAILED_PRECONDITION
        about its layers or checksum: the worker there may have restarted with another range."""
        if address in self._workers and address not in self._suspects:
            log.info("describing %s again: %s", address, reason or "its answers contradict the table")
            self._suspects.add(address)
            self._wake.set()

    def _pending(self) -> bool:
        """Endpoints not (or no longer) described as discovery lists them."""
        return any(self._described_from.get(e.address) != e or e.address not in self._workers
                   for e in self._snapshot.endpoints)

    async def _wait_for_work(self, timeout_s: float) -> DiscoverySnapshot:
        """Waits for a discovery change, a :meth:`suspect` call or ``timeout_s``; returns the latest snapshot."""
        self._wake.clear()
        if not self._suspects:
            changed = asyncio.create_task(self.discovery.wait_changed(self._snapshot.version, timeout_s))
            woken = asyncio.create_task(self._wake.wait())
            try:
                await asyncio.wait({changed, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (changed, woken):
                    task.cancel()
                await asyncio.gather(changed, woken, return_exceptions=True)
        return self.discovery.snapshot()

    async def _follow(self) -> None:
        while True:
            try:
                now = time.monotonic()
                wait = RETRY_UNDESCRIBED_S if self._pending() else max(0.0, min(5.0, self._next_redescribe - now))
                snapshot = await self._wait_for_work(wait)
                recheck, self._suspects = set(self._suspects), set()
                if time.monotonic() >= self._next_redescribe:
                    recheck |= set(self._workers)
                    self._next_redescribe = time.monotonic() + self._redescribe_s
                await self._refresh(snapshot, recheck)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the follower must survive any one bad round
                log.exception("topology refresh failed; keeping the last table")
                await asyncio.sleep(RETRY_UNDESCRIBED_S)

    async def _describe(self, endpoint: Endpoint) -> WorkerInfo | None:
        try:
            return await self._pool.describe(endpoint.address, DESCRIBE_TIMEOUT_S)
        except ShardmeshError as exc:
            log.debug("describe %s failed: %s", endpoint.address, exc)
            return None

    async def _refresh(self, snapshot: DiscoverySnapshot, recheck: set[str] | frozenset[str] = frozenset()) -> None:
        if snapshot.stale != self._snapshot.stale:
            (log.warning if snapshot.stale else log.info)(
                "discovery %s: %s", self.discovery.name, snapshot.detail or ("stale" if snapshot.stale else "current")
            )
        DISCOVERY_STALE.set(1 if snapshot.stale else 0)
        current = dict(self._workers)
        wanted = {e.address: e for e in snapshot.endpoints}
        # New endpoints, endpoints whose discovery entry changed (e.g. Consul Meta after a restart), rechecks.
        todo = [e for addr, e in wanted.items()
                if addr not in current or addr in recheck or self._described_from.get(addr) != e]
        described = await asyncio.gather(*(self._describe(e) for e in todo))
        table = {addr: w for addr, w in current.items() if addr in wanted}
        for addr in await self._still_serving([a for a in current if a not in wanted]):
            table[addr] = current[addr]
        changed: list[str] = []
        for endpoint, info in zip(todo, described):
            if info is None:  # unreachable or loading: keep what we had; RPC failure detection covers it
                continue
            self._described_from[endpoint.address] = endpoint
            old = table.get(endpoint.address)
            if old is not None and old != info:
                changed.append(endpoint.address)
            table[endpoint.address] = info
        for addr in set(self._described_from) - set(wanted):
            del self._described_from[addr]
        removed = set(current) - set(table)
        added = set(table) - set(current)
        self._snapshot = snapshot
        if removed or added or changed:
            self._workers = MappingProxyType(table)
            for addr in removed:
                self._departed[current[addr].worker_id] = current[addr]
                log.info("worker %s (%s) left the routing table", current[addr].worker_id, addr)
                await self._pool.forget(addr)
            for addr in changed:
                old, new = current[addr], table[addr]
                self.redescribes += 1
                if old.worker_id != new.worker_id:
                    self._departed[old.worker_id] = old
                log.warning("worker at %s changed since it was described: %s layers %s checksum %s -> %s layers %s "
                            "checksum %s", addr, old.worker_id, old.span, old.checksum[:12], new.worker_id, new.span,
                            new.checksum[:12])
            added |= set(changed)
            for addr in added:
                self._departed.pop(table[addr].worker_id, None)
                self._joins[table[addr].worker_id] = self._joins.get(table[addr].worker_id, 0) + 1
                log.info("worker %s (%s) joined: layers %s", table[addr].worker_id, addr, table[addr].span)
            complete = self.is_complete()
            ROUTE_COMPLETE.set(1 if complete else 0)
            self._version += 1  # requests waiting for coverage (--route-wait-s) plan again now
            self._version_event.set()
            self._version_event = asyncio.Event()
            if self._on_change is not None:
                await self._on_change(complete, [table[a] for a in added])
            self._changed.set()

    async def _still_serving(self, unlisted: list[str]) -> list[str]:
        """Workers discovery no longer lists that still answer SERVING, for at most the grace period.

        A Consul agent restarted without its data forgets every service until the workers register
        again (about a second): dropping them would fail requests they can serve. A worker that leaves
        on purpose answers NOT_SERVING before it deregisters, so it leaves the table at once.
        """
        now = time.monotonic()
        for addr in set(self._unlisted) - set(unlisted):
            del self._unlisted[addr]  # listed again, or already dropped
        candidates = [a for a in unlisted if now - self._unlisted.setdefault(a, now) < self._unlisted_grace_s]
        serving = await asyncio.gather(*(self._pool.is_serving(a, PROBE_TIMEOUT_S) for a in candidates))
        kept = [a for a, ok in zip(candidates, serving) if ok]
        for addr in set(unlisted) - set(kept):
            self._unlisted.pop(addr, None)
        if kept:
            log.warning("discovery no longer lists %s, which still answer SERVING: kept for up to %.0f s",
                        ", ".join(sorted(kept)), self._unlisted_grace_s)
        return kept

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self.discovery.close()
