"""Generation sessions on a worker: one KV cache per session for this stage's layers, steps in order,
and continuous batching of concurrent sessions' decode steps into one forward pass.

Position 0 opens a session; every later step names the position it starts at and is refused if the
cache holds a different number of tokens (no silent off-by-one after a failover: the router replays
on a fresh session instead). A session belongs to the key it was opened with (``session_key``): steps
and closes with another key are PERMISSION_DENIED. A draining worker opens no new sessions but lets
open ones finish (:meth:`SessionService.begin_drain`, :meth:`SessionService.wait_closed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from services.errors import FailedPrecondition, Unavailable
from services.models.base import StageModel
from services.models.kv_cache import SessionCache, SessionCacheStore
from shard_worker.engine import StageEngine

log = logging.getLogger(__name__)

EXPIRY_INTERVAL_S = 1.0
DRAIN_POLL_S = 0.05
MAX_DECODE_BATCH = 32


@dataclass
class _Decode:
    x: torch.Tensor
    cache: SessionCache
    position: int
    done: asyncio.Future[torch.Tensor]


class SessionService:
    def __init__(
        self,
        stage: StageModel,
        engine: StageEngine,
        *,
        budget_bytes: int,
        default_ttl_s: float,
        batching: bool = True,
    ) -> None:
        if not hasattr(stage, "step"):
            raise FailedPrecondition(f"model {stage.source.model_id} ({stage.source.architecture}) has no generation sessions")
        self._stage: Any = stage
        self._engine = engine
        self.store = SessionCacheStore(budget_bytes, stage.kv_bytes_per_token)  # type: ignore[attr-defined]
        self._default_ttl_s = default_ttl_s
        self._batching = batching
        self._order: dict[str, asyncio.Lock] = {}
        self._queue: list[_Decode] = []
        self._queue_lock = threading.Lock()  # the compute thread takes the queue; the loop appends
        self._drain_scheduled = False
        self.draining = False
        self.batches_run = 0
        self.batched_steps = 0

    async def step(
        self, session_id: str, position: int, ttl_s: float, x: torch.Tensor, deadline: float | None, key: bytes = b""
    ) -> torch.Tensor:
        """Runs one prefill or decode step of ``session_id`` at ``position`` on this stage.

        ``key``: the session key the caller opened it with (b"" for callers that send none).
        """
        now = time.monotonic()
        tokens = int(x.shape[1])
        if position == 0:
            if self.draining:
                worker_id = self._engine.worker_id
                raise Unavailable(
                    f"worker {worker_id} is draining; open the session elsewhere", failed_worker_id=worker_id
                )
            self.store.open(session_id, ttl_s or self._default_ttl_s, now, reserve_tokens=tokens, key=key)
        order = self._order.setdefault(session_id, asyncio.Lock())
        async with order:  # a session's steps run one at a time, in arrival order
            cache = self.store.prepare_step(session_id, position, tokens, now, key=key)
            if tokens == 1 and self._batching:
                return await self._decode_batched(x, cache, position)
            stage = self._stage
            result = await self._engine.run(
                lambda: stage.step(x, session_cache=cache, position=position),
                deadline,
                decode=position > 0,  # an open session's step: the reserved lane; an open is new work
                work=(1, tokens),
            )
            return result.value  # type: ignore[return-value]

    async def _decode_batched(self, x: torch.Tensor, cache: SessionCache, position: int) -> torch.Tensor:
        item = _Decode(x, cache, position, asyncio.get_running_loop().create_future())
        with self._queue_lock:
            self._queue.append(item)
            schedule = not self._drain_scheduled
            self._drain_scheduled = True
        if schedule:
            asyncio.create_task(self._drain())
        return await item.done

    async def _drain(self) -> None:
        """One compute job that takes every decode step queued by the time it starts (continuous batching)."""
        stage = self._stage

        def job() -> tuple[list[_Decode], list[torch.Tensor] | BaseException]:
            with self._queue_lock:
                batch, self._queue = self._queue[:MAX_DECODE_BATCH], self._queue[MAX_DECODE_BATCH:]
                self._drain_scheduled = bool(self._queue)
            try:
                return batch, stage.step_batch([(d.x, d.cache, d.position) for d in batch])
            except BaseException as exc:  # noqa: BLE001 - delivered to each waiting step below
                return batch, exc

        try:
            result = await self._engine.run(job, None, decode=True)
        except BaseException as exc:  # noqa: BLE001 - admission refused: fail what is queued
            with self._queue_lock:
                batch, self._queue = self._queue, []
                self._drain_scheduled = False
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(exc)
            return
        batch, outputs = result.value  # type: ignore[misc]
        if self._drain_scheduled:
            asyncio.create_task(self._drain())
        self.batches_run += 1
        self.batched_steps += len(batch)
        for i, item in enumerate(batch):
            if item.done.done():
                continue
            if isinstance(outputs, BaseException):
                item.done.set_exception(outputs)
            else:
                item.done.set_result(outputs[i])

    def close(self, session_id: str, key: bytes = b"") -> bool:
        """Frees the session; PermissionDenied (and nothing freed) if ``key`` is not its owner's."""
        existed = self.store.close(session_id, key)
        self._order.pop(session_id, None)
        return existed

    def begin_drain(self) -> None:
        """Refuses new sessions (position 0) with UNAVAILABLE from now on; open sessions go on stepping."""
        self.draining = True

    async def wait_closed(self, timeout_s: float) -> bool:
        """Waits until every session was closed or expired; False if ``timeout_s`` ran out first."""
        deadline = time.monotonic() + timeout_s
        while self.store.count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(DRAIN_POLL_S, remaining))
        return True

    async def expire_forever(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            for session_id in self.store.expire(time.monotonic()):
                self._order.pop(session_id, None)
                log.info("session %s expired (idle past its TTL); cache freed", session_id)

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.expire_forever(), name="session-expiry")


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
