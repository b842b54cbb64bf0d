"""The resolved priority and the remaining deadline travel on every ForwardRequest the router sends."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import torch

from router.pipeline import Pipeline, PipelineSettings
from router.planning.outlier import OutlierConfig, OutlierDetector
from router.planning.retry_budget import RetryBudget
from router.planning.types import WorkerInfo
from router.scheduling.context import hop_priority, set_default_level
from router.planning.planner import stage_groups
from services.gen.shardmesh.v1 import worker_pb2
from services.layers import LayerSpan

A = WorkerInfo("a", "127.0.0.1:1", "m", "llama", LayerSpan(0, 3), 6, "sum")
B = WorkerInfo("b", "127.0.0.1:2", "m", "llama", LayerSpan(3, 6), 6, "sum")


def _pipeline(sent: list[worker_pb2.ForwardRequest]) -> Pipeline:
    class Stream:
        async def call(self, request: worker_pb2.ForwardRequest, timeout: float) -> Any:
            sent.append(request)
            return worker_pb2.ForwardResponse()

    return Pipeline(
        SimpleNamespace(workers=(A, B), stage_groups=lambda: stage_groups((A, B))),  # type: ignore[arg-type]
        SimpleNamespace(stream_to=lambda worker: Stream()),  # type: ignore[arg-type]
        PipelineSettings(hop_timeout_s=10.0, max_attempts=1, hedge_after_s=0.0, use_shm=False),
        OutlierDetector(OutlierConfig()),
        RetryBudget(),
    )


async def test_forward_requests_carry_priority_and_remaining_deadline() -> None:
    sent: list[worker_pb2.ForwardRequest] = []
    pipeline = _pipeline(sent)
    ids = torch.tensor([[1, 2, 3]])
    set_default_level(2)
    await pipeline._call([A], "plain", ids, None, "sum", time.monotonic() + 5.0)
    with hop_priority(1):
        await pipeline._call([A, B], "relayed", ids, None, "sum", time.monotonic() + 0.5)
    assert [r.priority for r in sent] == [2, 1]  # the default level when unset, never 0
    assert 0 < sent[0].timeout_ms <= 5000 and 0 < sent[1].timeout_ms <= 500  # the remaining deadline, not more


async def test_relay_copies_priority_to_the_next_hop() -> None:
    from shard_worker.relay import Relay
    from services.gen.shardmesh.v1 import tensor_pb2

    sent: list[worker_pb2.ForwardRequest] = []

    class Stream:
        async def call(self, request: worker_pb2.ForwardRequest, timeout: float) -> Any:
            sent.append(request)
            return worker_pb2.ForwardResponse()

    relay = Relay(SimpleNamespace(stream=lambda address, worker_id: Stream()), "a", use_shm=False)  # type: ignore[arg-type]
    request = worker_pb2.ForwardRequest(request_id="r", priority=3, timeout_ms=800)
    request.downstream.add(worker_id="b", address="127.0.0.1:2", layers=tensor_pb2.LayerRange(start=3, end=6))
    output = tensor_pb2.Tensor()
    await relay.forward(request, output, torch.zeros(1), tensor_pb2.HopRecord(worker_id="a"), time.monotonic() + 0.8)
    assert sent[0].priority == 3 and 0 < sent[0].timeout_ms <= 800
