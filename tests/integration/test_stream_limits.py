"""Hostile stream and message input against a real worker (issue 15): every bad message gets a specific
answer, nothing buffers without bound, and probes keep answering while streams are open."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from services.wire import codec
from tests.procs import Proc, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MIB = 1024 * 1024
CORRUPT = b"\x0a\x05ab"  # field 1 says 5 bytes follow; 2 do
FORWARD_STREAM = "/shardmesh.v1.ShardWorker/ForwardStream"


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[Proc, str]]:
    proc, address = start_worker("minilm", "2:4", "--max-inflight", "4", "--max-tensor-mb", "8")
    try:
        wait_serving(address)
        yield proc, address
    finally:
        assert proc.stop() == 0


def _socket_buffer_max_bytes() -> int:
    """The most a loopback TCP connection may buffer in the kernel: the receive plus send maxima."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            total += int(f.read().split()[2])
    return total


def _hidden(request_id: str, tokens: int = 8) -> worker_pb2.ForwardRequest:
    return worker_pb2.ForwardRequest(request_id=request_id, input=codec.encode(torch.randn(1, tokens, 384)))


def _raw_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    call = channel.stream_stream(FORWARD_STREAM, request_serializer=None, response_deserializer=worker_pb2.ForwardResponse.FromString)
    return call()


async def _next(call: grpc.aio.StreamStreamCall, timeout_s: float = 30.0) -> worker_pb2.ForwardResponse:
    return await asyncio.wait_for(call.read(), timeout_s)


async def _rest(call: grpc.aio.StreamStreamCall) -> list[worker_pb2.ForwardResponse]:
    replies = []
    while (reply := await _next(call)) is not grpc.aio.EOF:
        replies.append(reply)
    return replies


async def test_corrupt_messages_get_invalid_argument_and_the_stream_goes_on(worker: tuple[Proc, str]) -> None:
    _, address = worker
    async with grpc.aio.insecure_channel(address) as channel:
        unary = channel.unary_unary("/shardmesh.v1.ShardWorker/Forward", request_serializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(CORRUPT, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "not a valid shardmesh.v1.ForwardRequest" in (info.value.details() or "")

        call = _raw_stream(channel)
        await call.write(_hidden("before").SerializeToString())
        await call.write(CORRUPT)
        await call.write(_hidden("after").SerializeToString())
        await call.done_writing()
        replies = [r async for r in call]
        by_id = {r.request_id: r for r in replies}
        assert set(by_id) == {"before", "", "after"}, replies
        assert by_id[""].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "not a valid shardmesh.v1.ForwardRequest" in by_id[""].error.message
        assert not by_id["before"].HasField("error") and not by_id["after"].HasField("error")

        # A client generated from the .proto is unaffected.
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        reply = await stub.Forward(_hidden("stub"), timeout=30)
        assert list(reply.output.shape) == [1, 8, 384]
        stream = stub.ForwardStream()
        await stream.write(_hidden("stub-stream"))
        await stream.done_writing()
        assert [r.request_id for r in [r async for r in stream]] == ["stub-stream"]


async def test_chunk_bomb_is_refused_at_chunk_zero(worker: tuple[Proc, str]) -> None:
    """chunk 0 declares a 3 KB tensor with chunk_count=701: refused before any of the 700 MiB is buffered."""
    _, address = worker
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        call = stub.ForwardStream()
        head = tensor_pb2.Tensor(
            dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, 2, 384], data=bytes(MIB), chunk_count=701, chunk_index=0
        )
        await call.write(worker_pb2.ForwardRequest(request_id="bomb", input=head))
        reply = await _next(call)
        assert reply.request_id == "bomb" and reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "chunk_count=701" in reply.error.message and "3072 bytes" in reply.error.message, reply.error.message

        # Declared over --max-tensor-mb (8): refused at chunk 0, naming the limit.
        head = tensor_pb2.Tensor(
            dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, 16384, 256], data=bytes(MIB),  # 16 MiB in 16 chunks
            chunk_count=16, chunk_index=0,
        )
        await call.write(worker_pb2.ForwardRequest(request_id="too-big", input=head))
        reply = await _next(call)
        assert reply.request_id == "too-big" and reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "--max-tensor-mb" in reply.error.message and str(8 * MIB) in reply.error.message, reply.error.message

        await call.write(_hidden("valid"))
        await call.done_writing()
        rest = await _rest(call)
        assert [r.request_id for r in rest] == ["valid"] and not rest[0].HasField("error")


