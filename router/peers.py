"""Persistent connections from the router to workers: one channel and one multiplexed stream per worker."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.errors import from_rpc_error
from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.layers import LayerSpan
from services.net import TlsFiles, open_channel
from services.transport.stream_client import ForwardStreamClient
from router.planning.types import WorkerInfo


class _Peer:
    def __init__(self, address: str, tls: TlsFiles | None) -> None:
        self.channel = open_channel(address, tls)
        self.stub = worker_pb2_grpc.ShardWorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.stream = ForwardStreamClient(self.channel, address)

    async def close(self) -> None:
        await self.stream.close()
        await self.channel.close(grace=None)


class WorkerPool:
    """Owns every channel the router holds; keyed by address."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self._tls = tls
        self._peers: dict[str, _Peer] = {}

    def _peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(address, self._tls)
        return peer

    def stream(self, worker: WorkerInfo) -> ForwardStreamClient:
        client = self._peer(worker.address).stream
        client.worker_id = worker.worker_id
        return client

    async def describe(self, address: str, timeout_s: float) -> WorkerInfo:
        try:
            reply: worker_pb2.DescribeResponse = await self._peer(address).stub.Describe(
                worker_pb2.DescribeRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, address=address) from None
        return WorkerInfo(
            worker_id=reply.worker_id,
            address=reply.address or address,
            model_id=reply.model_id,
            architecture=reply.architecture,
            span=LayerSpan(reply.layers.start, reply.layers.end),
            total_layers=reply.total_layers,
            checksum=reply.weights_checksum,
            hidden_size=reply.hidden_size,
        )

    async def is_serving(self, address: str, timeout_s: float) -> bool:
        """Active probe through grpc.health.v1 (used to re-admit ejected workers)."""
        try:
            reply = await self._peer(address).health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
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
