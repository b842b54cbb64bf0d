"""Persistent connections to peers: one channel and one multiplexed ForwardStream per address.

Used by the router (to every stage) and by workers (to their downstream peers in relay mode).
Bounded: at most ``max_peers`` channels (least recently used evicted first), a peer unused for
``idle_s`` is closed, and so is one whose channel has not been READY for ``failed_s`` (instead of
reconnecting forever). A peer with requests in flight on its stream is never evicted; an evicted
address is simply dialled again on its next use. File descriptors and memory stay bounded however
many addresses are dialled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.shardmesh.v1 import worker_pb2_grpc
from services.net import Metadata, TlsFiles, open_channel
from services.transport.stream_client import ForwardStreamClient


MAX_PEERS = 256
IDLE_EVICT_S = 600.0
FAILED_EVICT_S = 60.0
SWEEP_INTERVAL_S = 1.0
RECENT_S = 5.0  # a peer used this recently may have a unary call in flight: not evicted


class Peer:
    def __init__(self, address: str, tls: TlsFiles | None, metadata: Metadata = ()) -> None:
        self.address = address
        self.channel = open_channel(address, tls, metadata=metadata)
        self.stub = worker_pb2_grpc.ShardWorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.stream = ForwardStreamClient(self.channel, address)
        self.last_used = time.monotonic()
        self.unready_since = self.last_used  # cleared while the channel is READY

    def busy(self, now: float) -> bool:
        return self.stream.pending_count > 0 or now - self.last_used < RECENT_S

    def observe(self, now: float) -> None:
        if self.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY:
            self.unready_since = now

    async def close(self) -> None:
        await self.stream.close()
        await self.channel.close(grace=None)


class PeerPool:
    """Owns every channel a process holds to workers; keyed by address."""

    def __init__(
        self,
        tls: TlsFiles | None = None,
        metadata: Metadata = (),
        *,
        max_peers: int = MAX_PEERS,
        idle_s: float = IDLE_EVICT_S,
        failed_s: float = FAILED_EVICT_S,
    ) -> None:
        self._tls = tls
        self._metadata = tuple(metadata)  # sent with every call to a peer: the mesh token (services/security)
        self._peers: collections.OrderedDict[str, Peer] = collections.OrderedDict()  # least recently used first
        self._max_peers = max_peers
        self._idle_s = idle_s
        self._failed_s = failed_s
        self._last_sweep = time.monotonic()
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._peers)

    def peer(self, address: str) -> Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = Peer(address, self._tls, self._metadata)
        else:
            self._peers.move_to_end(address)
        now = time.monotonic()
        peer.last_used = now
        if len(self._peers) > self._max_peers or now - self._last_sweep >= SWEEP_INTERVAL_S:
            self._sweep(now)
        return peer

    def _sweep(self, now: float) -> None:
        """Closes idle and long-failing peers, then the least recently used beyond ``max_peers``."""
        self._last_sweep = now
        for address, peer in list(self._peers.items()):
            peer.observe(now)
            if peer.busy(now):
                continue
            if now - peer.last_used > self._idle_s or now - peer.unready_since > self._failed_s:
                self._evict(address)
        newest = next(reversed(self._peers), "")
        for address, peer in list(self._peers.items()):
            if len(self._peers) <= self._max_peers:
                break
            if address != newest and peer.stream.pending_count == 0:
                self._evict(address)

    def _evict(self, address: str) -> None:
        peer = self._peers.pop(address)
        task = asyncio.create_task(peer.close(), name=f"close:{address}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

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
        peers, self._peers = list(self._peers.values()), collections.OrderedDict()
        with contextlib.suppress(Exception):
            await asyncio.gather(*(p.close() for p in peers), *self._closing)
