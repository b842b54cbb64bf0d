"""Relay mode, worker side: forward this stage's output to the next worker and return its answer.

The result comes back along the chain (not straight to the router) so that only router->worker and
worker->worker connections exist, which is what the Helm chart's NetworkPolicy allows, and the
router needs no inbound port for results. If the next hop fails, this worker does not reroute by
itself: it returns the activation it could not deliver with the failed hop named, and the router,
which sees every replica, resumes from there.

Routes are the router's word (issue 15): with a mesh key a worker relays only along a route the
router signed (:mod:`services.security.route_mac`) and passes the rest of the signature on; without
one it relays only to loopback peers. Either way the check runs before any compute or connection.
The output segment is freed on every path where the next hop may not have read it (failure,
cancellation).
"""

from __future__ import annotations

import logging
import time

import torch

from services import tracing
from services.errors import DeadlineExceeded, FailedPrecondition, PermissionDenied, ShardmeshError, Unavailable, status_of
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2
from services.transport.pool import PeerPool
from services.transport.stream_client import downstream_budget
from services.wire import codec, placement
from services.security.route_mac import downstream_mac, verify_route
from services.wire.shm import is_colocated

log = logging.getLogger(__name__)

_UNDELIVERED = (Unavailable, DeadlineExceeded)


class Relay:
    def __init__(self, pool: PeerPool, worker_id: str, use_shm: bool = True, mesh_key: bytes | None = None) -> None:
        self._pool = pool
        self._worker_id = worker_id
        self._use_shm = use_shm
        self._mesh_key = mesh_key
        self._warned_unsigned = False

    def authorize(self, request: worker_pb2.ForwardRequest) -> None:
        """PERMISSION_DENIED unless this worker may relay along ``request.downstream`` (no I/O, before compute)."""
        if not request.downstream:
            return
        if self._mesh_key is not None:
            verify_route(self._mesh_key, request)
            return
        if not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning(
                "worker %s has no --mesh-key-file: relay routes are unauthenticated, so it relays only to loopback peers",
                self._worker_id,
            )
        for hop in request.downstream:
            if not is_colocated(hop.address):
                raise PermissionDenied(
                    f"relay to {hop.worker_id} ({hop.address}) refused: this worker has no --mesh-key-file, so it"
                    " relays only to loopback peers; start the router and every worker with the same --mesh-key-file"
                )

    @staticmethod
    def check_route(request: worker_pb2.ForwardRequest, span_end: int, total_layers: int) -> None:
        """The next hop must start where this worker ends, before any compute is spent."""
        if not request.downstream:
            return
        nxt = request.downstream[0]
        if nxt.layers.start != span_end:
            raise FailedPrecondition(
                f"relay route is not contiguous: this worker ends at layer {span_end} but the next hop "
                f"{nxt.worker_id} starts at {nxt.layers.start}"
            )
        if span_end >= total_layers:
            raise FailedPrecondition("relay route continues past the model's last layer")

    async def forward(
        self,
        request: worker_pb2.ForwardRequest,
        output: tensor_pb2.Tensor,
        output_tensor: torch.Tensor,
        record: tensor_pb2.HopRecord,
        deadline: float | None,
    ) -> worker_pb2.ForwardResponse:
        nxt = request.downstream[0]
        remaining = (deadline - time.monotonic()) if deadline is not None else 30.0
        if request.hop_timeout_ms:  # each hop after this one gets the caller's per-hop allowance at most
            remaining = min(remaining, request.hop_timeout_ms / 1000.0 * len(request.downstream))
        if remaining <= 0:
            raise DeadlineExceeded(
                f"deadline exceeded at hop {self._worker_id} before relaying to {nxt.worker_id}",
                failed_worker_id=self._worker_id,
            )
        down = worker_pb2.ForwardRequest(
            request_id=request.request_id,
            input=output,
            layers=nxt.layers,
            model_checksum=request.model_checksum,
            timeout_ms=max(1, int(downstream_budget(remaining) * 1000)),
            mode=tensor_pb2.MODE_RELAY,
            source=tensor_pb2.SOURCE_UPSTREAM_WORKER,
            source_worker_id=self._worker_id,
            reply_dtype=request.reply_dtype,
            hop_timeout_ms=request.hop_timeout_ms,
            # The final output returns through this worker untouched: a shm handle is fine if the caller
            # that will read it shares this host with the next worker (so with every hop after it).
            reply_shm=request.reply_shm and self._use_shm and is_colocated(nxt.address),
            session_id=request.session_id,
            position=request.position,
            session_ttl_s=request.session_ttl_s,
            session_key=request.session_key,
            replay_step_lengths=request.replay_step_lengths,  # a replay's steps: this output is theirs, concatenated
            route_mac=downstream_mac(request),
            route_expires_ms=request.route_expires_ms,
            priority=request.priority,
        )
        down.downstream.extend(request.downstream[1:])
        down.upstream_hops.extend(request.upstream_hops)
        down.upstream_hops.append(record)
        if request.HasField("attention_mask"):
            down.attention_mask.CopyFrom(request.attention_mask)
        relay_span = _relay_span(request, nxt)  # tracing: NOOP when off or this request is not sampled
        if relay_span.recording:
            down.traceparent = relay_span.traceparent  # the next worker's span is a child of this relay span
        with relay_span:
            started = time.monotonic()
            try:
                response = await self._pool.stream(nxt.address, nxt.worker_id).call(down, downstream_budget(remaining))
            except _UNDELIVERED as exc:
                placement.release(output)
                relay_span.event("next hop failed", {"shardmesh.failed_worker_id": nxt.worker_id, "shardmesh.error": type(exc).__name__})
                return self._undelivered(request, exc, output_tensor, down, nxt)
            except ShardmeshError as exc:
                placement.release(output)
                if exc.relay_response is not None:
                    return exc.relay_response  # an error further down: pass it back unchanged
                raise
            except BaseException:  # cancelled (the caller went away) or a bug: the next hop may never read it
                placement.release(output)
                raise
            hop_ms = 1000 * (time.monotonic() - started)
            for hop in response.hops:
                if hop.worker_id == nxt.worker_id and hop.layers.start == nxt.layers.start:
                    hop.hop_ms = hop_ms
            return response

    def _undelivered(
        self,
        request: worker_pb2.ForwardRequest,
        exc: ShardmeshError,
        output: torch.Tensor,
        down: worker_pb2.ForwardRequest,
        nxt: tensor_pb2.RouteHop,
    ) -> worker_pb2.ForwardResponse:
        if exc.relay_response is not None and exc.failed_worker_id != nxt.worker_id:
            return exc.relay_response  # failed deeper in the chain: that worker holds the activation
        code, message = status_of(exc)
        response = worker_pb2.ForwardResponse(request_id=request.request_id)
        response.hops.extend(down.upstream_hops)
        response.error.code = code.value[0]
        response.error.message = message
        response.error.failed_worker_id = nxt.worker_id
        response.error.failed_address = nxt.address
        response.error.failed_layers.CopyFrom(nxt.layers)
        # Inline bytes: the router may be on another host, and a shm segment may already be gone.
        codec.encode(output, response.error.pending_input)
        return response


def _relay_span(request: worker_pb2.ForwardRequest, nxt: tensor_pb2.RouteHop) -> tracing.NoopSpan | tracing.Span:
    """This worker's span for handing its output to the next hop (child of its own message span)."""
    if not (request.traceparent and tracing.enabled()):
        return tracing.NOOP
    attributes = {"shardmesh.next_worker_id": nxt.worker_id, "shardmesh.next_address": nxt.address,
                  "shardmesh.next_layers": f"{nxt.layers.start}:{nxt.layers.end}"}
    return tracing.span("worker.relay", attributes, require_parent=True)
