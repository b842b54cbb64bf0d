"""What a worker does with one ForwardRequest: check it, run the stage, attribute the hop.

Transport-free apart from the protobuf types: the servicer (unary and stream) and, later, the relay
path call :meth:`WorkerCore.forward`.

Drain (SIGTERM): :meth:`WorkerCore.drain` waits for every call in :meth:`WorkerCore.forward`, which
includes a relay's wait for its downstream, not only for computes, and lets open sessions finish.

Shared memory: an output segment belongs to this worker until a receiver claims it. If the request
goes away first (caller cancelled, deadline, relay failure) while the compute thread is still
packing, :class:`OutputHandoff` frees the segment whichever side finishes last, so nothing leaks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import torch

from services import tracing
from services.errors import DeadlineExceeded, FailedPrecondition
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2
from services.models.base import ModelSource, StageModel
from services.wire import codec, placement
from services.wire.shm import is_colocated
from shard_worker.engine import StageEngine
from shard_worker.inputs import check_plan, decode_input, replay_lengths, reply_dtype
from shard_worker.relay import Relay
from shard_worker.sessions import SessionService

log = logging.getLogger(__name__)

VERSION = "0.1.0"
DRAIN_POLL_S = 0.05


class OutputHandoff:
    """Passes the packed output from the compute thread to the request, or frees it if the request left.

    The compute thread cannot be interrupted, so a request cancelled mid-compute would otherwise
    drop a shared-memory segment that the thread creates after the cancel. Both orders are covered:
    :meth:`abandon` frees what was already packed, and :meth:`put` after an abandon frees at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._packed: tensor_pb2.Tensor | None = None

    def put(self, msg: tensor_pb2.Tensor) -> None:
        with self._lock:
            if not self._abandoned:
                self._packed = msg
                return
        placement.release(msg)

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            msg, self._packed = self._packed, None
        if msg is not None:
            placement.release(msg)


