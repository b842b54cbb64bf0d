"""Issue 15, relay SSRF: a worker relays only along routes its router signed with the mesh key, and
without a key only to loopback peers. A forged route is PERMISSION_DENIED before any compute and
before any connection (a listening socket must see nobody)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from services.client import RouterClient
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from services.security.mesh_auth import mesh_call_metadata
from services.security.route_mac import sign_route
from services.wire import codec
from tests.procs import Proc, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MODEL = "minilm"


@dataclass
class KeyedMesh:
    key: bytes
    first: str  # address of the worker holding 0:3
    last: str  # 3:6
    router: str


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedMesh]:
    key = os.urandom(32)
    path: Path = tmp_path_factory.mktemp("relay-auth") / "mesh.key"
    path.write_bytes(key)
    path.chmod(0o600)
    procs: list[Proc] = []
    try:
        first, first_addr = start_worker(MODEL, "0:3", "--worker-id", "a0", "--threads", "1", "--mesh-key-file", str(path))
        procs.append(first)
        last, last_addr = start_worker(MODEL, "3:6", "--worker-id", "a1", "--threads", "1", "--mesh-key-file", str(path))
        procs.append(last)
        router, router_addr = start_router([first_addr, last_addr], "--mode", "relay", "--mesh-key-file", str(path))
        procs.append(router)
        for address in (first_addr, last_addr, router_addr):
            wait_serving(address)
        yield KeyedMesh(key, first_addr, last_addr, router_addr)
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port an attacker would like the worker to dial: any connection to it is the SSRF."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(1.5)
    yield sock
    sock.close()


def _assert_no_connection(sock: socket.socket) -> None:
    try:
        conn, peer = sock.accept()
    except TimeoutError:
        return
    conn.close()
    pytest.fail(f"the worker connected to the forged downstream (from {peer})")


def _forged(listener: socket.socket, **fields: object) -> worker_pb2.ForwardRequest:
    host, port = listener.getsockname()
    request = worker_pb2.ForwardRequest(
        request_id="forged",
        input=codec.encode(torch.tensor([[101, 7592, 102]])),
        layers=tensor_pb2.LayerRange(start=0, end=3),
        **fields,  # type: ignore[arg-type]
    )
    request.downstream.add(worker_id="victim", address=f"{host}:{port}", layers=tensor_pb2.LayerRange(start=3, end=6))
    return request


def test_signed_relay_routes_still_work(mesh: KeyedMesh) -> None:
    with RouterClient(mesh.router) as client:
        relayed = client.infer(text="signed routes relay", mode="relay")
    assert [h.worker_id for h in relayed.hops] == ["a0", "a1"]
    assert relayed.hops[1].source == tensor_pb2.SOURCE_UPSTREAM_WORKER  # relayed worker to worker
    assert list(relayed.output.shape) == [1, 384]


def test_unsigned_forged_and_expired_routes_are_denied_without_a_connection(mesh: KeyedMesh, listener: socket.socket) -> None:
    import time

    host, port = listener.getsockname()
    signed_elsewhere = [
        tensor_pb2.RouteHop(worker_id="a0", address=mesh.first, layers=tensor_pb2.LayerRange(start=0, end=3)),
        tensor_pb2.RouteHop(worker_id="a1", address=mesh.last, layers=tensor_pb2.LayerRange(start=3, end=6)),
    ]
    future = int(time.time() * 1000) + 60_000
    cases = [
        (_forged(listener), "the route is not signed"),
        (_forged(listener, route_mac=os.urandom(32), route_expires_ms=future), "does not match"),
        # A genuine signature for the real route, replayed with the downstream swapped for the attacker's address.
        (_forged(listener, route_mac=sign_route(mesh.key, "forged", signed_elsewhere, future), route_expires_ms=future), "does not match"),
        (_forged(listener, route_mac=b"", route_expires_ms=1), "the route is not signed"),
    ]
    expired_route = [signed_elsewhere[0], tensor_pb2.RouteHop(worker_id="victim", address=f"{host}:{port}", layers=tensor_pb2.LayerRange(start=3, end=6))]
    cases.append((_forged(listener, route_mac=sign_route(mesh.key, "forged", expired_route, 1000), route_expires_ms=1000), "expired"))
    with grpc.insecure_channel(mesh.first) as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        for request, fragment in cases:
            with pytest.raises(grpc.RpcError) as err:
                # The caller even holds the mesh token (a leaked token, a compromised pod): the route must still be signed.
                stub.Forward(request, timeout=10, metadata=mesh_call_metadata(mesh.key))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
            assert fragment in err.value.details() and "victim" in err.value.details()
    _assert_no_connection(listener)
    # The worker keeps serving signed work.
    with RouterClient(mesh.router) as client:
        assert [h.worker_id for h in client.infer(text="still serving", mode="relay").hops] == ["a0", "a1"]


def test_without_a_mesh_key_a_worker_relays_only_to_loopback(listener: socket.socket) -> None:
    worker, address = start_worker(MODEL, "0:3", "--worker-id", "open0", "--threads", "1")
    try:
        wait_serving(address)
        request = _forged(listener)
        request.downstream[0].address = "192.0.2.7:50051"  # TEST-NET-1: never a loopback peer
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                worker_pb2_grpc.ShardWorkerStub(channel).Forward(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        assert "relays only to loopback peers" in err.value.details()
    finally:
        worker.stop()
    assert any("relay routes are unauthenticated" in line for line in worker.stderr), worker.stderr[-5:]
