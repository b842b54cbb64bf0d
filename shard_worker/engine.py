"""The worker's compute core: admission control and forward passes off the event loop.

One compute thread per worker: torch already parallelises inside an op, and a single thread keeps a
worker's memory bounded and its latency predictable. Requests beyond ``max_inflight`` are refused with
RESOURCE_EXHAUSTED at once instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from services.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.models.base import StageModel

T = TypeVar("T")


@dataclass(frozen=True)
class StageResult:
    value: object  # what the job returned (the encoded output, usually)
    compute_ms: float
    queue_ms: float


class StageEngine:
    """Runs one StageModel for many concurrent requests, one compute job at a time."""

    def __init__(self, stage: StageModel, worker_id: str, max_inflight: int) -> None:
        self.stage = stage
        self.worker_id = worker_id
        self.max_inflight = max_inflight
        self.inflight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{worker_id}")

    def _admit(self) -> None:
        if self.draining:
            raise Unavailable(
                f"worker {self.worker_id} is draining (shutting down); send the request to another replica",
                failed_worker_id=self.worker_id,
            )
        if self.inflight >= self.max_inflight:
            raise ResourceExhausted(
                f"worker {self.worker_id} has {self.inflight} requests in flight (limit --max-inflight "
                f"{self.max_inflight}); retry later or add replicas"
            )
        self.inflight += 1
        self._idle.clear()

    def _release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def run(self, job: Callable[[], T], deadline: float | None) -> StageResult:
        """Admits, waits for the compute thread, runs ``job`` there, and times it.

        ``deadline`` is a ``time.monotonic()`` instant; a request whose time ran out while queued is
        dropped before it uses the compute thread.
        """
        self._admit()
        try:
            enqueued = time.monotonic()
            loop = asyncio.get_running_loop()

            def timed() -> tuple[T, float, float]:
                started = time.monotonic()
                if deadline is not None and started > deadline:
                    raise DeadlineExceeded(
                        f"deadline exceeded at hop {self.worker_id} before compute started "
                        f"(queued {1000 * (started - enqueued):.0f} ms)",
                        failed_worker_id=self.worker_id,
                    )
                with torch.inference_mode():
                    value = job()
                return value, started, time.monotonic()

            value, started, finished = await loop.run_in_executor(self._executor, timed)
            return StageResult(value, 1000 * (finished - started), 1000 * (started - enqueued))
        finally:
            self._release()

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
