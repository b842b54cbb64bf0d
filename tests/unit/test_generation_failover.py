"""Router-side generation failover without sockets: a real GenerationService and Pipeline over a fake mesh
whose calls are recorded, so the ids, keys, closes and budget charges of a replay can be checked exactly."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from router.generation import GenerationService
from router.pipeline import Pipeline, PipelineSettings
from router.planning.outlier import OutlierDetector
from router.planning.planner import plan_route, stage_groups
from router.planning.retry_budget import RetryBudget
from router.planning.types import WorkerInfo
from services.errors import NotFound
from services.gen.shardmesh.v1 import router_pb2, worker_pb2
from services.layers import LayerSpan
from services.wire import codec

WORKERS = (
    WorkerInfo("w0", "127.0.0.1:1", "m", "llama", LayerSpan(0, 3), 6, "sum"),
    WorkerInfo("w1", "127.0.0.1:2", "m", "llama", LayerSpan(3, 6), 6, "sum"),
)
VOCAB = 16


class FakeMesh:
    """Answers each session step with logits whose argmax is the step's position; fails chosen calls."""

    def __init__(self, fail_at: dict[int, Exception]) -> None:
        self.calls: list[tuple[str, str, int, bytes]] = []  # worker, session id, position, key
        self.closes: list[tuple[str, str, bytes]] = []
        self._fail_at = fail_at
        self.workers = WORKERS

    def plan(self, *, excluded: frozenset[str] = frozenset(), checksum: str | None = None, start_layer: int = 0) -> Any:
        return plan_route(self.workers, excluded=excluded, checksum=checksum, start_layer=start_layer)

    def stage_groups(self) -> Any:
        return stage_groups(self.workers)

    async def call(self, chosen: list[WorkerInfo], call_id: str, x: torch.Tensor, mask: Any, checksum: str,
                   deadline: float, session: tuple[str, int] | None = None, session_key: bytes = b"",
                   replay_step_lengths: tuple[int, ...] = ()) -> Any:
        assert session is not None and call_id.startswith(session[0])
        self.calls.append((chosen[0].worker_id, session[0], session[1], session_key))
        failure = self._fail_at.pop(len(self.calls), None)
        if failure is not None:
            failure.failed_worker_id = chosen[0].worker_id  # type: ignore[attr-defined]
            raise failure
        if chosen[-1].span.end < chosen[-1].total_layers:  # a hidden state: one row per token, as a real stage
            return worker_pb2.ForwardResponse(output=codec.encode(x.to(torch.float32))), 1.0
        starts = [session[1]]  # a replay's steps: one row per step, as the worker concatenates them
        for n in list(replay_step_lengths)[:-1]:
            starts.append(starts[-1] + n)
        out = torch.zeros(1, len(starts), VOCAB)
        for row, start in enumerate(starts):
            out[0, row, start % VOCAB] = 1.0
        return worker_pb2.ForwardResponse(output=codec.encode(out)), 1.0

    def peer(self, address: str) -> Any:
        async def close(request: worker_pb2.CloseSessionRequest, timeout: float) -> None:
            self.closes.append((address, request.session_id, request.session_key))

        return SimpleNamespace(stub=SimpleNamespace(CloseSession=close))


def _service(mesh: FakeMesh, budget: RetryBudget) -> tuple[GenerationService, Pipeline]:
    pipeline = Pipeline(mesh, mesh, PipelineSettings(hop_timeout_s=1.0, max_attempts=3), OutlierDetector(), budget)  # type: ignore[arg-type]
    pipeline._call = mesh.call  # type: ignore[method-assign]
    return GenerationService(mesh, mesh, pipeline, max_attempts=3), pipeline  # type: ignore[arg-type]


async def _generate(service: GenerationService, max_new_tokens: int = 4) -> router_pb2.GenerateSummary:
    request = router_pb2.GenerateRequest(max_new_tokens=max_new_tokens)
    summary = None
    async for event in service.generate(request, [1, 2, 3], None, time.monotonic() + 30, "client-id", relay=False):
        if event.HasField("summary"):
            summary = event.summary
    await service.aclose()
    assert summary is not None
    return summary


async def test_a_lost_session_is_replayed_with_a_new_key_and_the_old_one_closed_everywhere() -> None:
    mesh = FakeMesh({4: NotFound("unknown session (never opened, closed, or expired)")})  # w1's first decode step
    service, pipeline = _service(mesh, RetryBudget())
    summary = await _generate(service)
    assert summary.failovers == 1 and list(summary.token_ids) == [0, 3, 4, 5]
    old_id, old_key = mesh.calls[0][1], mesh.calls[0][3]
    new_id, new_key = mesh.calls[-1][1], mesh.calls[-1][3]
    assert old_id.startswith(pipeline.nonce + ".") and ":client-id#0" in old_id and new_id.endswith("#1")
    assert len(old_key) == 16 and old_key != new_key
    assert all(key == (old_key if sid == old_id else new_key) for _, sid, _, key in mesh.calls)
    # The replay re-sent every step from position 0 on the same (healthy) route, in one call per stage.
    assert [(w, p) for w, sid, p, _ in mesh.calls if sid == new_id][:4] == [("w0", 0), ("w1", 0), ("w0", 4), ("w1", 4)]
    assert sorted(mesh.closes) == sorted(
        [(w.address, old_id, old_key) for w in WORKERS] + [(w.address, new_id, new_key) for w in WORKERS]
    )
    assert pipeline.outliers.ejected(time.monotonic()) == frozenset()


async def test_replays_are_charged_to_the_retry_budget() -> None:
    mesh = FakeMesh({4: NotFound("unknown session")})
    service, _ = _service(mesh, RetryBudget(ratio=0.0, min_retries_per_s=0.0))
    with pytest.raises(NotFound, match="retry budget is spent"):
        await _generate(service)
    await asyncio.sleep(0)
    assert {sid for _, sid, _ in mesh.closes} == {mesh.calls[0][1]}  # the session is still closed on every worker
