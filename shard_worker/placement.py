"""The worker's side of placement: its measured capacity, the range it picks with ``--layers auto``, and
moves to another range when coverage falls (see docs/placement.md for the protocol).

A move is make-before-break: the new range's weights load in a thread while the old range keeps serving;
then the worker answers Describe with the new range and registers it in Consul (same service ID, new Meta),
so routers describe it again, while requests already planned for the old range (and open generation
sessions) still reach the old stage through :class:`StageSwitch`. Only after routers had time to switch is
the old stage drained and freed. Every layer the worker held stays served throughout, and the choice of
mover (:func:`services.placement.coverage.next_move`) never uncovers a layer someone holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from services.config import WorkerConfig
from services.discovery.registration import parse_worker_meta
from services.errors import ShardmeshError
from services.gen.shardmesh.v1 import worker_pb2
from services.layers import LayerSpan
from services.models.base import ModelSource, StageModel
from services.models.registry import load_stage
from services.placement.costs import META_AUTO, META_MEMORY_BYTES, META_SPEED, ModelCosts
from services.placement.coverage import Holder, best_span, next_move, uncovered
from services.placement.measure import available_memory_bytes, calibrate_speed, estimated_costs
from shard_worker.core import WorkerCore
from shard_worker.presence import ConsulPresence, list_peers
from shard_worker.sessions import stop_task

log = logging.getLogger(__name__)

# Routers describe a worker again when its Consul Meta changes, and every 3 s anyway (router REDESCRIBE_S);
# the old stage keeps serving this long after a move before it is drained.
SWITCH_SETTLE_S = 5.0


@dataclasses.dataclass(frozen=True)
class Capacity:
    speed: float
    memory_bytes: int


async def measure_capacity(config: WorkerConfig) -> Capacity:
    """Declared (``--capacity``, ``--capacity-memory-mb``) or measured: a ~0.3 s calibration in a thread."""
    speed = config.capacity_speed or await asyncio.to_thread(calibrate_speed)
    memory = config.capacity_memory_bytes or available_memory_bytes()
    log.info("capacity: speed %.3g (%s), memory %d MiB (%s)", speed, "declared" if config.capacity_speed else "calibrated",
             memory >> 20, "declared" if config.capacity_memory_bytes else "available")
    return Capacity(speed, memory)


def holders_from_peers(peers: list[tuple[str, dict[str, str]]], checksum: str, exclude: str = "") -> list[Holder]:
    """Consul instances serving the same weights, as placement sees them (unparsable ones are skipped)."""
    holders = []
    for service_id, meta in peers:
        if service_id == exclude:
            continue
        try:
            parsed = parse_worker_meta(meta)
        except ShardmeshError:
            continue
        if parsed.checksum != checksum or parsed.state != "serving":
            continue
        try:
            speed = float(meta.get(META_SPEED, "1") or 1)
            memory = int(meta.get(META_MEMORY_BYTES, "0") or 0)
        except ValueError:
            speed, memory = 1.0, 0
        holders.append(Holder(service_id, parsed.layers, speed if speed > 0 else 1.0, memory, meta.get(META_AUTO) == "1"))
    return holders


async def choose_initial_span(config: WorkerConfig, source: ModelSource, capacity: Capacity) -> WorkerConfig:
    """``--layers auto``: the range covering the weakest layers of the workers already registered."""
    assert config.consul is not None  # WorkerConfig.from_args requires Consul for --layers auto
    costs = await asyncio.to_thread(estimated_costs, config.model)
    try:
        peers = await list_peers(config.consul)
    except ShardmeshError as exc:
        log.warning("--layers auto: %s; placing as if no other worker were registered", exc)
        peers = []
    others = holders_from_peers(peers, source.checksum)
    me = Holder("me", LayerSpan(0, 1), capacity.speed, capacity.memory_bytes, True)
    span = best_span(costs, others, me)
    if span is None:
        raise ShardmeshError(f"--layers auto: not even one layer of {source.model_id} fits in {capacity.memory_bytes} "
                             "bytes of memory (--capacity-memory-mb)")
    log.info("--layers auto: chose layers %s of %s (registered: %s)", span, source.model_id,
             ", ".join(f"{h.name}={h.span}" for h in others) or "none")
    return dataclasses.replace(config, span=span)


class _SessionsFanout:
    """CloseSession for a session opened on the current stage or on one being retired."""

    def __init__(self, switch: StageSwitch) -> None:
        self._switch = switch

    @property
    def store(self) -> Any:
        return self._switch.current.sessions.store  # type: ignore[union-attr]

    def close(self, session_id: str, session_key: bytes) -> bool:
        existed = False
        for core in (self._switch.current, *self._switch.retiring):
            if core.sessions is not None:
                existed = core.sessions.close(session_id, session_key) or existed
        return existed


class StageSwitch:
    """What the servicer calls: the current core, plus cores of ranges this worker left but still serves
    for requests planned before routers saw the move. Anything else is the current core's."""

    def __init__(self, core: WorkerCore, capacity: Capacity) -> None:
        self.current = core
        self.retiring: list[WorkerCore] = []
        self.capacity = capacity

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)

    @property
    def sessions(self) -> Any:
        return _SessionsFanout(self) if self.current.sessions is not None else None

    def _core_for(self, request: worker_pb2.ForwardRequest) -> WorkerCore:
        if self.retiring and request.HasField("layers"):
            wanted = (request.layers.start, request.layers.end)
            for core in (self.current, *self.retiring):
                if (core.stage.span.start, core.stage.span.end) == wanted:
                    return core
        return self.current

    async def forward(self, request: worker_pb2.ForwardRequest, deadline: float | None) -> worker_pb2.ForwardResponse:
        return await self._core_for(request).forward(request, deadline)

    def describe(self) -> worker_pb2.DescribeResponse:
        reply = self.current.describe()
        reply.capacity.speed = self.capacity.speed
        reply.capacity.memory_bytes = self.capacity.memory_bytes
        return reply

    async def drain(self, grace_s: float) -> bool:
        results = await asyncio.gather(*(c.drain(grace_s) for c in (self.current, *self.retiring)))
        return all(results)

    def close(self) -> None:
        for core in (self.current, *self.retiring):
            core.engine.close()


