"""Work per request is bounded on a real worker process: batch x tokens and the model's maximum length are
checked before compute, and a big compute whose caller goes away stops between layers, so the next
small request is served at once instead of after it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.wire import codec
from tests.procs import start_worker, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 20000  # admits the 256 x 64 request below, refuses the 2048 x 64


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    proc, address = start_worker("minilm", "0:6", "--max-batch-tokens", str(LIMIT), "--grace-s", "2")
    try:
        wait_serving(address)
        yield address
    finally:
        proc.stop()


def _ids(batch: int, tokens: int) -> worker_pb2.ForwardRequest:
    return worker_pb2.ForwardRequest(input=codec.encode(torch.randint(1000, 2000, (batch, tokens))))


def test_oversized_work_is_refused_before_compute_naming_the_limit(worker: str) -> None:
    with grpc.insecure_channel(worker) as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Forward(_ids(2048, 64), timeout=60)  # 1 MiB of input; 9 s and 2 GB of compute unbounded
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            f"request of 2048 sequences x 64 tokens = 131072 tokens exceeds worker" in info.value.details()
            and f"limit of {LIMIT} tokens per request (--max-batch-tokens)" in info.value.details()
        ), info.value.details()
        assert time.monotonic() - started < 5
        with pytest.raises(grpc.RpcError) as info:
            stub.Forward(_ids(1, 600), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "600 tokens exceed the model's maximum of 512 (max_position_embeddings)" in info.value.details()
        assert list(stub.Forward(_ids(2, 8), timeout=30).output.shape) == [2, 384]


async def test_a_cancelled_big_compute_frees_the_worker_quickly(worker: str) -> None:
    """Times are relative to one measured compute, so a loaded machine scales both sides alike."""
    big, reference, small = _ids(256, 64), _ids(32, 64), _ids(1, 8)
    async with grpc.aio.insecure_channel(worker) as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        await stub.Forward(small, timeout=60)
        started = time.monotonic()
        await stub.Forward(reference, timeout=120)
        reference_s = time.monotonic() - started  # the big request is 8 times this work: ~8 x reference_s

        call = stub.Forward(big, timeout=300)
        await asyncio.sleep(reference_s / 4)  # the big compute is under way
        call.cancel()
        cancelled = time.monotonic()
        reply = await stub.Forward(small, timeout=300)
        waited_s = time.monotonic() - cancelled
    assert list(reply.output.shape) == [1, 384]
    # Without the stop between layers the small request waits out the rest of the big compute (~7.5 x
    # reference_s); with it, about one layer of six (~1.3 x reference_s).
    assert waited_s < 4 * reference_s, f"small request waited {waited_s:.2f}s; reference compute {reference_s:.2f}s"