async def test_idle_streams_do_not_starve_health_and_describe(worker: tuple[Proc, str]) -> None:
    """130 open ForwardStreams: health Check and Describe still answer (they got RESOURCE_EXHAUSTED)."""
    _, address = worker
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(5)
    ]
    calls = []
    try:
        for i in range(130):
            call = worker_pb2_grpc.ShardWorkerStub(channels[i % 5]).ForwardStream()
            calls.append(call)
        # Each stream proves it is open at the worker by answering one request (a result, or RESOURCE_EXHAUSTED
        # from the worker's own --max-inflight queue when 130 arrive at once); then it idles.
        async def open_one(i: int, call: grpc.aio.StreamStreamCall) -> worker_pb2.ForwardResponse:
            await call.write(_hidden(f"idle-{i}", tokens=2))
            return await _next(call, 120)

        replies = await asyncio.gather(*(open_one(i, call) for i, call in enumerate(calls)), return_exceptions=True)
        async with grpc.aio.insecure_channel(address) as probe:
            check = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            described = await worker_pb2_grpc.ShardWorkerStub(probe).Describe(worker_pb2.DescribeRequest(), timeout=5)
            assert described.layers.start == 2 and described.layers.end == 4
            # Short calls are admitted separately from the streams.
            reply = await worker_pb2_grpc.ShardWorkerStub(probe).Forward(_hidden("unary"), timeout=30)
            assert list(reply.output.shape) == [1, 8, 384]
        failed = [r for r in replies if not isinstance(r, worker_pb2.ForwardResponse)]
        assert not failed, f"{len(failed)} of 130 streams were not opened: {failed[:3]}"
        shed = {r.error.code for r in replies if r.HasField("error")}  # type: ignore[union-attr]
        assert shed <= {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}, [r.error for r in replies if r.HasField("error")][:3]  # type: ignore[union-attr]
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


async def test_a_client_that_never_reads_stops_being_read(worker: tuple[Proc, str]) -> None:
    """Issue 15: the worker read ~1450 requests in 15 s from a stream whose client never read an answer,
    queueing every answer (+300 MB). Now answers keep their slots until written, so reading stops."""
    proc, address = worker
    rss = psutil.Process(proc.pid)
    hidden = _hidden("x", tokens=340).input  # about 0.5 MiB in, 0.5 MiB out
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        await stub.Forward(worker_pb2.ForwardRequest(input=hidden), timeout=60)  # warm
        baseline = rss.memory_info().rss
        call = stub.ForwardStream()
        written = 0

        async def flood() -> None:
            nonlocal written
            for i in range(2000):
                await call.write(worker_pb2.ForwardRequest(request_id=f"f{i}", input=hidden))
                written += 1

        writer = asyncio.create_task(flood())
        peak = baseline
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            peak = max(peak, rss.memory_info().rss)
        stalled_at = written
        await asyncio.sleep(2)
        assert not writer.done()
        print(f"client wrote {stalled_at} requests in 10 s without reading; worker RSS +{(peak - baseline) / MIB:.0f} MiB")
        assert written == stalled_at, "the worker kept reading a stream whose client reads nothing"
        # What may sit between the two ends once the worker stops reading is the kernel's socket buffers (their
        # autotuned maximum: 32 MiB receive on the CI host, which alone held 67 of these 0.5 MiB requests) plus
        # gRPC's HTTP/2 windows and the worker's own slots; a worker that never stops reading takes all 2000.
        in_transit = _socket_buffer_max_bytes() + 16 * MIB
        bound = in_transit // len(hidden.SerializeToString()) + 8
        assert stalled_at < bound, f"the worker accepted {stalled_at} requests from a client that never reads (bound {bound})"
        assert peak - baseline < 150 * MIB, f"worker RSS grew by {(peak - baseline) / MIB:.0f} MiB"
        async with grpc.aio.insecure_channel(address) as probe:
            check = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        writer.cancel()
        call.cancel()
