"""Persistent connections to peers: one channel and one multiplexed ForwardStream per address.

Used by the router (to every stage) and by workers (to their downstream peers in relay mode).
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.shardmesh.v1 import worker_pb2_grpc
from services.net import Metadata, TlsFiles, open_channel
from services.transport.stream_client import ForwardStreamClient


class Peer:
    def __init__(self, address: str, tls: TlsFiles | None, metadata: Metadata = ()) -> None:
        self.address = address
        self.channel = open_channel(address, tls, metadata=metadata)
        self.stub = worker_pb2_grpc.ShardWorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.stream = ForwardStreamClient(self.channel, address)

    async def close(self) -> None:
        await self.stream.close()
        await self.channel.close(grace=None)


class PeerPool:
    """Owns every channel a process holds to workers; keyed by address."""

    def __init__(self, tls: TlsFiles | None = None, metadata: Metadata = ()) -> None:
        self._tls = tls
        self._metadata = tuple(metadata)  # sent with every call to a peer: the mesh token (services/security)
        self._peers: dict[str, Peer] = {}

    def peer(self, address: str) -> Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = Peer(address, self._tls, self._metadata)
        return peer

    def stream(self, address: str, worker_id: str = "") -> ForwardStreamClient:
        client = self.peer(address).stream
        if worker_id:
            client.worker_id = worker_id
        return client

    async def is_serving(self, address: str, timeout_s: float) -> bool:
        """Active probe through grpc.health.v1."""
        try:
            reply = await self.peer(address).health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def forget(self, address: str) -> None:
        peer = self._peers.pop(address, None)
        if peer is not None:
            await peer.close()

    async def close(self) -> None:
        peers, self._peers = list(self._peers.values()), {}
        with contextlib.suppress(Exception):
            await asyncio.gather(*(p.close() for p in peers))
