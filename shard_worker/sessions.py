"""Generation sessions on a worker: one KV cache per session for this stage's layers, steps in order,
continuous batching of concurrent sessions' decode steps into one forward pass, batched prefills, and
automatic prefix caching (:mod:`services.models.prefix_cache`).

Prefills (position 0, several tokens) that are queued together run as one right-padded forward pass:
sorted by length, a group holds rows whose lengths differ by at most ``max(PREFILL_PAD_TOKENS, 1/4 of
the shortest)``, so no row is padded by more than that, and at most ``MAX_PREFILL_BATCH`` rows and
``--max-batch-tokens`` padded tokens. A prompt whose leading blocks are cached restores their keys and
values and computes only the rest. ``batching=False`` (``--no-batching``) runs every step alone and
turns the prefix cache off: each step is then the same computation as in one process, bit for bit.

Position 0 opens a session; every later step names the position it starts at and is refused if the
cache holds a different number of tokens (no silent off-by-one after a failover: the router replays
on a fresh session instead). A session belongs to the key it was opened with (``session_key``): steps
and closes with another key are PERMISSION_DENIED. A draining worker opens no new sessions but lets
open ones finish (:meth:`SessionService.begin_drain`, :meth:`SessionService.wait_closed`).

A router's replay after a failover sends a session's whole step log in one request
(:meth:`SessionService.replay`). With ``batching=False`` its steps run one by one, each on its own slice as a
lone step ran (the cache ends bit-identical), a few per compute job. With batching on, the steps already ran in
batches, so their caches hold batch rounding anyway: consecutive steps run as one chunk (:func:`replay_chunks`),
a prefill of their tokens at once, which gives the same cache within float rounding for the cost of about one
step instead of one per step (a failover's replay is the part of its delay that grows with the session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from services.errors import FailedPrecondition, ResourceExhausted, Unavailable
from services.models.base import StageModel
from services.models.interrupt import interruptible
from services.models.kv_cache import SessionCache, SessionCacheStore
from services.models.prefix_cache import DEFAULT_BLOCK_TOKENS, PrefixCache, joined_kv, joined_output
from services.telemetry import (
    KV_CACHE_BUDGET_BYTES, KV_CACHE_BYTES, KV_CACHE_PREFIX_BYTES, SESSIONS, SESSIONS_EXPIRED, observe_batch, step_kind, watch,
)
from shard_worker.cohorts import DecodeCohorts
from shard_worker.engine import StageEngine

log = logging.getLogger(__name__)

EXPIRY_INTERVAL_S = 1.0
DRAIN_POLL_S = 0.05
MAX_DECODE_BATCH = 32
MAX_PREFILL_BATCH = 16
# Intra-op threads for a batch of decode steps. Its matrix products are a few rows by the weights: memory
# bound, so a second thread gains little, while an OpenMP barrier stalls for a whole scheduler slice when
# the cores are shared (several workers, a router, other load on one host). Measured on the 2-core dev
# host under load: one SmolLM2 linear for 8 rows took 1.3 ms on one thread, 64-120 ms on two.
DECODE_THREADS = 1
PREFILL_PAD_TOKENS = 32  # padding bound of a batched prefill row: max(this, a quarter of the shortest row)
# A replay (ForwardRequest.replay_step_lengths) runs its steps in compute jobs of about this long: one queue
# wait per job instead of one per step, while other requests still get the compute thread between its jobs.
REPLAY_JOB_S = 0.02
# With batching on, consecutive replayed steps run as one forward of at most this many tokens (a step longer
# than that, e.g. a long prompt, runs alone as it first did): a prefill-sized chunk, so one chunk's compute stays
# about one prompt's while a long session's replay is a few forwards instead of one per token.
REPLAY_CHUNK_TOKENS = 512
# Before a decode batch starts, it waits for the sessions :mod:`shard_worker.cohorts` expects, at most this
# share of the last decode batch's compute time and never more than DECODE_GATHER_MAX_S: a wait no longer
# than the batch it saves (a step of a few rows costs about what a one-row step does). A cohort's steps come
# back within a few ms of each other; a lone session never waits.
DECODE_GATHER_SHARE = 1.0
DECODE_GATHER_MAX_S = 0.05


@dataclass
class _Decode:
    x: torch.Tensor
    cache: SessionCache
    position: int
    done: asyncio.Future[torch.Tensor]


@dataclass(eq=False)
class _Prefill:
    x: torch.Tensor
    cache: SessionCache
    taken: bool = False  # claimed by a compute job (its own or an earlier one)
    output: torch.Tensor | None = None
    error: BaseException | None = None
    cached_tokens: int = 0  # prompt positions restored from the prefix cache


def prefill_groups(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices of prefills to run together: sorted by length, each group's longest row at most
    ``max(PREFILL_PAD_TOKENS, shortest // 4)`` longer than its shortest, ``max_rows`` rows and
    ``max_tokens`` padded tokens (a row longer than that still runs, alone)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        group = groups[-1] if groups else None
        if group is not None:
            shortest, n = lengths[group[0]], lengths[i]
            if (
                n - shortest <= max(PREFILL_PAD_TOKENS, shortest // 4)
                and len(group) < max_rows
                and (len(group) + 1) * n <= max_tokens
            ):
                group.append(i)
                continue
        groups.append([i])
    return groups


def replay_chunks(lengths: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive steps (``lengths`` tokens each) grouped into ``[first, end)`` ranges of at most ``max_tokens``
    tokens; a step longer than that is a range of its own. ``max_tokens`` <= 1: every step alone."""
    chunks: list[tuple[int, int]] = []
    first, tokens = 0, 0
    for i, n in enumerate(lengths):
        if i > first and tokens + n > max_tokens:
            chunks.append((first, i))
            first, tokens = i, 0
        tokens += n
    if lengths:
        chunks.append((first, len(lengths)))
    return chunks


