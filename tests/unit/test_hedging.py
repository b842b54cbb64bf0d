"""Hedged hops without sockets: the loser of a race is cancelled and never counted as its worker's failure,
and a request cancelled while it waits for the hedge delay cancels its call instead of leaving it running."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import torch

from router.pipeline import Pipeline, PipelineSettings
from router.planning.outlier import OutlierConfig, OutlierDetector
from router.planning.retry_budget import RetryBudget
from router.planning.types import WorkerInfo
from router.planning.planner import stage_groups
from services.gen.shardmesh.v1 import worker_pb2
from services.layers import LayerSpan

A = WorkerInfo("a", "127.0.0.1:1", "m", "llama", LayerSpan(0, 6), 6, "sum")
B = WorkerInfo("b", "127.0.0.1:2", "m", "llama", LayerSpan(0, 6), 6, "sum")


def _pipeline(hedge_after_s: float, delays: dict[str, float], outcomes: dict[str, str]) -> Pipeline:
    pipeline = Pipeline(
        SimpleNamespace(workers=(A, B), stage_groups=lambda: stage_groups((A, B))),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        PipelineSettings(hop_timeout_s=1.0, max_attempts=3, hedge_after_s=hedge_after_s),
        OutlierDetector(OutlierConfig(consecutive_failures=1)),
        RetryBudget(),
    )

    async def call(chosen: list[WorkerInfo], *args: Any, **kwargs: Any) -> tuple[worker_pb2.ForwardResponse, float]:
        worker = chosen[0].worker_id
        try:
            await asyncio.sleep(delays[worker])
        except asyncio.CancelledError:
            outcomes[worker] = "cancelled"
            raise
        outcomes[worker] = "answered"
        return worker_pb2.ForwardResponse(), delays[worker] * 1000

    pipeline._call = call  # type: ignore[method-assign]
    return pipeline


async def test_the_cancelled_loser_of_a_hedge_is_not_a_failure() -> None:
    for _ in range(20):
        outcomes: dict[str, str] = {}
        pipeline = _pipeline(0.001, {"a": 0.3, "b": 0.005}, outcomes)
        failed: set[str] = set()
        _, _, winner = await pipeline._hedged(A, [B], "id", torch.zeros(1), None, "sum", time.monotonic() + 5, failed)
        await asyncio.sleep(0.01)
        assert winner is B and outcomes == {"a": "cancelled", "b": "answered"}
        assert failed == set() and pipeline.outliers.ejected(time.monotonic()) == frozenset()


async def test_a_request_cancelled_during_the_hedge_delay_cancels_its_call() -> None:
    outcomes: dict[str, str] = {}
    pipeline = _pipeline(10.0, {"a": 0.3, "b": 0.3}, outcomes)
    request = asyncio.create_task(
        pipeline._hedged(A, [B], "id", torch.zeros(1), None, "sum", time.monotonic() + 5, set())
    )
    await asyncio.sleep(0.05)
    request.cancel()
    await asyncio.sleep(0.01)
    assert outcomes == {"a": "cancelled"}


async def test_answers_that_lose_the_race_free_their_shared_memory() -> None:
    """Both replicas answer with a shared-memory output at once: the winner's is handed over, every other
    one is released (they were dropped before, leaking one segment per double answer)."""
    from services.wire import placement, shm

    if not shm.shm_available():
        return
    big = torch.zeros(1 << 19)  # 2 MiB: above the shared-memory threshold
    handles: dict[str, str] = {}
    pipeline = _pipeline(0.0001, {"a": 0.01, "b": 0.01}, {})

    gate: asyncio.Future[None] | None = None

    async def call(chosen: list[WorkerInfo], call_id: str, *args: Any, **kwargs: Any) -> tuple[worker_pb2.ForwardResponse, float]:
        assert gate is not None
        await gate  # both calls wake in the same loop turn: both answers arrive together
        response = worker_pb2.ForwardResponse(output=placement.pack(big, colocated=True, request_id=call_id))
        handles[chosen[0].worker_id] = response.output.shm_handle
        return response, 10.0

    pipeline._call = call  # type: ignore[method-assign]
    for _ in range(5):
        handles.clear()
        gate = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, gate.set_result, None)
        response, _, winner = await pipeline._hedged(A, [B], "id", torch.zeros(1), None, "sum", time.monotonic() + 5, set())
        await asyncio.sleep(0.05)  # the loser finishes after the winner returned
        assert set(handles) == {"a", "b"}
        loser = handles["b" if winner is A else "a"]
        assert response.output.shm_handle == handles[winner.worker_id]
        assert (shm.SHM_DIR / handles[winner.worker_id]).exists()
        assert not (shm.SHM_DIR / loser).exists(), "the losing answer's segment leaked"
        placement.release(response.output)


def test_fixed_hedge_delay_ignores_the_recent_p95() -> None:
    adaptive = _pipeline(0.001, {}, {})
    fixed = Pipeline(
        SimpleNamespace(workers=(A, B), stage_groups=lambda: stage_groups((A, B))),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        PipelineSettings(hop_timeout_s=1.0, max_attempts=3, hedge_after_s=0.001, hedge_fixed=True),
        OutlierDetector(),
        RetryBudget(),
    )
    for pipeline in (adaptive, fixed):
        for _ in range(20):
            pipeline._stats("a").observe(0.2, time.monotonic())
    assert adaptive._hedge_delay(A) == 0.2
    assert fixed._hedge_delay(A) == 0.001
