"""Generation sessions on real worker processes: a session belongs to the key it was opened with (also
along a relay chain), and a burst of Infer traffic at --max-inflight does not fail decode steps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from services.wire import codec
from tests.procs import Proc, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MODEL = "tiny-llama-wide"  # 8 layers, hidden 512: an infer of a few hundred tokens keeps a slot busy a while
HIDDEN = 512
KEY = b"router-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def chain() -> Iterator[dict[str, str]]:
    procs: list[Proc] = []
    try:
        first, first_address = start_worker(MODEL, "0:4", "--max-inflight", "4", "--grace-s", "2")
        procs.append(first)
        last, last_address = start_worker(MODEL, "4:8", "--max-inflight", "4", "--grace-s", "2")
        procs.append(last)
        wait_serving(first_address)
        wait_serving(last_address)
        yield {"first": first_address, "last": last_address}
    finally:
        for proc in procs:
            proc.stop()


def _describe(address: str) -> worker_pb2.DescribeResponse:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.ShardWorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)


def _step(x: torch.Tensor, session: str, position: int, key: bytes = b"", **fields: object) -> worker_pb2.ForwardRequest:
    return worker_pb2.ForwardRequest(
        request_id=f"{session}-{position}", input=codec.encode(x), session_id=session, position=position,
        session_key=key, **fields,  # type: ignore[arg-type]
    )


def _denied(call, request) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    return info.value.details() or ""


def test_only_the_key_holder_steps_or_closes_a_session(chain: dict[str, str]) -> None:
    last = _describe(chain["last"])
    relay_to_last = [tensor_pb2.RouteHop(worker_id=last.worker_id, address=chain["last"], layers=last.layers)]
    with grpc.insecure_channel(chain["first"]) as c0, grpc.insecure_channel(chain["last"]) as c1:
        first_stub, last_stub = worker_pb2_grpc.ShardWorkerStub(c0), worker_pb2_grpc.ShardWorkerStub(c1)
        # The owner opens the session on both workers through a relay chain: the key travels with it.
        opened = first_stub.Forward(_step(torch.tensor([[1, 5, 9, 13]]), "s", 0, KEY, downstream=relay_to_last), timeout=30)
        assert not opened.HasField("error") and list(opened.output.shape) == [1, 1, 512], opened.error
        assert _describe(chain["last"]).capacity.sessions == 1

        # Someone else cannot close it, nor step it, with another key or with none.
        for stranger in (b"another-router", b""):
            message = _denied(last_stub.CloseSession, worker_pb2.CloseSessionRequest(session_id="s", session_key=stranger))
            assert "session 's' belongs to another caller" in message
            _denied(last_stub.Forward, _step(torch.zeros(1, 1, HIDDEN), "s", 4, stranger))
            _denied(first_stub.Forward, _step(torch.tensor([[7]]), "s", 4, stranger))
        assert _describe(chain["last"]).capacity.sessions == 1  # still there, untouched

        # The owner goes on (through the relay: the last worker sees the same key) and closes it.
        step = first_stub.Forward(_step(torch.tensor([[7]]), "s", 4, KEY, downstream=relay_to_last), timeout=30)
        assert not step.HasField("error"), step.error
        for stub in (first_stub, last_stub):
            assert stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="s", session_key=KEY), timeout=10).existed

        # A session opened without a key (an older router) takes only key-less steps.
        last_stub.Forward(_step(torch.zeros(1, 3, HIDDEN), "old", 0), timeout=30)
        _denied(last_stub.Forward, _step(torch.zeros(1, 1, HIDDEN), "old", 3, KEY))
        last_stub.Forward(_step(torch.zeros(1, 1, HIDDEN), "old", 3), timeout=30)
        assert last_stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="old"), timeout=10).existed


async def test_an_infer_burst_at_max_inflight_does_not_fail_decode_steps(chain: dict[str, str]) -> None:
    address = chain["first"]  # --max-inflight 4
    infer = codec.encode(torch.randint(0, 512, (4, 192)))
    refused_at: list[float] = []
    served = [0]
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(address) as burst_channel, grpc.aio.insecure_channel(address) as session_channel:
        burst_stub = worker_pb2_grpc.ShardWorkerStub(burst_channel)
        session_stub = worker_pb2_grpc.ShardWorkerStub(session_channel)

        async def flood(sender: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    await burst_stub.Forward(worker_pb2.ForwardRequest(request_id=f"b{sender}-{n}", input=infer), timeout=60)
                    served[0] += 1
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                    refused_at.append(time.monotonic())
                    await asyncio.sleep(0.005)

        await session_stub.Forward(_step(torch.tensor([[1, 2, 3, 4]]), "decode", 0, KEY), timeout=30)
        senders = [asyncio.create_task(flood(i)) for i in range(12)]
        try:
            async def saturated() -> None:  # the worker is full: infers are being refused
                while len(refused_at) < 5:
                    assert not any(task.done() for task in senders), "a sender failed"
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(saturated(), 60)
            first_step = time.monotonic()
            for position in range(4, 12):
                reply = await session_stub.Forward(_step(torch.tensor([[position]]), "decode", position, KEY), timeout=30)
                assert list(reply.output.shape) == [1, 1, HIDDEN]
            last_step = time.monotonic()
        finally:
            stop.set()
            await asyncio.gather(*senders)
        refused_during = sum(first_step <= t <= last_step for t in refused_at)
        # The decode steps ran while the worker was refusing stateless requests at --max-inflight.
        assert refused_during >= 3 and served[0] > 0, (refused_during, served[0])
        assert (await session_stub.CloseSession(
            worker_pb2.CloseSessionRequest(session_id="decode", session_key=KEY), timeout=10)).existed
