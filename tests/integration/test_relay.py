"""Relay mode: outputs equal direct and single-process; attribution proves every hop relayed;
deadlines and cancellation propagate along the chain and leave no state behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest
import torch

from services.client import AsyncRouterClient, RouterClient, build_request
from services.errors import DeadlineExceeded
from services.gen.shardmesh.v1 import router_pb2_grpc, tensor_pb2
from services.models.registry import resolve_model
from tests.procs import UpMesh, describe_all, mesh_up

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def mesh() -> Iterator[UpMesh]:
    config = {"model": "minilm", "mode": "relay", "workers": [{"layers": "0:1"}, {"layers": "1:5"}, {"layers": "5:6"}]}
    with mesh_up(config) as m:
        yield m


def _inflight(mesh: UpMesh) -> dict[str, int]:
    return {name: reply.capacity.inflight for name, reply in describe_all(mesh).items()}  # type: ignore[attr-defined]


def _wait_no_state(mesh: UpMesh, timeout_s: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = _inflight(mesh)
        if not any(counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def test_relay_equals_direct_and_reference_and_relays(mesh: UpMesh) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")
    with RouterClient(mesh.router) as client:
        for text in ["relay provably relays", "a second, somewhat longer input sentence for the chain"]:
            relayed = client.infer(text=text)  # the mesh's default mode is relay
            direct = client.infer(text=text, mode="direct")
            expected = reference.encode(text, convert_to_tensor=True)
            assert relayed.mode == "relay" and direct.mode == "direct"
            assert torch.equal(relayed.output, direct.output)
            assert torch.equal(relayed.output.reshape(expected.shape), expected)
            hops = relayed.hops
            assert [h.worker_id for h in hops] == ["w0", "w1", "w2"]
            assert hops[0].source == tensor_pb2.SOURCE_ROUTER
            for previous, hop in zip(hops, hops[1:]):
                # Each later hop got its activation from the worker before it, never from the router.
                assert hop.source == tensor_pb2.SOURCE_UPSTREAM_WORKER
                assert hop.source_worker_id == previous.worker_id
                assert hop.hop_ms > 0
            assert all(h.source == tensor_pb2.SOURCE_ROUTER for h in direct.hops)


def test_deadline_in_the_middle_names_the_hop_and_leaves_no_state(mesh: UpMesh) -> None:
    victim = int(mesh.workers["w1"]["pid"])
    with RouterClient(mesh.router) as client:
        client.infer(text="warm up")
        os.kill(victim, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                client.infer(text="stuck in the middle", timeout_s=1.5)
            assert time.monotonic() - started < 3
        finally:
            os.kill(victim, signal.SIGCONT)
        message = str(info.value)
        assert "w1" in message and "1:5" in message, message
        assert "w0 (" not in message.split(";")[0], message  # the reporter is not blamed
        assert _wait_no_state(mesh) == {"w0": 0, "w1": 0, "w2": 0}
        assert client.infer(text="after").route == ("w0", "w1", "w2")


async def test_cancelled_request_is_cancelled_on_every_hop(mesh: UpMesh) -> None:
    victim = int(mesh.workers["w2"]["pid"])
    async with AsyncRouterClient(mesh.router) as client:
        await client.infer(text="warm up")
        os.kill(victim, signal.SIGSTOP)
        try:
            stub = router_pb2_grpc.RouterStub(client._channel)
            call = stub.Infer(build_request(text="to be cancelled"), timeout=30)
            await asyncio.sleep(1.0)
            busy = await asyncio.to_thread(_inflight, UpMesh(mesh.proc, mesh.router, {k: v for k, v in mesh.workers.items() if k != "w2"}))
            assert busy == {"w0": 1, "w1": 1}, busy  # the request is held along the chain
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            os.kill(victim, signal.SIGCONT)
        assert await asyncio.to_thread(_wait_no_state, mesh) == {"w0": 0, "w1": 0, "w2": 0}
        assert (await client.infer(text="after")).route == ("w0", "w1", "w2")
