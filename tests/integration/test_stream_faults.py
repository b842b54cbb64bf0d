"""Faults on the shared ForwardStream (issue 14 defects 1 and 2), against a real worker process.

One stream carries every request to a peer, so nothing that happens to one request (cancelled mid-write,
timed out behind a stalled write) may touch the others, and a request's timeout bounds its whole hop.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from services.errors import DeadlineExceeded, ShardmeshError
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from services.net import CHANNEL_OPTIONS
from services.transport.stream_client import ForwardStreamClient
from services.wire import codec, placement, shm
from tests.procs import Proc, mesh_up, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

HIDDEN = 512  # tiny-llama-wide
LARGE = codec.encode(torch.randn(96, 256, HIDDEN))  # 48 MiB: 48 chunks, ~100 ms of writing on loopback
SMALL = codec.encode(torch.randn(1, 8, HIDDEN))


def _request(request_id: str, tensor: tensor_pb2.Tensor) -> worker_pb2.ForwardRequest:
    return worker_pb2.ForwardRequest(request_id=request_id, input=tensor, layers=tensor_pb2.LayerRange(start=2, end=4))


@pytest.fixture(scope="module")
def middle_worker() -> Iterator[tuple[Proc, str]]:
    proc, address = start_worker("tiny-llama-wide", "2:4", "--no-shm")
    try:
        wait_serving(address)
        yield proc, address
    finally:
        assert proc.stop() == 0


async def _after(delay_s: float, client: ForwardStreamClient, request: worker_pb2.ForwardRequest) -> worker_pb2.ForwardResponse:
    await asyncio.sleep(delay_s)
    return await client.call(request, 60.0)


async def test_cancelling_a_large_request_mid_write_spares_the_stream(middle_worker: tuple[Proc, str]) -> None:
    """Defect 1: cancelling one 48 MiB request mid-write failed every small request sharing its stream."""
    _, address = middle_worker
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        client = ForwardStreamClient(channel, address, "w-mid")
        await client.call(_request("warm", SMALL), 60.0)
        for round_ in range(3):
            big = asyncio.create_task(client.call(_request(f"big-{round_}", LARGE), 60.0))
            smalls = [
                asyncio.create_task(_after(0.005 * i, client, _request(f"small-{round_}-{i}", SMALL))) for i in range(8)
            ]
            await asyncio.sleep(0.03)
            assert not big.done(), "the large request finished before it could be cancelled mid-write"
            big.cancel()
            results = await asyncio.gather(*smalls, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            assert not failures, f"round {round_}: small requests failed after a cancel on their stream: {failures!r}"
            assert all(list(r.output.shape) == [1, 8, HIDDEN] for r in results)  # type: ignore[union-attr]
            with pytest.raises(asyncio.CancelledError):
                await big
        # The stream is still the one it was: nothing was torn down.
        reply = await client.call(_request("after", SMALL), 60.0)
        assert list(reply.output.shape) == [1, 8, HIDDEN]
        await client.close()


async def test_one_deadline_covers_queueing_writing_and_reply(middle_worker: tuple[Proc, str]) -> None:
    """Defect 2: a request queued behind a write stalled on flow control waited for the whole earlier write."""
    proc, address = middle_worker
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        client = ForwardStreamClient(channel, address, "w-mid")
        await client.call(_request("warm2", SMALL), 60.0)
        proc.send(signal.SIGSTOP)  # the worker stops reading: the 48 MiB write blocks on HTTP/2 flow control
        try:
            big = asyncio.create_task(client.call(_request("stalled-big", LARGE), 3.0))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                await client.call(_request("queued-small", SMALL), 0.3)
            waited = time.monotonic() - started
            assert waited < 1.5, f"a 300 ms hop took {waited:.2f}s to fail (it waited for the stalled write)"
            assert "did not answer within 300 ms" in str(info.value) and address in str(info.value)
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await big
        finally:
            proc.send(signal.SIGCONT)
        # Once the worker reads again, the same client serves new requests.
        reply = await client.call(_request("resumed", SMALL), 60.0)
        assert list(reply.output.shape) == [1, 8, HIDDEN]
        await client.close()


@pytest.mark.slow
async def test_hedging_at_one_ms_loses_nothing_and_never_answers_internal() -> None:
    """Defect 1 through the router: hedge losers are cancelled mid-write on shared streams; with the
    fault, requests failed with INTERNAL (InvalidStateError) or UNAVAILABLE from healthy workers."""
    from services.client import AsyncRouterClient, build_request
    from services.gen.shardmesh.v1 import router_pb2

    # Stage 1's 2.6 MiB input crosses inline as 3 chunks, so hedge losers are often cut off mid-write.
    config = {
        "model": "tiny-llama-wide",
        "workers": [{"layers": "0:2"}, {"layers": "2:8", "replicas": 2}],
        "worker_args": ["--no-shm"],
        "router_args": ["--no-shm", "--hedge-after-ms", "1", "--hop-timeout-ms", "20000"],
    }
    ids = torch.randint(0, 512, (2, 640), generator=torch.Generator().manual_seed(7))
    with mesh_up(config) as mesh:
        async with AsyncRouterClient(mesh.router) as client:
            reference = (await client.infer(tensor=ids, timeout_s=120)).output
            outcomes: list[str] = []

            async def one(i: int) -> None:
                try:
                    result = await client.infer(tensor=ids, timeout_s=120, request_id=f"h{i}")
                    outcomes.append("ok" if torch.equal(result.output, reference) else "wrong")
                except ShardmeshError as exc:
                    outcomes.append(f"{type(exc).__name__}: {exc}")

            for batch in range(4):
                await asyncio.gather(*(one(batch * 4 + i) for i in range(4)))
        # The router parses its messages in the handler too (issue 15): corrupt -> INVALID_ARGUMENT, in-band on streams.
        async with grpc.aio.insecure_channel(mesh.router) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/shardmesh.v1.Router/Infer", request_serializer=None)(b"\x0a\x05ab", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            stream = channel.stream_stream(
                "/shardmesh.v1.Router/InferStream", request_serializer=None,
                response_deserializer=router_pb2.InferResponse.FromString,
            )()
            valid = build_request(tensor=ids[:, :8], request_id="valid").SerializeToString()
            for message in (valid, b"\x0a\x05ab", valid.replace(b"valid", b"after")):
                await stream.write(message)
            await stream.done_writing()
            replies = {r.request_id: r async for r in stream}
        assert set(replies) == {"valid", "", "after"}, replies
        assert replies[""].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], replies[""]
        assert not replies["valid"].HasField("error") and not replies["after"].HasField("error")
    assert outcomes == ["ok"] * len(outcomes), [o for o in outcomes if o != "ok"]


class _LateShmWorker(worker_pb2_grpc.ShardWorkerServicer):
    """Answers every ForwardStream request late, with its output in a shared-memory segment, and ignores
    cancels: the shape of a hedge loser's or a timed-out request's response arriving after its caller left."""

    def __init__(self) -> None:
        self.received = 0
        self.answered = 0

    async def ForwardStream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        async def answer(request: worker_pb2.ForwardRequest) -> None:
            await asyncio.sleep(0.3)
            output = placement.pack(torch.randn(512, 1024), colocated=True, request_id=request.request_id)
            await context.write(worker_pb2.ForwardResponse(request_id=request.request_id, output=output))
            self.answered += 1

        answers = []
        while (request := await context.read()) is not grpc.aio.EOF:
            if not request.cancel:
                self.received += 1
                answers.append(asyncio.create_task(answer(request)))
        await asyncio.gather(*answers)


def _segments() -> set[str]:
    return {p.name for p in shm.SHM_DIR.iterdir()} if shm.SHM_DIR.is_dir() else set()


@pytest.mark.skipif(not shm.shm_available(), reason="no shared memory on this host")
async def test_late_responses_release_their_shared_memory() -> None:
    """Defect 5 (transport part): a response that arrives after its request timed out still holds a segment."""
    server = grpc.aio.server()
    late = _LateShmWorker()
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(late, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    before = _segments()
    try:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            client = ForwardStreamClient(channel, address, "late")
            for i in range(4):
                with pytest.raises(DeadlineExceeded):
                    await client.call(_request(f"late-{i}", SMALL), 0.15)
            deadline = time.monotonic() + 10
            await asyncio.sleep(0.5)
            while late.answered < late.received and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert late.answered == late.received >= 1, (late.answered, late.received)
            while _segments() - before and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert _segments() - before == set(), "segments of responses nobody waited for were left behind"
            await client.close()
    finally:
        await server.stop(None)