BuildCore = Callable[[StageModel], WorkerCore]


class AutoPlacer:
    """Checks coverage every ``interval_s`` (jittered) and moves this worker when the shared rule says it
    is this round's mover; at most one move per ``interval_s``."""

    def __init__(self, switch: StageSwitch, presence: ConsulPresence, build: BuildCore, source: ModelSource,
                 config: WorkerConfig, worker_id: str, costs: ModelCosts | None = None) -> None:
        self._switch = switch
        self._presence = presence
        self._build = build
        self._source = source
        self._config = config
        self._worker_id = worker_id
        self._costs = costs
        self._task: asyncio.Task[None] | None = None
        self._last_move = -float("inf")
        self._expiry: asyncio.Task[None] | None = None
        self.moves = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="auto-placement")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _loop(self) -> None:
        if self._costs is None:
            self._costs = await asyncio.to_thread(estimated_costs, self._config.model)
        await self._presence.registered.wait()
        interval = self._config.rebalance_interval_s
        while True:
            # Jitter keeps workers that started together from reading Consul in the same instant.
            await asyncio.sleep(min(interval, 2.0) * (0.5 + random.random()))
            if time.monotonic() - self._last_move < interval:
                continue
            try:
                await self.check_once()
            except ShardmeshError as exc:
                log.warning("placement check failed (%s); trying again later", exc)
            except Exception:  # noqa: BLE001 - placement must never take a serving worker down
                log.exception("placement check failed")

    async def check_once(self) -> bool:
        """One round: reads Consul, and moves if this worker is the round's mover. Returns whether it moved."""
        assert self._costs is not None
        peers = await self._presence.peers()
        holders = holders_from_peers(peers, self._source.checksum)
        if not any(h.name == self._worker_id for h in holders):
            return False  # not (yet, or no longer) passing in Consul: the others do not count on us
        move = next_move(self._costs, holders)
        if move is None or move.worker != self._worker_id:
            return False
        log.info("placement: moving from layers %s to %s (gaps %s; weakest layer %.3g -> %.3g requests/s)",
                 move.old, move.new, [str(g) for g in uncovered(self._costs, holders)] or "none",
                 move.before_min, move.after_min)
        await self.move(move.new)
        return True

    async def move(self, span: LayerSpan) -> None:
        started = time.monotonic()
        self._last_move = started
        stage = await asyncio.to_thread(load_stage, self._source, span)
        core = self._build(stage)
        self._expiry = core.sessions.start() if core.sessions is not None else None
        old = self._switch.current
        self._switch.retiring.append(old)
        self._switch.current = core  # Describe answers the new range from here on
        await self._presence.move_to(span)  # routers see the Meta change and describe this worker again
        self.moves += 1
        log.info("placement: serving layers %s (loaded in %.1fs); layers %s still served for %.0fs",
                 span, time.monotonic() - started, old.stage.span, SWITCH_SETTLE_S)
        await asyncio.sleep(SWITCH_SETTLE_S)
        drained = await old.drain(self._config.grace_s)
        self._switch.retiring.remove(old)
        old.engine.close()
        log.info("placement: released layers %s (%s)", old.stage.span, "drained" if drained else "grace period ended")

    async def close(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await stop_task(self._expiry)
