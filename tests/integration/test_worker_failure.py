"""A worker killed mid-service gives a clear UNAVAILABLE naming the failed hop; SIGTERM drains."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
import torch

from services.client import RouterClient
from services.errors import Unavailable
from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.wire import codec
from tests.procs import mesh_up, start_worker, wait_serving

pytestmark = [pytest.mark.integration]


def test_killed_worker_gives_unavailable_naming_the_hop() -> None:
    config = {"model": "minilm", "workers": [{"layers": "0:3"}, {"layers": "3:6"}], "router_args": ["--hop-timeout-ms", "2000", "--route-wait-s", "0"]}  # no wait for coverage: immediacy is tested
    with mesh_up(config) as mesh, RouterClient(mesh.router) as client:
        assert client.infer(text="before").route == ("w0", "w1")
        victim = mesh.workers["w1"]
        import os

        os.kill(int(victim["pid"]), signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            client.infer(text="after the kill", timeout_s=20)
        elapsed = time.monotonic() - started
        message = str(info.value)
        assert "w1" in message and victim["address"] in message and "3:6" in message, message
        assert elapsed < 5, f"failure took {elapsed:.1f}s to surface"


async def test_sigterm_finishes_in_flight_requests_then_exits_zero() -> None:
    proc, address = start_worker("minilm", "0:6", "--grace-s", "30")
    wait_serving(address)
    ids = torch.randint(1000, 2000, (16, 256))
    request_bytes = codec.encode(ids)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        calls = [
            asyncio.ensure_future(stub.Forward(worker_pb2.ForwardRequest(request_id=str(i), input=request_bytes), timeout=120))
            for i in range(8)
        ]
        done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) < len(calls), "requests finished too fast to be in flight at SIGTERM"
        proc.send(signal.SIGTERM)
        replies = await asyncio.gather(*calls)
    assert [list(r.output.shape) for r in replies] == [[16, 384]] * 8
    assert await asyncio.to_thread(proc.wait, 60) == 0
    assert any("draining" in line for line in proc.stderr)
