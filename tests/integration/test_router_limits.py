"""Limits before work on a real router: message size follows --max-tensor-mb (refused from the length
prefix, not buffered), text length (--max-text-bytes), token counts (the model's maximum), concurrent
RPCs; long texts are tokenised off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import AsyncRouterClient
from services.errors import ResourceExhausted
from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc
from services.wire import codec
from tests.procs import Proc, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MODEL = "tiny-llama"  # max_position_embeddings 1024
MIB = 1024 * 1024
MAX_TEXT_BYTES = 2_000_000
MAX_INFLIGHT = 4


@dataclass
class Limited:
    router: Proc
    address: str


@pytest.fixture(scope="module")
def limited() -> Iterator[Limited]:
    worker, worker_addr = start_worker(MODEL, "0:6", "--threads", "1")
    router = None
    try:
        router, address = start_router(
            [worker_addr], "--max-tensor-mb", "1", "--max-text-bytes", str(MAX_TEXT_BYTES),
            "--max-inflight", str(MAX_INFLIGHT),
        )
        wait_serving(worker_addr)
        wait_serving(address)
        yield Limited(router, address)
    finally:
        if router is not None:
            assert router.stop() == 0
        assert worker.stop() == 0


async def _peak_rss(pid: int, stop: asyncio.Event) -> int:
    proc, peak = psutil.Process(pid), 0
    while not stop.is_set():
        peak = max(peak, proc.memory_info().rss)
        await asyncio.sleep(0.01)
    return peak


async def test_oversize_message_is_refused_before_it_is_buffered(limited: Limited) -> None:
    big = torch.zeros(1, 8 * MIB, dtype=torch.int64)  # 64 MiB of token ids; the router takes 2 x 1 MiB + envelope
    baseline = psutil.Process(limited.router.pid).memory_info().rss
    stop = asyncio.Event()
    sampler = asyncio.create_task(_peak_rss(limited.router.pid, stop))
    async with AsyncRouterClient(limited.address, token="") as client:
        with pytest.raises(ResourceExhausted) as info:
            await client.infer(tensor=big, timeout_s=60)
        stop.set()
        peak = await sampler
        assert "--max-tensor-mb" in str(info.value), info.value
        assert "larger than max" in str(info.value)
        # the router still serves
        assert (await client.infer(tokens=[1, 2, 3], timeout_s=30)).route
    assert peak - baseline < 32 * MIB, f"router grew {(peak - baseline) / MIB:.0f} MiB for a refused 64 MiB message"


async def test_long_text_and_too_many_tokens_are_invalid_argument_naming_the_limit(limited: Limited) -> None:
    async with grpc.aio.insecure_channel(limited.address, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        cases = [
            (router_pb2.InferRequest(text="x" * (MAX_TEXT_BYTES + 1)),
             f"text: {MAX_TEXT_BYTES + 1} bytes exceed the router's limit of {MAX_TEXT_BYTES} bytes (--max-text-bytes)"),
            (router_pb2.InferRequest(text="é" * (MAX_TEXT_BYTES // 2 + 1)), "(--max-text-bytes)"),
            (router_pb2.InferRequest(tokens=router_pb2.TokenIds(ids=[1] * 1025)),
             "tokens: 1025 tokens exceed the model's maximum of 1024 (max_position_embeddings)"),
            (router_pb2.InferRequest(tensor=codec.encode(torch.ones(1, 1100, dtype=torch.int64))),
             "tensor: 1100 tokens exceed the model's maximum of 1024 (max_position_embeddings)"),
            (router_pb2.InferRequest(text="word " * 3000), "text: more than the model's maximum of 1024 tokens"),
        ]
        for request, fragment in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Infer(request, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert fragment in (info.value.details() or ""), info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as gen:
            async for _ in stub.Generate(router_pb2.GenerateRequest(text="y" * (MAX_TEXT_BYTES + 1), max_new_tokens=1), timeout=30):
                pass
        assert gen.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-text-bytes" in (gen.value.details() or "")
        # on a stream the refusal is that request's answer; the stream goes on
        call = stub.InferStream()
        await call.write(router_pb2.InferRequest(request_id="long", text="z" * (MAX_TEXT_BYTES + 1)))
        await call.write(router_pb2.InferRequest(request_id="ok", tokens=router_pb2.TokenIds(ids=[1, 2])))
        await call.done_writing()
        replies = {r.request_id: r async for r in call}
        assert "--max-text-bytes" in replies["long"].error.message
        assert not replies["ok"].HasField("error")


async def test_a_long_text_does_not_stall_concurrent_requests(limited: Limited) -> None:
    """1.5 MB of text takes seconds to tokenise; small requests sent meanwhile are answered meanwhile."""
    text = "the mesh routes activations between workers. " * (1_500_000 // 45)
    async with grpc.aio.insecure_channel(limited.address, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        await stub.Infer(router_pb2.InferRequest(text="warm up the tokenizer"), timeout=60)
        started = time.monotonic()
        big = asyncio.ensure_future(stub.Infer(router_pb2.InferRequest(text=text), timeout=120))
        await asyncio.sleep(0.5)  # the big request arrived and is being tokenised
        small_s = []
        for i in range(3):
            t0 = time.monotonic()
            await stub.Infer(router_pb2.InferRequest(text=f"small request {i}"), timeout=60)
            small_s.append(time.monotonic() - t0)
        answered_meanwhile = not big.done()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await big
        big_s = time.monotonic() - started
    # it was tokenised in full, then refused for its length in tokens
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1024 tokens" in (info.value.details() or "")
    assert answered_meanwhile, f"small requests took {small_s} s and finished after the long text ({big_s:.1f} s)"


async def test_streams_beyond_the_cap_are_refused_and_health_still_answers(limited: Limited) -> None:
    """The router admits at most --max-inflight streams at once; more are RESOURCE_EXHAUSTED naming the limit,
    health checks are never refused, and a closed stream frees its place.

    The extra streams send nothing: a client that writes to a stream the server has already refused can see
    its own failed send (INTERNAL, "Failed execute_batch") instead of the server's status, a race inside
    grpc.aio's client that CI once hit; what the router answers is the status, so that is what is checked."""

    def request(i: int) -> router_pb2.InferRequest:
        return router_pb2.InferRequest(request_id=f"r{i}", tokens=router_pb2.TokenIds(ids=[1, 2]))

    async with grpc.aio.insecure_channel(limited.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        held = [stub.InferStream() for _ in range(MAX_INFLIGHT)]
        extra: list[grpc.aio.StreamStreamCall] = []
        try:
            for i, call in enumerate(held):
                await call.write(request(i))
            first = await asyncio.gather(*(asyncio.wait_for(c.read(), 30) for c in held))
            assert all(not r.HasField("error") for r in first), first  # all four admitted and served, still open
            extra = [stub.InferStream() for _ in range(2)]
            codes = await asyncio.gather(*(asyncio.wait_for(c.code(), 30) for c in extra))
            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, codes
            for call in extra:
                assert f"(limit {MAX_INFLIGHT})" in (await call.details()), await call.details()
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # the held streams still answer; closing one lets a new stream in
            await held[0].write(request(10))
            assert not (await asyncio.wait_for(held[0].read(), 30)).HasField("error")
            await held[0].done_writing()
            assert await asyncio.wait_for(held[0].code(), 30) == grpc.StatusCode.OK
            late = stub.InferStream()
            extra.append(late)
            await late.write(request(11))
            reply = await asyncio.wait_for(late.read(), 30)
            assert isinstance(reply, router_pb2.InferResponse) and not reply.HasField("error"), reply
        finally:
            for call in held + extra:
                call.cancel()
