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

from services.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.models.base import StageModel
from services.models.interrupt import Interrupt, interruptible

T = TypeVar("T")

DEFAULT_MAX_BATCH_TOKENS = 32768  # 64 sequences of BERT's 512 tokens; ~2 s of minilm on 2 cores


def default_decode_reserve(max_inflight: int) -> int:
    """Slots kept for generation steps: a quarter of --max-inflight, at least 4 (a batched decode job
    carries up to 32 sessions' steps in one slot, so a few slots serve many sessions)."""
    return max(4, max_inflight // 4)


@dataclass(frozen=True)
class StageResult:
    value: object  # what the job returned (the encoded output, usually)
    compute_ms: float
    queue_ms: float


_Queued = tuple["concurrent.futures.Future[Any]", Callable[[], Any]]


class StageEngine:
    """Runs one StageModel for many concurrent requests, one compute job at a time."""

    def __init__(
        self,
        stage: StageModel,
        worker_id: str,
        max_inflight: int,
        *,
        decode_reserve: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> None:
        self.stage = stage
        self.worker_id = worker_id
        self.max_inflight = max_inflight
        self.decode_reserve = default_decode_reserve(max_inflight) if decode_reserve is None else decode_reserve
        self.max_batch_tokens = max_batch_tokens
        self.inflight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{worker_id}")
        # Jobs waiting for the compute thread, decode steps first; each submitted _run_next takes one.
        self._decode_lane: deque[_Queued] = deque()
        self._lane: deque[_Queued] = deque()
        self._lanes_lock = threading.Lock()

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
    ) -> StageResult:
        """Admits, waits for the compute thread, runs ``job`` there, and times it.

        ``deadline`` is a ``time.monotonic()`` instant; a request whose time ran out while queued is
        dropped before it uses the compute thread, and one whose time runs out (or whose caller cancels)
        during compute stops at the next layer. ``decode``: a step of an open generation session (its own
        lane and reserve). ``work``: ``(batch, tokens)``, checked against ``max_batch_tokens`` first.
        The slot is held until the compute thread is done with the job, not merely until the caller left.
        """
        if work is not None:
            self.check_work(*work)
        self._admit(decode)
        loop = asyncio.get_running_loop()
        interrupt = Interrupt(deadline, self.worker_id)
        enqueued = time.monotonic()

        def timed() -> tuple[T, float, float]:
            started = time.monotonic()
            if deadline is not None and started > deadline:
                raise DeadlineExceeded(
                    f"deadline exceeded at hop {self.worker_id} before compute started "
                    f"(queued {1000 * (started - enqueued):.0f} ms)",
                    failed_worker_id=self.worker_id,
                )
            with torch.inference_mode(), interruptible(interrupt):
                value = job()
            return value, started, time.monotonic()

        future: concurrent.futures.Future[tuple[T, float, float]] = concurrent.futures.Future()
        future.add_done_callback(lambda _: self._release_from_any_thread(loop))
        with self._lanes_lock:
            (self._decode_lane if decode else self._lane).append((future, timed))
        try:
            self._executor.submit(self._run_next)
        except RuntimeError:  # executor shut down: the worker is stopping
            future.cancel()
            raise Unavailable(f"worker {self.worker_id} is shutting down", failed_worker_id=self.worker_id) from None
        try:
            value, started, finished = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            interrupt.cancel()  # running: stops at the next layer; queued: never starts
            future.cancel()
            raise
        return StageResult(value, 1000 * (finished - started), 1000 * (started - enqueued))

    def _release_from_any_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(self._release)
        except RuntimeError:  # the loop is closed: nothing is left to admit
            pass

    def _run_next(self) -> None:
        """In the compute thread: runs the first queued job that was not cancelled, decode lane first."""
        while True:
            with self._lanes_lock:
                lane = self._decode_lane or self._lane
                if not lane:
                    return
                future, job = lane.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # its caller left while it was queued
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting request
                future.set_exception(exc)
            return

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
        with self._lanes_lock:
            queued = [*self._decode_lane, *self._lane]
            self._decode_lane.clear()
            self._lane.clear()
        for future, _ in queued:
            future.cancel()
