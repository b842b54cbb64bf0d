"""Issue 14 defect 7: SIGTERM drains relayed work and open generation sessions, not only computes.

A middle relay worker stopped while its requests wait on the next hop must answer them all; a worker
stopped mid-generation must let the session finish (no replay) before it exits, within --grace-s."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
import torch

from services.client import AsyncRouterClient, build_generate_request
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from services.wire import codec
from tests.procs import Proc, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MODEL = "tiny-llama"  # 6 layers


@dataclass
class Mesh:
    procs: dict[str, Proc]
    addresses: dict[str, str]
    router: str


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """a 0:2, b 2:4, c 4:6 behind a router; spare 2:4 (not in the router) for the relay drain."""
    layout = {"a": "0:2", "b": "2:4", "c": "4:6", "spare": "2:4"}
    procs: dict[str, Proc] = {}
    addresses: dict[str, str] = {}
    try:
        for name, layers in layout.items():
            procs[name], addresses[name] = start_worker(
                MODEL, layers, "--worker-id", name, "--threads", "1", "--grace-s", "20", "--no-batching"
            )
        router, router_addr = start_router([addresses[n] for n in ("a", "b", "c")], "--hop-timeout-ms", "20000")
        procs["router"] = router
        for address in [*addresses.values(), router_addr]:
            wait_serving(address)
        yield Mesh(procs, addresses, router_addr)
    finally:
        for proc in procs.values():
            proc.stop()


def _inflight(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.ShardWorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=5).capacity.inflight


def _relay_forward(mesh: Mesh, i: int) -> worker_pb2.ForwardResponse:
    request = worker_pb2.ForwardRequest(
        request_id=f"drain-{i}",
        input=codec.encode(torch.tensor([[1 + i, 2, 3, 4]])),
        layers=tensor_pb2.LayerRange(start=0, end=2),
        mode=tensor_pb2.MODE_RELAY,
    )
    request.downstream.add(worker_id="spare", address=mesh.addresses["spare"], layers=tensor_pb2.LayerRange(start=2, end=4))
    request.downstream.add(worker_id="c", address=mesh.addresses["c"], layers=tensor_pb2.LayerRange(start=4, end=6))
    with grpc.insecure_channel(mesh.addresses["a"]) as channel:
        return worker_pb2_grpc.ShardWorkerStub(channel).Forward(request, timeout=60)


def test_sigterm_to_a_middle_relay_worker_answers_requests_waiting_downstream(mesh: Mesh) -> None:
    middle, last = mesh.procs["spare"], mesh.procs["c"]
    count = 6
    warm = _relay_forward(mesh, 99)  # the middle worker's stream to the last one is open before the fault
    assert not warm.HasField("error"), warm.error.message[:300]
    last.send(signal.SIGSTOP)  # requests pile up in the middle worker, waiting on its downstream (not computing)
    try:
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(_relay_forward, mesh, i) for i in range(count)]
            deadline = time.monotonic() + 30
            while _inflight(mesh.addresses["spare"]) < count:
                assert time.monotonic() < deadline, "the requests never reached the middle worker"
                time.sleep(0.05)
            middle.send(signal.SIGTERM)
            time.sleep(1.5)  # well past the old drain (computes only: none here) + 0.5 s server grace
            assert middle.proc.poll() is None, "the middle worker exited while its relayed requests were in flight"
            last.send(signal.SIGCONT)
            responses = [f.result(60) for f in futures]
    finally:
        last.send(signal.SIGCONT)
    for response in responses:
        assert not response.HasField("error"), response.error.message[:400]
        assert [h.worker_id for h in response.hops] == ["a", "spare", "c"]
        assert list(response.output.shape) == [1, 4, 512]
    assert middle.wait(30) == 0
    assert any("draining" in line and "6 in-flight" in line for line in middle.stderr), middle.stderr[-10:]


async def test_sigterm_mid_generation_lets_the_session_finish_without_replay(mesh: Mesh) -> None:
    victim = mesh.procs["b"]
    prompt = [5, 17, 33, 2, 9]
    async with AsyncRouterClient(mesh.router) as client:
        reference = await client.generate(tokens=prompt, max_new_tokens=48)
        assert reference.failovers == 0 and len(reference.token_ids) == 48
        tokens: list[int] = []
        summary = None
        sent_at = None
        async for event in client.generate_stream(build_generate_request(tokens=prompt, max_new_tokens=48), 120):
            if event.HasField("summary"):
                summary = event.summary
                break
            tokens.append(event.token.token_id)
            if len(tokens) == 3:
                victim.send(signal.SIGTERM)
                sent_at = time.monotonic()
                await asyncio.sleep(1.0)  # the worker is draining now; the generation must go on through it
    assert summary is not None and sent_at is not None
    assert summary.failovers == 0, "the generation was replayed: the draining worker dropped its session"
    assert list(summary.token_ids) == list(reference.token_ids) and tokens == list(reference.token_ids)
    assert "b" in summary.route
    assert victim.wait(30) == 0 and time.monotonic() - sent_at < 20 + 5
    assert any("draining" in line and "1 open sessions" in line for line in victim.stderr), victim.stderr[-10:]
