"""The router's connections to workers: the shared :class:`PeerPool` plus Describe -> WorkerInfo."""

from __future__ import annotations

import grpc

from services.errors import from_rpc_error
from services.gen.shardmesh.v1 import worker_pb2
from services.layers import LayerSpan
from services.transport.pool import PeerPool
from services.transport.stream_client import ForwardStreamClient
from router.planning.types import WorkerInfo


class WorkerPool(PeerPool):
    def stream_to(self, worker: WorkerInfo) -> ForwardStreamClient:
        return self.stream(worker.address, worker.worker_id)

    async def describe(self, address: str, timeout_s: float) -> WorkerInfo:
        """Describes the worker at ``address``, the address discovery gave: that is what the router dials.

        The worker's own idea of its address (``--advertise``, or its bind address) is only logged when it
        differs: with static discovery or NAT, it may well be unreachable from here (``0.0.0.0`` binds
        report a loopback address)."""
        try:
            reply: worker_pb2.DescribeResponse = await self.peer(address).stub.Describe(
                worker_pb2.DescribeRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, address=address) from None
        return WorkerInfo(
            worker_id=reply.worker_id,
            address=address,
            model_id=reply.model_id,
            architecture=reply.architecture,
            span=LayerSpan(reply.layers.start, reply.layers.end),
            total_layers=reply.total_layers,
            checksum=reply.weights_checksum,
            hidden_size=reply.hidden_size,
            speed=max(0.0, reply.capacity.speed),
        )