class WorkerCore:
    def __init__(
        self,
        stage: StageModel,
        engine: StageEngine,
        max_tensor_bytes: int,
        address: str,
        wire_dtype: torch.dtype = torch.float32,
        relay: Relay | None = None,
        use_shm: bool = True,
        sessions: SessionService | None = None,
    ) -> None:
        self.stage = stage
        self.engine = engine
        self.max_tensor_bytes = max_tensor_bytes
        self.address = address
        self.wire_dtype = wire_dtype
        self.relay = relay
        self.use_shm = use_shm
        self.sessions = sessions
        self.active = 0

    @property
    def worker_id(self) -> str:
        return self.engine.worker_id

    @property
    def source(self) -> ModelSource:
        return self.stage.source

    def deadline_for(self, request: worker_pb2.ForwardRequest, rpc_time_remaining: float | None) -> float | None:
        """The earliest of the RPC deadline and the request's own ``timeout_ms`` (streams), as monotonic time."""
        now = time.monotonic()
        candidates = []
        if rpc_time_remaining is not None:
            candidates.append(now + rpc_time_remaining)
        if request.timeout_ms:
            candidates.append(now + request.timeout_ms / 1000.0)
        return min(candidates) if candidates else None

    async def forward(self, request: worker_pb2.ForwardRequest, deadline: float | None) -> worker_pb2.ForwardResponse:
        """Runs this stage (and, in relay mode, the rest of the chain); ``active`` counts calls in progress."""
        self.active += 1
        handoff = OutputHandoff()
        try:
            if request.traceparent and tracing.enabled():  # one span per message, child of the sender's hop span
                with tracing.span("worker.forward", self._span_attributes(request), traceparent=request.traceparent,
                                  require_parent=True):
                    return await self._forward(request, deadline, handoff)
            return await self._forward(request, deadline, handoff)
        except BaseException:
            handoff.abandon()  # nobody will read this request's output segment (if it has one)
            raise
        finally:
            self.active -= 1

    def _span_attributes(self, request: worker_pb2.ForwardRequest) -> dict[str, object]:
        return {
            "shardmesh.worker_id": self.worker_id,
            "shardmesh.layers": f"{self.stage.span.start}:{self.stage.span.end}",
            "shardmesh.call_id": request.request_id,
            "shardmesh.source": "upstream_worker" if request.source == tensor_pb2.SOURCE_UPSTREAM_WORKER else "router",
            "shardmesh.source_worker_id": request.source_worker_id,
            "shardmesh.session": bool(request.session_id),
        }

    async def drain(self, grace_s: float) -> bool:
        """Refuses new work and waits, within ``grace_s``, for all of it: computes, requests waiting on their
        downstream hop (relay), and open generation sessions (their steps still run; new sessions are refused).

        Returns whether everything finished in time. Call after routers were told to stop sending here.
        """
        deadline = time.monotonic() + grace_s
        if self.sessions is not None:
            self.sessions.begin_drain()
        await self.engine.drain(grace_s)  # refuses new stateless work from now on
        if self.sessions is not None and not await self.sessions.wait_closed(max(0.0, deadline - time.monotonic())):
            return False
        while self.active:  # relayed requests wait on their downstream after their compute finished
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_S)
        return True

    async def _forward(
        self, request: worker_pb2.ForwardRequest, deadline: float | None, handoff: OutputHandoff
    ) -> worker_pb2.ForwardResponse:
        span = self.stage.span
        check_plan(request, span, self.source.checksum, self.worker_id)
        Relay.check_route(request, span.end, self.source.total_layers)
        if request.downstream:  # before any compute or connection: only routes the router chose
            if self.relay is None:
                raise FailedPrecondition(f"worker {self.worker_id} does not relay")
            self.relay.authorize(request)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"deadline exceeded before hop {self.worker_id} started", failed_worker_id=self.worker_id)
        inputs = decode_input(request, self.stage, self.max_tensor_bytes)
        replay = replay_lengths(request, inputs.x)
        stage = self.stage
        wire_dtype = reply_dtype(request, self.wire_dtype)
        # The receiver is the next worker (relay) or the caller; large outputs to a co-located one go by shm.
        colocated = self.use_shm and (
            is_colocated(request.downstream[0].address) if request.downstream else request.reply_shm
        )

        def finish(out: torch.Tensor) -> tuple[tensor_pb2.Tensor, torch.Tensor]:
            if not stage.is_last and out.dtype != wire_dtype:
                out = out.to(wire_dtype)
            packed = placement.pack(out, colocated=colocated, request_id=request.request_id)
            handoff.put(packed)
            return packed, out

        if request.session_id:
            if self.sessions is None:
                raise FailedPrecondition(
                    f"worker {self.worker_id} serves {self.source.model_id}, which has no generation sessions"
                )
            started = time.monotonic()
            out = await self._session_steps(request, inputs.x, replay, deadline)
            compute_ms, queue_ms = 1000 * (time.monotonic() - started), 0.0
            output, output_tensor = finish(out)
            batch_size = 1
        else:
            # Forward and serialisation both run in the compute thread: large copies stay off the event loop.
            # The forward may be shared with other queued requests (dynamic batching, see engine.py).
            result = await self.engine.forward(
                inputs.x, inputs.attention_mask, finish, deadline, priority=request.priority
            )
            output, output_tensor = result.value  # type: ignore[misc]
            compute_ms, queue_ms, batch_size = result.compute_ms, result.queue_ms, result.batch_size
        if request.traceparent and tracing.enabled():
            _trace_phases(queue_ms, compute_ms, batch_size)
        record = tensor_pb2.HopRecord(
            worker_id=self.worker_id,
            layers=tensor_pb2.LayerRange(start=span.start, end=span.end),
            source=request.source or tensor_pb2.SOURCE_ROUTER,
            source_worker_id=request.source_worker_id,
            compute_ms=compute_ms,
            queue_ms=queue_ms,
            input_transport="shm" if request.input.shm_handle else "inline",
            batch_size=batch_size,
        )
        if request.downstream and self.relay is not None:  # authorised above
            return await self.relay.forward(request, output, output_tensor, record, deadline)
        response = worker_pb2.ForwardResponse(request_id=request.request_id, output=output)
        response.hops.extend(request.upstream_hops)
        response.hops.append(record)
        return response

    async def _session_steps(
        self, request: worker_pb2.ForwardRequest, x: torch.Tensor, replay: list[int], deadline: float | None
    ) -> torch.Tensor:
        """One session step, or (``replay``) several (:meth:`SessionService.replay`: step by step, bit-identical,
        with ``--no-batching``; in chunks with batching on), outputs concatenated."""
        assert self.sessions is not None
        sessions, sid, ttl, key = self.sessions, request.session_id, request.session_ttl_s, request.session_key
        if not replay:
            return await sessions.step(sid, request.position, ttl, x, deadline, key)
        outputs = await sessions.replay(sid, request.position, ttl, x, replay, deadline, key)
        log.info("session %s: replayed %d steps (%d tokens) in one request", sid, len(replay), sum(replay))
        return torch.cat(outputs, dim=1)

    def describe(self) -> worker_pb2.DescribeResponse:
        span, src = self.stage.span, self.source
        return worker_pb2.DescribeResponse(
            worker_id=self.worker_id,
            model_id=src.model_id,
            architecture=src.architecture,
            layers=tensor_pb2.LayerRange(start=span.start, end=span.end),
            total_layers=src.total_layers,
            dtype=codec.dtype_name(self.stage.dtype),
            weights_checksum=src.checksum,
            version=VERSION,
            capacity=worker_pb2.Capacity(
                max_inflight=self.engine.max_inflight,
                inflight=self.active,
                max_tensor_bytes=self.max_tensor_bytes,
                cache_budget_bytes=self.sessions.store.budget_bytes if self.sessions else 0,
                cache_used_bytes=self.sessions.store.bytes_used if self.sessions else 0,
                sessions=self.sessions.store.count if self.sessions else 0,
            ),
            state="draining" if self.engine.draining else "serving",
            address=self.address,
            hidden_size=src.hidden_size,
        )


def _trace_phases(queue_ms: float, compute_ms: float, batch_size: int) -> None:
    """Queue wait and compute (measured by the compute thread) as child spans of this message's span, placed
    back in time from now: compute ended just before this runs, the queue wait ended when compute began."""
    span = tracing.current()
    end = time.time_ns()
    compute_start = end - int(compute_ms * 1e6)
    span.interval("worker.queue", compute_start - int(queue_ms * 1e6), compute_start, {"shardmesh.queue_ms": queue_ms})
    span.interval("worker.compute", compute_start, end, {"shardmesh.compute_ms": compute_ms, "shardmesh.batch_size": batch_size})
