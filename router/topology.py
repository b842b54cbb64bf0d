"""The router's live view of the mesh: discovery snapshots turned into described workers and plans.

A background task follows the discovery backend and calls Describe on endpoints it has not described
yet; the table it keeps is swapped whole, so requests in flight keep the snapshot they planned with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Mapping

from services.discovery.base import Discovery, DiscoverySnapshot, Endpoint
from services.errors import FailedPrecondition, ShardmeshError, Unavailable
from services.layers import LayerSpan
from services.telemetry import DISCOVERY_STALE, ROUTE_COMPLETE
from router.peers import WorkerPool
from router.planning.planner import coverage_problems, plan_route
from router.planning.types import RoutePlan, WorkerInfo

log = logging.getLogger(__name__)

DESCRIBE_TIMEOUT_S = 2.0
RETRY_UNDESCRIBED_S = 0.5  # endpoints whose Describe failed (e.g. still loading) are retried this often


class Topology:
    def __init__(
        self,
        discovery: Discovery,
        pool: WorkerPool,
        on_change: Callable[[bool, list[WorkerInfo]], Awaitable[None]] | None = None,
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

    @property
    def workers(self) -> tuple[WorkerInfo, ...]:
        return tuple(self._workers.values())

    @property
    def snapshot(self) -> DiscoverySnapshot:
        return self._snapshot

    def plan(self, *, excluded: frozenset[str] = frozenset(), start_layer: int = 0, checksum: str | None = None) -> RoutePlan:
        try:
            return plan_route(self.workers, excluded=excluded, start_layer=start_layer, checksum=checksum)
        except FailedPrecondition as exc:
            lost = self._lost_spans()
            if not lost:
                raise
            # A gap left by workers that served before is an outage, not a misconfiguration.
            detail = "; ".join(f"layers {span} (last served by {', '.join(sorted(ids))})" for span, ids in lost.items())
            raise Unavailable(f"no healthy replica left for {detail}; retry when a replica returns ({exc})") from None

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

    async def wait_changed(self, timeout_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def _follow(self) -> None:
        while True:
            try:
                undescribed = any(e.address not in self._workers for e in self._snapshot.endpoints)
                wait = RETRY_UNDESCRIBED_S if undescribed else 5.0
                snapshot = await self.discovery.wait_changed(self._snapshot.version, wait)
                await self._refresh(snapshot)
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

    async def _refresh(self, snapshot: DiscoverySnapshot) -> None:
        if snapshot.stale != self._snapshot.stale:
            (log.warning if snapshot.stale else log.info)(
                "discovery %s: %s", self.discovery.name, snapshot.detail or ("stale" if snapshot.stale else "current")
            )
        DISCOVERY_STALE.set(1 if snapshot.stale else 0)
        current = dict(self._workers)
        wanted = {e.address: e for e in snapshot.endpoints}
        new = [e for addr, e in wanted.items() if addr not in current]
        described = await asyncio.gather(*(self._describe(e) for e in new))
        table = {addr: w for addr, w in current.items() if addr in wanted}
        for endpoint, info in zip(new, described):
            if info is not None:
                table[endpoint.address] = info
        removed = set(current) - set(table)
        added = set(table) - set(current)
        self._snapshot = snapshot
        if removed or added:
            self._workers = MappingProxyType(table)
            for addr in removed:
                self._departed[current[addr].worker_id] = current[addr]
                log.info("worker %s (%s) left the routing table", current[addr].worker_id, addr)
                await self._pool.forget(addr)
            for addr in added:
                self._departed.pop(table[addr].worker_id, None)
                log.info("worker %s (%s) joined: layers %s", table[addr].worker_id, addr, table[addr].span)
            complete = self.is_complete()
            ROUTE_COMPLETE.set(1 if complete else 0)
            if self._on_change is not None:
                await self._on_change(complete, [table[a] for a in added])
            self._changed.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self.discovery.close()
