"""Issue 11, direct mode: the router hands a stage's inline output to the next stage as it came (no decode,
no re-encode), keeps that message to fail over with, and answers the client with the last stage's bytes.

The workers are fakes behind the pool's ``stream_to`` so every ForwardRequest the router sends is visible;
the real-process direct-mode tests (tests/integration) check the outputs against one process.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from router import pipeline as pipeline_module
from router.pipeline import Pipeline, PipelineSettings
from router.planning.outlier import OutlierConfig, OutlierDetector
from router.planning.planner import plan_route, stage_groups
from router.planning.retry_budget import RetryBudget
from router.planning.types import WorkerInfo
from services.errors import Unavailable
from services.gen.shardmesh.v1 import worker_pb2
from services.layers import LayerSpan
from services.wire import codec


def _worker(worker_id: str, start: int, end: int) -> WorkerInfo:
    return WorkerInfo(worker_id, f"10.0.0.{len(worker_id)}:5000", "m", "llama", LayerSpan(start, end), 6, "sum")


W0, W1, W1B, W2 = _worker("a", 0, 2), _worker("bb", 2, 4), _worker("bbb", 2, 4), _worker("cccc", 4, 6)


def _pipeline(sent: list[tuple[str, worker_pb2.ForwardRequest]], fail_once: set[str]) -> Pipeline:
    workers = (W0, W1, W1B, W2)
    topology = SimpleNamespace(
        workers=workers,
        plan=lambda excluded=frozenset(), start_layer=0, checksum=None: plan_route(
            workers, excluded=excluded, start_layer=start_layer, checksum=checksum),
        joins=lambda worker_id: 0,
        stage_groups=lambda: stage_groups(workers),
    )

    class Stream:
        def __init__(self, worker: WorkerInfo) -> None:
            self.worker = worker

        async def call(self, request: worker_pb2.ForwardRequest, timeout: float) -> Any:
            sent.append((self.worker.worker_id, request))
            if self.worker.worker_id in fail_once:
                fail_once.discard(self.worker.worker_id)
                raise Unavailable("connection reset", failed_worker_id=self.worker.worker_id)
            x = codec.decode(request.input, field="input", max_bytes=1 << 30)
            out = (x.float() if not x.is_floating_point() else x) + self.worker.span.end  # a stage "computes"
            out = out.unsqueeze(-1).expand(*out.shape, 3).contiguous() if out.dim() == 2 else out
            response = worker_pb2.ForwardResponse(output=codec.encode(out))
            response.hops.add(worker_id=self.worker.worker_id)
            return response

    return Pipeline(
        topology,  # type: ignore[arg-type]
        SimpleNamespace(stream_to=lambda worker: Stream(worker)),  # type: ignore[arg-type]
        PipelineSettings(hop_timeout_s=10.0, max_attempts=3, hedge_after_s=0.0, use_shm=False),
        OutlierDetector(OutlierConfig()),
        RetryBudget(),
    )


async def test_direct_mode_hands_inline_outputs_on_without_re_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, worker_pb2.ForwardRequest]] = []
    pipe = _pipeline(sent, fail_once=set())
    ids = codec.encode(torch.tensor([[101, 7, 102]]))

    def encode_in_router(*args: Any, **kwargs: Any) -> Any:  # the router itself must not re-encode any hop
        raise AssertionError("router re-encoded a stage input")

    monkeypatch.setattr(pipeline_module.placement, "pack", encode_in_router)
    result = await pipe.run("r1", ids, None, time.monotonic() + 10)
    routed = [worker for worker, _ in sent]
    assert len(routed) == 3 and routed[0] == "a" and routed[2] == "cccc"
    assert sent[0][1].input.data == ids.data  # the client's ids as they came
    # Each later stage got exactly the previous stage's answer bytes.
    expected0 = torch.tensor([[101.0, 7.0, 102.0]]).add(2).unsqueeze(-1).expand(1, 3, 3)
    assert sent[1][1].input.data == codec.encode(expected0.contiguous()).data
    want = expected0 + 4 + 6
    assert torch.equal(result.output, want)
    assert result.output_wire is not None and result.output_wire.data == codec.encode(want).data


async def test_a_failed_hop_is_resent_with_the_same_handed_on_bytes() -> None:
    sent: list[tuple[str, worker_pb2.ForwardRequest]] = []
    pipe = _pipeline(sent, fail_once={"bb"})
    pipe.choose = lambda replicas: next((r for r in replicas if r.worker_id == "bb"), replicas[0])  # type: ignore[method-assign]
    ids = codec.encode(torch.tensor([[101, 7, 102]]))
    result = await pipe.run("r2", ids, None, time.monotonic() + 10)
    stage1 = [(worker, request) for worker, request in sent if worker in ("bb", "bbb")]
    assert [worker for worker, _ in stage1] == ["bb", "bbb"]  # failed over to the other replica
    stage0_out = codec.encode(torch.tensor([[101.0, 7.0, 102.0]]).add(2).unsqueeze(-1).expand(1, 3, 3).contiguous())
    assert stage1[0][1].input.data == stage1[1][1].input.data == stage0_out.data  # resent as kept
    assert list(stage1[1][1].input.shape) == [1, 3, 3] and result.attempts == 2
    assert torch.equal(result.output, torch.tensor([[101.0, 7.0, 102.0]]).add(12).unsqueeze(-1).expand(1, 3, 3))


async def test_a_malformed_stage_output_is_refused_at_the_router() -> None:
    sent: list[tuple[str, worker_pb2.ForwardRequest]] = []
    pipe = _pipeline(sent, fail_once=set())
    msg = codec.encode(torch.zeros(2, 3))
    msg.data = msg.data[:-4]  # a byte count that does not match the shape
    from services.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="needs 24"):
        await pipeline_module.hand_on(msg, "output")