class SessionService:
    def __init__(
        self,
        stage: StageModel,
        engine: StageEngine,
        *,
        budget_bytes: int,
        default_ttl_s: float,
        batching: bool = True,
        prefix_cache: bool = True,
        prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS,
    ) -> None:
        if not hasattr(stage, "step"):
            raise FailedPrecondition(f"model {stage.source.model_id} ({stage.source.architecture}) has no generation sessions")
        self._stage: Any = stage
        self._engine = engine
        prefix = PrefixCache(prefix_block_tokens) if prefix_cache and batching else None
        self.store = SessionCacheStore(budget_bytes, stage.kv_bytes_per_token, prefix)  # type: ignore[attr-defined]
        store = self.store  # read at scrape time (thread-safe: the store locks), not on the request path
        watch(KV_CACHE_BYTES, lambda: store.bytes_used)
        watch(KV_CACHE_PREFIX_BYTES, lambda: store.prefix_bytes)
        watch(KV_CACHE_BUDGET_BYTES, lambda: store.budget_bytes)
        watch(SESSIONS, lambda: store.count)
        self._default_ttl_s = default_ttl_s
        self._batching = batching
        self._order: dict[str, asyncio.Lock] = {}
        self._queue: list[_Decode] = []
        # The compute thread takes the queue (after waiting for cohorts); the loop appends and notifies.
        self._queue_lock = threading.Condition()
        self._cohorts = DecodeCohorts()
        self._decode_s = 0.0  # compute time of the last decode batch (sizes the cohort wait)
        self._prefills: list[_Prefill] = []
        self.prefill_batches = 0  # forward passes that ran more than one prefill
        self.prefix_tokens_reused = 0
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
            self._open(session_id, ttl_s, now, tokens, key)
        order = self._order.setdefault(session_id, asyncio.Lock())
        async with order:  # a session's steps run one at a time, in arrival order
            cache = self.store.prepare_step(session_id, position, tokens, now, key=key)
            if tokens == 1 and self._batching:
                return await self._decode_batched(x, cache, position)
            if position == 0 and self._batching:
                return await self._prefill(x, cache, deadline)
            stage = self._stage

            def job() -> torch.Tensor:
                observe_batch(step_kind(tokens), 1)  # a step alone
                return stage.step(x, session_cache=cache, position=position)

            result = await self._engine.run(
                job,
                deadline,
                decode=position > 0,  # an open session's step: the reserved lane; an open is new work
                work=(1, tokens),
            )
            return result.value  # type: ignore[return-value]

    def _open(self, session_id: str, ttl_s: float, now: float, tokens: int, key: bytes) -> None:
        """Opens a session at its first step (a lone step's or a replay's); a draining worker opens none."""
        if self.draining:
            worker_id = self._engine.worker_id
            raise Unavailable(f"worker {worker_id} is draining; open the session elsewhere", failed_worker_id=worker_id)
        self.store.open(session_id, ttl_s or self._default_ttl_s, now, reserve_tokens=tokens, key=key)

    async def replay(
        self,
        session_id: str,
        position: int,
        ttl_s: float,
        x: torch.Tensor,
        lengths: list[int],
        deadline: float | None,
        key: bytes = b"",
    ) -> list[torch.Tensor]:
        """Runs a replay's steps (``lengths`` tokens each, the first at ``position``) in order; their outputs
        (one per step, each as that step alone returns it).

        ``batching=False``: each step runs as a step alone does (``stage.step`` on its own slice and position: the
        shapes it first ran with, so the cache ends as it was). Batching on: consecutive steps run as one chunk
        (:func:`replay_chunks`; the last stage returns each step's last-position logits). Either way several
        units per compute job: a replay waits for the compute thread once per ``REPLAY_JOB_S`` of work, not once
        per unit, and queued work still runs between its jobs.
        """
        if position == 0:
            self._open(session_id, ttl_s, time.monotonic(), lengths[0], key)
        starts = [position]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        stage, batching = self._stage, self._batching
        units = replay_chunks(lengths, min(REPLAY_CHUNK_TOKENS, self._engine.max_batch_tokens) if batching else 0)
        outputs: list[torch.Tensor] = []
        order = self._order.setdefault(session_id, asyncio.Lock())

        def run_unit(first: int, end: int, cache: SessionCache) -> list[torch.Tensor]:
            offset, tokens = starts[first] - position, sum(lengths[first:end])
            chunk = x[:, offset : offset + tokens]
            observe_batch(step_kind(tokens), 1)  # one forward: a replayed step alone, or a chunk as a prefill
            if end - first == 1:
                decode = lengths[first] == 1 and batching  # as _decode_batched runs it (its thread count)
                with intra_op_threads(DECODE_THREADS) if decode else contextlib.nullcontext():
                    return [stage.step(chunk, session_cache=cache, position=starts[first])]
            ends = [starts[i] + lengths[i] - 1 - starts[first] for i in range(first, end)]
            out = stage.step(chunk, session_cache=cache, position=starts[first], logit_rows=ends)
            if out.shape[1] == tokens:  # a row per token (hidden states)
                return list(out.split(lengths[first:end], dim=1))
            return list(out.split(1, dim=1))  # the last stage: a row of logits per step

        async with order:
            done_units = 0
            while done_units < len(units):
                first = units[done_units][0]
                cache = self.store.prepare_step(session_id, starts[first], sum(lengths[first:]), time.monotonic(), key=key)

                def job(next_unit: int = done_units, cache: SessionCache = cache) -> list[list[torch.Tensor]]:
                    began, done = time.monotonic(), []
                    for unit_first, unit_end in units[next_unit:]:
                        done.append(run_unit(unit_first, unit_end, cache))
                        if time.monotonic() - began >= REPLAY_JOB_S:
                            break
                    return done

                result = await self._engine.run(
                    job, deadline, decode=starts[first] > 0, work=(1, max(sum(lengths[a:b]) for a, b in units[done_units:]))
                )
                for unit_outputs in result.value:  # type: ignore[union-attr]
                    outputs.extend(unit_outputs)
                done_units += len(result.value)  # type: ignore[arg-type]
        return outputs

    async def _decode_batched(self, x: torch.Tensor, cache: SessionCache, position: int) -> torch.Tensor:
        item = _Decode(x, cache, position, asyncio.get_running_loop().create_future())
        with self._queue_lock:
            self._queue.append(item)
            self._queue_lock.notify()
            schedule = not self._drain_scheduled
            self._drain_scheduled = True
        if schedule:
            asyncio.create_task(self._drain())
        return await item.done

    async def _drain(self) -> None:
        """One compute job that takes every decode step queued by the time it starts (continuous batching)."""
        stage = self._stage

        def job() -> tuple[list[_Decode], list[torch.Tensor] | BaseException, bool]:
            with self._queue_lock:
                self._gather_cohorts()
                batch, self._queue = self._queue[:MAX_DECODE_BATCH], self._queue[MAX_DECODE_BATCH:]
                # Steps left over (more than one batch) are this drain's to schedule; a step that arrives
                # from now on schedules its own.
                leftover = self._drain_scheduled = bool(self._queue)
                self._cohorts.ran((d.cache.session_id for d in batch), time.monotonic())
            if not batch:
                return batch, [], leftover
            observe_batch("decode", len(batch))  # every session's step in one forward pass
            began = time.monotonic()
            try:
                with intra_op_threads(DECODE_THREADS):
                    return batch, stage.step_batch([(d.x, d.cache, d.position) for d in batch]), leftover
            except BaseException as exc:  # noqa: BLE001 - delivered to each waiting step below
                return batch, exc, leftover
            finally:
                self._decode_s = time.monotonic() - began

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
        batch, outputs, leftover = result.value  # type: ignore[misc]
        if leftover:
            asyncio.create_task(self._drain())
        self.batches_run += bool(batch)
        self.batched_steps += len(batch)
        for i, item in enumerate(batch):
            if item.done.done():
                continue
            if isinstance(outputs, BaseException):
                item.done.set_exception(outputs)
            else:
                item.done.set_result(outputs[i])

    def _gather_cohorts(self) -> None:
        """In the compute thread, holding the queue lock: waits (bounded) for the sessions the queued steps'
        cohorts expect (:class:`DecodeCohorts`), so a group that ran together stays one batch at every stage."""
        start = time.monotonic()
        deadline = start + min(DECODE_GATHER_MAX_S, DECODE_GATHER_SHARE * self._decode_s)
        while len(self._queue) < MAX_DECODE_BATCH and self._cohorts.awaited(
            (d.cache.session_id for d in self._queue), start, deadline
        ):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._queue_lock.wait(remaining)

    async def _prefill(self, x: torch.Tensor, cache: SessionCache, deadline: float | None) -> torch.Tensor:
        """Queues this prefill; the first compute job to start runs every prefill queued by then.

        Each prefill is admitted as its own request (slot, deadline, work limit); a job that finds its
        prefill already done by an earlier job returns at once. A batch of several sessions is not
        interrupted by one caller's cancellation or deadline (the others still want their results).
        """
        item = _Prefill(x, cache)
        with self._queue_lock:
            self._prefills.append(item)

        def job() -> None:
            with self._queue_lock:
                batch = [p for p in self._prefills if not p.taken]
                for p in batch:
                    p.taken = True
                self._prefills = []
            if batch == [item]:
                self._run_prefills(batch)
            elif batch:
                with interruptible(None):
                    self._run_prefills(batch)

        try:
            await self._engine.run(job, deadline, work=(1, int(x.shape[1])))
        finally:
            with self._queue_lock:
                if not item.taken:  # refused, timed out or cancelled before any job took it
                    item.taken = True
                    self._prefills = [p for p in self._prefills if p is not item]
        if item.error is not None:
            raise item.error
        if item.output is None:
            raise ResourceExhausted("prefill was dropped before it ran; retry")  # not reached: a job took it
        return item.output

    def _run_prefills(self, batch: list[_Prefill]) -> None:
        """In the compute thread: prefix-cache hits compute their suffix alone; the rest run in padded groups."""
        stage, store = self._stage, self.store
        digests: dict[int, list[bytes]] = {}
        plain: list[_Prefill] = []
        for item in batch:
            item_digests, blocks = store.prefix_match(item.x)
            digests[id(item)] = item_digests
            block_tokens = store.prefix.block_tokens if store.prefix is not None else 0
            hit = min(len(blocks) * block_tokens, int(item.x.shape[1]) - 1)  # the last position is always computed
            if hit <= 0:
                plain.append(item)
                continue
            observe_batch("prefill", 1)  # the uncached suffix, alone
            try:
                item.cache.restore(joined_kv(blocks, hit))
                out = stage.step(item.x[:, hit:], session_cache=item.cache, position=hit)
                head = joined_output(blocks, hit)
                item.output = torch.cat([head, out], dim=1) if head is not None and not stage.is_last else out
                item.cached_tokens = hit
                self.prefix_tokens_reused += hit
            except BaseException as exc:  # noqa: BLE001 - delivered to this prefill's caller
                item.cache.rollback(0)
                item.error = exc
        lengths = [int(p.x.shape[1]) for p in plain]
        for group in prefill_groups(lengths, MAX_PREFILL_BATCH, self._engine.max_batch_tokens):
            items = [plain[i] for i in group]
            observe_batch("prefill", len(items))
            try:
                outputs = stage.prefill_batch([(p.x, p.cache) for p in items])
            except BaseException as exc:  # noqa: BLE001 - every prefill of the group gets it (caches rolled back)
                for p in items:
                    p.error = exc
                continue
            if len(items) > 1:
                self.prefill_batches += 1
            for p, out in zip(items, outputs, strict=True):
                p.output = out
        for item in batch:
            if item.error is None and item.output is not None and store.prefix is not None:
                store.prefix_insert(item.x, digests[id(item)], item.cache, None if stage.is_last else item.output)

    def close(self, session_id: str, key: bytes = b"") -> bool:
        """Frees the session; PermissionDenied (and nothing freed) if ``key`` is not its owner's."""
        existed = self.store.close(session_id, key)
        self._order.pop(session_id, None)
        with self._queue_lock:
            self._cohorts.forget(session_id)
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
                with self._queue_lock:
                    self._cohorts.forget(session_id)
                SESSIONS_EXPIRED.inc()
                log.info("session %s expired (idle past its TTL); cache freed", session_id)

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.expire_forever(), name="session-expiry")


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Runs the block with at most ``n`` torch intra-op threads (in this compute thread), then restores."""
    previous = torch.get_num_threads()
    if previous <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
