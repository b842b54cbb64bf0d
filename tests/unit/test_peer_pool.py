"""PeerPool stays bounded however many addresses are dialled (issue 15: relay SSRF grew channels forever)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.transport import pool as pool_module
from services.transport.pool import PeerPool


def _unreachable_ports(count: int) -> list[int]:
    """Loopback ports with nothing listening (bound, then released)."""
    ports = []
    for _ in range(count):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    return ports


async def test_many_unreachable_addresses_keep_the_pool_and_fds_bounded() -> None:
    proc = psutil.Process()
    pool = PeerPool(max_peers=8)
    try:
        await pool.is_serving("127.0.0.1:1", 0.2)  # gRPC's own threads and fds exist before the baseline
        baseline = proc.num_fds()
        for port in _unreachable_ports(200):
            assert not await pool.is_serving(f"127.0.0.1:{port}", 0.05)
            assert len(pool) <= 8
        await asyncio.sleep(0.5)  # evicted channels finish closing
        grown = proc.num_fds() - baseline
        assert grown < 40, f"{grown} file descriptors more after dialling 200 unreachable addresses"
    finally:
        await pool.close()


async def test_many_live_addresses_hold_at_most_max_peers_connections() -> None:
    """200 distinct loopback addresses of one live server: each would keep a connection (an fd) open."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("0.0.0.0:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    proc = psutil.Process()
    pool = PeerPool(max_peers=8)
    try:
        assert await pool.is_serving(f"127.0.0.1:{port}", 5)
        baseline = proc.num_fds()
        for i in range(2, 202):
            assert await pool.is_serving(f"127.0.0.{i}:{port}", 5)
            assert len(pool) <= 8
        await asyncio.sleep(0.5)
        grown = proc.num_fds() - baseline
        assert grown < 40, f"{grown} file descriptors more after dialling 200 live addresses"
    finally:
        await pool.close()
        await server.stop(None)


async def test_a_peer_that_never_connects_is_dropped(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pool_module, "SWEEP_INTERVAL_S", 0.0)
    monkeypatch.setattr(pool_module, "RECENT_S", 0.1)
    pool = PeerPool(failed_s=0.3)
    try:
        dead = f"127.0.0.1:{_unreachable_ports(1)[0]}"
        assert not await pool.is_serving(dead, 0.05)
        await asyncio.sleep(0.5)
        pool.peer("127.0.0.1:2")  # any use sweeps
        assert len(pool) == 1, "a peer failing for longer than failed_s was kept (it would reconnect forever)"
    finally:
        await pool.close()
