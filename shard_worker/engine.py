"""The worker's compute core: admission control and forward passes off the event loop.

One compute thread per worker: torch already parallelises inside an op, and a single thread keeps a
worker's memory bounded and its latency predictable. Requests beyond ``max_inflight`` are refused with
RESOURCE_EXHAUSTED at once instead of queueing without bound.

Generation steps of open sessions (``decode=True``) have their own lane: ``decode_reserve`` slots above
``max_inflight`` that stateless requests cannot take, and the compute thread runs a queued decode step
before any queued stateless request. A burst of Infer traffic at ``--max-inflight`` therefore delays a
session's next token by at most the compute running now, and never fails it.

A request is bounded before it is admitted (``--max-batch-tokens``), and one whose caller goes away or
whose deadline passes stops between layers (:mod:`services.models.interrupt`), freeing its slot.

Dynamic batching (``--max-batch-size``, ``--max-queue-delay-us``): stateless forwards (:meth:`StageEngine.forward`)
queued when the compute thread frees are run as one forward, chosen by :mod:`shard_worker.batching`
(priority, then deadline; same input kind; padding bounded), then split back per request. With a delay of 0
only what is already queued joins (continuous batching: a lone request never waits); a positive delay lets
the head wait that long for batch-mates. A batch-mate that is cancelled or runs out of time while the batch
computes leaves it (its rows are computed and discarded; it gets its own error); if all leave, the compute
stops between layers. A batch whose forward fails is rerun request by request, so only the failing
request fails. ``--max-batch-size 1`` runs every request alone, bit-identical to one process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from services.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.models.base import StageModel
from services.models.interrupt import Interrupt, interruptible
from services.telemetry import WORKER_COMPUTE_SECONDS, WORKER_QUEUE_SECONDS, observe_batch
from shard_worker.batching import Pending, batch_is_full, select_batch, wait_for_more_s

T = TypeVar("T")

DEFAULT_MAX_BATCH_TOKENS = 32768  # 64 sequences of BERT's 512 tokens; ~2 s of minilm on 2 cores
# Sequences in one batched forward (--max-batch-size). 1 = no batching, the default: outputs stay
# bit-identical to one process, which the chaos checker and several tests compare under concurrency.
DEFAULT_MAX_BATCH_SIZE = 1
DEFAULT_MAX_QUEUE_DELAY_US = 0  # continuous batching: batch only what is already queued


def default_decode_reserve(max_inflight: int) -> int:
    """Slots kept for generation steps: a quarter of --max-inflight, at least 4 (a batched decode job
    carries up to 32 sessions' steps in one slot, so a few slots serve many sessions)."""
    return max(4, max_inflight // 4)


@dataclass(frozen=True)
class StageResult:
    value: object  # what the job returned (the encoded output, usually)
    compute_ms: float
    queue_ms: float
    batch_size: int = 1  # requests that ran in the same forward (dynamic batching)


# What the compute thread hands back through a request's future: (value, started, finished, batch size).
_Done = tuple[Any, float, float, int]
_Queued = tuple["concurrent.futures.Future[_Done]", Callable[[], _Done]]


@dataclass
class _Entry:
    """A queued stateless request: an opaque ``job`` (runs alone) or a batchable forward of ``x``/``mask``
    whose output ``finish`` turns into the request's value (serialisation, in the compute thread)."""

    future: concurrent.futures.Future[_Done]
    interrupt: Interrupt
    enqueued: float
    job: Callable[[], _Done] | None = None
    x: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    finish: Callable[[torch.Tensor], Any] | None = None


class _BatchInterrupt(Interrupt):
    """The interrupt :func:`~services.models.interrupt.checkpoint` sees while a batch computes: a member
    whose own interrupt fires leaves the batch (its error is kept for it); the compute stops only when
    every member has left. For a batch of one this is exactly the member's own interrupt."""

    def __init__(self, members: list[Interrupt]) -> None:
        super().__init__()
        self.members = members
        self.left: list[BaseException | None] = [None] * len(members)

    def check(self) -> None:
        for i, member in enumerate(self.members):
            if self.left[i] is None:
                try:
                    member.check()
                except (Cancelled, DeadlineExceeded) as exc:
                    self.left[i] = exc
        if all(reason is not None for reason in self.left):
            raise self.left[0]  # type: ignore[misc]

    @property
    def all_left(self) -> bool:
        return all(reason is not None for reason in self.left)


class StageEngine:
    """Runs one StageModel for many concurrent requests, one compute job (or batch) at a time."""

    def __init__(
        self,
        stage: StageModel,
        worker_id: str,
        max_inflight: int,
        *,
        decode_reserve: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    ) -> None:
        self.stage = stage
        self.worker_id = worker_id
        self.max_inflight = max_inflight
        self.decode_reserve = default_decode_reserve(max_inflight) if decode_reserve is None else decode_reserve
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.inflight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{worker_id}")
        # Jobs waiting for the compute thread: decode steps first (FIFO), then stateless requests in the
        # order shard_worker.batching gives them. Each submitted _run_next runs one job or one batch.
        self._decode_lane: deque[_Queued] = deque()
        self._lane: list[Pending[_Entry]] = []
        self._arrivals = 0
        self._lanes = threading.Condition()  # new arrivals wake a compute thread waiting for batch-mates

    def check_work(self, batch: int, tokens: int) -> None:
        """Refuses a request larger than one compute may be (memory and time grow with batch x tokens)."""
        if batch * tokens > self.max_batch_tokens:
            raise InvalidArgument(
                f"request of {batch} sequences x {tokens} tokens = {batch * tokens} tokens exceeds worker "
                f"{self.worker_id}'s limit of {self.max_batch_tokens} tokens per request (--max-batch-tokens); "
                "split it into smaller batches"
            )

    def _admit(self, decode: bool) -> None:
        # A draining worker finishes its open sessions (decode steps) but takes no new work.
        if self.draining and not decode:
            raise Unavailable(
                f"worker {self.worker_id} is draining (shutting down); send the request to another replica",
                failed_worker_id=self.worker_id,
            )
        limit = self.max_inflight + (self.decode_reserve if decode else 0)
        if self.inflight >= limit:
            limit_text = f"--max-inflight {self.max_inflight}" + (f" + {self.decode_reserve} for generation" if decode else "")
            raise ResourceExhausted(
                f"worker {self.worker_id} has {self.inflight} requests in flight (limit {limit_text}); "
                "retry later or add replicas"
            )
        self.inflight += 1
        self._idle.clear()

    def _release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def run(
        self,
        job: Callable[[], T],
        deadline: float | None,
        *,
        decode: bool = False,
        work: tuple[int, int] | None = None,
        priority: int = 0,
    ) -> StageResult:
        """Admits, waits for the compute thread, runs ``job`` there (alone), and times it.

        ``deadline`` is a ``time.monotonic()`` instant; a request whose time ran out while queued is
        dropped before it uses the compute thread, and one whose time runs out (or whose caller cancels)
        during compute stops at the next layer. ``decode``: a step of an open generation session (its own
        lane and reserve). ``work``: ``(batch, tokens)``, checked against ``max_batch_tokens`` first.
        ``priority``: the request's level (1 = highest, 0 = unset), for the stateless lane's order.
        ``job`` records its own forward passes in WORKER_BATCH_SIZE (only it knows how many steps it runs).
        The slot is held until the compute thread is done with the job, not merely until the caller left.
        """
        if work is not None:
            self.check_work(*work)
        self._admit(decode)
        interrupt = Interrupt(deadline, self.worker_id)
        enqueued = time.monotonic()

        def timed() -> _Done:
            started = time.monotonic()
            self._check_not_expired(deadline, started, enqueued)
            with torch.inference_mode(), interruptible(interrupt):
                value = job()
            return value, started, time.monotonic(), 1

        future: concurrent.futures.Future[_Done] = concurrent.futures.Future()
        if decode:
            with self._lanes:
                self._decode_lane.append((future, timed))
                self._lanes.notify()
        else:
            entry = _Entry(future, interrupt, enqueued, job=timed)
            self._enqueue(Pending(None, *(work or (1, 1)), priority, deadline, 0, enqueued, entry))
        return await self._await(future, interrupt, enqueued, decode)

    async def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        finish: Callable[[torch.Tensor], T],
        deadline: float | None,
        *,
        priority: int = 0,
    ) -> StageResult:
        """A stateless forward of this stage that may share the compute with other queued ones.

        Like :meth:`run` (admission, ``--max-batch-tokens``, deadline, cancellation), but the stage runs
        ``x``/``attention_mask`` batched with compatible queued requests (:mod:`shard_worker.batching`);
        ``finish(output)`` then runs in the compute thread on this request's own output and its return
        value is the result's ``value``. ``batch_size`` says how many requests shared the forward.
        """
        rows, tokens = int(x.shape[0]), int(x.shape[1])
        self.check_work(rows, tokens)
        self._admit(False)
        interrupt = Interrupt(deadline, self.worker_id)
        enqueued = time.monotonic()
        future: concurrent.futures.Future[_Done] = concurrent.futures.Future()
        entry = _Entry(future, interrupt, enqueued, x=x, mask=attention_mask, finish=finish)
        key = ("forward", x.dtype, tuple(x.shape[2:]))  # same stage, so same model and layers: same input kind
        self._enqueue(Pending(key, rows, tokens, priority, deadline, 0, enqueued, entry))
        return await self._await(future, interrupt, enqueued)

    def _enqueue(self, pending: Pending[_Entry]) -> None:
        with self._lanes:
            self._arrivals += 1
            pending.seq = self._arrivals
            self._lane.append(pending)
            self._lanes.notify()

    async def _await(
        self, future: concurrent.futures.Future[_Done], interrupt: Interrupt, enqueued: float, lane_decode: bool = False
    ) -> StageResult:
        # The admission slot is given back here on the loop once the result is in; only a caller that leaves
        # first hands it to the compute thread's completion (a second wake-up of the loop per request costs
        # ~5 % of a worker's CPU at 16 clients).
        try:
            self._executor.submit(self._run_next)
        except RuntimeError:  # executor shut down: the worker is stopping
            future.cancel()
            self._release()
            raise Unavailable(f"worker {self.worker_id} is shutting down", failed_worker_id=self.worker_id) from None
        try:
            value, started, finished, batch_size = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            interrupt.cancel()  # running: leaves its batch / stops at the next layer; queued: never starts
            future.cancel()
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda _: self._release_from_any_thread(loop))  # at once if already done
            raise
        except BaseException:
            self._release()
            raise
        self._release()
        lane = "decode" if lane_decode else "stateless"
        WORKER_QUEUE_SECONDS.labels(lane=lane).observe(started - enqueued)
        WORKER_COMPUTE_SECONDS.labels(lane=lane).observe(finished - started)
        return StageResult(value, 1000 * (finished - started), 1000 * (started - enqueued), batch_size)

    def _check_not_expired(self, deadline: float | None, now: float, enqueued: float) -> None:
        if deadline is not None and now > deadline:
            raise DeadlineExceeded(
                f"deadline exceeded at hop {self.worker_id} before compute started "
                f"(queued {1000 * (now - enqueued):.0f} ms)",
                failed_worker_id=self.worker_id,
            )

    def _release_from_any_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(self._release)
        except RuntimeError:  # the loop is closed: nothing is left to admit
            pass

    def _run_next(self) -> None:
        """In the compute thread: runs the next decode step, else the next stateless job or batch."""
        while True:
            decode: _Queued | None = None
            with self._lanes:
                if self._decode_lane:
                    decode = self._decode_lane.popleft()
                else:
                    batch = self._take_batch()
                    if batch is None:
                        continue  # waited for batch-mates: choose again
                    if not batch:
                        return
            if decode is not None:
                future, job = decode
                if not future.set_running_or_notify_cancel():
                    continue  # its caller left while it was queued
                _settle(future, job)
                return
            if self._run_batch(batch):
                return

    def _take_batch(self) -> list[_Entry] | None:
        """Under the lanes lock: removes and returns the next batch ([] = nothing queued), or waits up to
        --max-queue-delay-us for batch-mates and returns None."""
        self._lane = [p for p in self._lane if not p.payload.future.cancelled()]  # callers that left
        chosen = select_batch(self._lane, max_batch_size=self.max_batch_size, max_batch_tokens=self.max_batch_tokens)
        if not chosen:
            return []
        if self.max_queue_delay_s > 0 and not batch_is_full(self._lane, chosen, self.max_batch_size):
            wait = wait_for_more_s(self._lane[chosen[0]], time.monotonic(), self.max_queue_delay_s)
            if wait > 0:
                self._lanes.wait(wait)
                return None
        taken = set(chosen)
        batch = [self._lane[i].payload for i in chosen]
        self._lane = [p for i, p in enumerate(self._lane) if i not in taken]
        return batch

    def _run_batch(self, batch: list[_Entry]) -> bool:
        """Runs one opaque job or one batch of forwards; False if every request had left before it started."""
        started = time.monotonic()
        members = []
        for entry in batch:
            if not entry.future.set_running_or_notify_cancel():
                continue  # its caller left while it was queued
            if entry.job is None:  # (an opaque job checks its own deadline)
                try:
                    self._check_not_expired(entry.interrupt.deadline, started, entry.enqueued)
                except DeadlineExceeded as exc:
                    entry.future.set_exception(exc)
                    continue
            members.append(entry)
        if not members:
            return False
        if members[0].job is not None:  # an opaque job: always alone (it records its own batch sizes)
            _settle(members[0].future, members[0].job)
            return True
        observe_batch("stateless", len(members))
        gate = _BatchInterrupt([m.interrupt for m in members])
        outputs: list[torch.Tensor | BaseException | None]
        with torch.inference_mode(), interruptible(gate):
            try:
                outputs = list(self.stage.forward_batch([(m.x, m.mask) for m in members]))  # type: ignore[misc]
            except BaseException as exc:  # noqa: BLE001 - every member's future must be settled
                if gate.all_left:  # all callers left (or ran out of time): the compute stopped early
                    outputs = [None] * len(members)
                elif len(members) == 1 or not isinstance(exc, Exception):
                    outputs = [exc] * len(members)
                else:  # a batch failed: find out whose request it was
                    outputs = self._solo_each(members, gate)
        for member, output, left in zip(members, outputs, gate.left, strict=True):
            if left is not None:
                member.future.set_exception(left)
            elif isinstance(output, BaseException):
                member.future.set_exception(output)
            else:
                finish = member.finish
                assert finish is not None and output is not None
                _settle(member.future, lambda f=finish, o=output: (f(o), started, time.monotonic(), len(members)))
        return True

    def _solo_each(self, members: list[_Entry], gate: _BatchInterrupt) -> list[torch.Tensor | BaseException | None]:
        """After a batched forward failed: each remaining member alone, so only a failing one fails."""
        outputs: list[torch.Tensor | BaseException | None] = []
        for i, member in enumerate(members):
            if gate.left[i] is not None:
                outputs.append(None)
                continue
            try:
                with interruptible(member.interrupt):
                    outputs.append(self.stage.forward(member.x, member.mask))  # type: ignore[arg-type]
            except (Cancelled, DeadlineExceeded) as exc:
                gate.left[i] = exc
                outputs.append(None)
            except Exception as exc:  # noqa: BLE001 - delivered to this member only
                outputs.append(exc)
        return outputs

    async def drain(self, grace_s: float) -> bool:
        """Refuses new requests and waits for in-flight ones; returns whether all finished in time."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lanes:
            queued = [future for future, _ in self._decode_lane] + [p.payload.future for p in self._lane]
            self._decode_lane.clear()
            self._lane.clear()
            self._lanes.notify_all()
        for future in queued:
            future.cancel()


def _settle(future: concurrent.futures.Future[_Done], job: Callable[[], _Done]) -> None:
    """Runs ``job`` for a future already marked running and delivers its result or exception."""
    try:
        future.set_result(job())
    except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting request
        future.set_exception(exc)
