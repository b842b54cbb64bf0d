"""Runs one request through the planned stages (direct mode), failing over hop by hop.

The router keeps each stage's input until that stage answers, so a failed hop is resent to another
replica of the same layers: nothing upstream is recomputed. A hop failure is attributed to the hop
that failed; retries are bounded per request and by a router-wide budget, and never outlive the
request's deadline.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from services.errors import DeadlineExceeded, ResourceExhausted, ShardmeshError, Unavailable
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2
from services.telemetry import FAILOVERS
from router.peers import WorkerPool
from router.planning.balancer import ReplicaStats, choose_replica
from router.planning.outlier import OutlierDetector
from router.planning.retry_budget import RetryBudget
from router.planning.types import WorkerInfo
from router.topology import Topology

log = logging.getLogger(__name__)

# Errors after which another replica may succeed. INVALID_ARGUMENT or FAILED_PRECONDITION would fail
# the same way everywhere, so they are returned at once.
_RETRYABLE = (Unavailable, DeadlineExceeded, ResourceExhausted)


@dataclass(frozen=True)
class PipelineSettings:
    hop_timeout_s: float
    max_attempts: int  # per hop


@dataclass
class PipelineResult:
    output: tensor_pb2.Tensor
    hops: list[tensor_pb2.HopRecord] = field(default_factory=list)
    attempts: int = 1


class DirectPipeline:
    def __init__(
        self,
        topology: Topology,
        pool: WorkerPool,
        settings: PipelineSettings,
        outliers: OutlierDetector,
        retry_budget: RetryBudget,
        rng: random.Random | None = None,
    ) -> None:
        self._topology = topology
        self._pool = pool
        self._settings = settings
        self._outliers = outliers
        self._budget = retry_budget
        self._rng = rng or random.Random()
        self.stats: dict[str, ReplicaStats] = {}

    def _stats(self, worker_id: str) -> ReplicaStats:
        stats = self.stats.get(worker_id)
        if stats is None:
            stats = self.stats[worker_id] = ReplicaStats()
        return stats

    async def run(
        self,
        request_id: str,
        ids: tensor_pb2.Tensor,
        mask: tensor_pb2.Tensor | None,
        deadline: float,
    ) -> PipelineResult:
        now = time.monotonic()
        self._budget.record_request(now)
        plan = self._topology.plan(excluded=self._outliers.ejected(now))
        checksum, total = plan.checksum, plan.total_layers
        result = PipelineResult(output=ids)
        layer = 0
        stage_input = ids
        failed: set[str] = set()  # workers that failed this request: not tried again for it
        while layer < total:
            attempt = 0
            last_error: tuple[ShardmeshError, WorkerInfo] | None = None
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise DeadlineExceeded(f"request {request_id} ran out of time before layer {layer}")
                excluded = frozenset(failed) | self._outliers.ejected(now)
                try:
                    stage = self._topology.plan(excluded=excluded, start_layer=layer, checksum=checksum).stages[0]
                except Unavailable as no_route:
                    if last_error is None:
                        raise
                    # Report the hop that failed first; the planner's view explains why nothing else could serve.
                    raise _name_hop(last_error[0], last_error[1], also=str(no_route)) from None
                worker = choose_replica(stage.replicas, self.stats, self._rng)
                try:
                    response, hop_ms = await self._call(worker, request_id, attempt, stage_input, mask, checksum, deadline)
                except _RETRYABLE as exc:
                    attempt += 1
                    last_error = (exc, worker)
                    failed.add(worker.worker_id)
                    if not isinstance(exc, ResourceExhausted):
                        self._outliers.record_failure(worker.worker_id, time.monotonic(), stage.replica_ids)
                    retry_ok = attempt < self._settings.max_attempts and self._budget.try_acquire_retry(time.monotonic())
                    if not retry_ok:
                        raise _name_hop(exc, worker) from None
                    FAILOVERS.labels(reason=type(exc).__name__).inc()
                    result.attempts += 1
                    log.warning("request %s: hop %s failed (%s); failing over", request_id, worker.worker_id, exc)
                    continue
                break
            self._outliers.record_success(worker.worker_id, time.monotonic())
            hop = response.hops[-1]
            hop.hop_ms = hop_ms
            result.hops.append(hop)
            stage_input = response.output
            layer = stage.span.end
        result.output = stage_input
        return result

    async def _call(
        self,
        worker: WorkerInfo,
        request_id: str,
        attempt: int,
        stage_input: tensor_pb2.Tensor,
        mask: tensor_pb2.Tensor | None,
        checksum: str,
        deadline: float,
    ) -> tuple[worker_pb2.ForwardResponse, float]:
        remaining = deadline - time.monotonic()
        timeout = min(self._settings.hop_timeout_s, remaining)
        request = worker_pb2.ForwardRequest(
            request_id=f"{request_id}/{worker.span}/{attempt}",
            input=stage_input,
            layers=tensor_pb2.LayerRange(start=worker.span.start, end=worker.span.end),
            model_checksum=checksum,
            timeout_ms=max(1, int(timeout * 1000)),
            source=tensor_pb2.SOURCE_ROUTER,
        )
        if mask is not None:
            request.attention_mask.CopyFrom(mask)
        stats = self._stats(worker.worker_id)
        stats.start()
        started = time.monotonic()
        try:
            response = await self._pool.stream(worker).call(request, timeout)
        finally:
            stats.finish()
        elapsed = time.monotonic() - started
        stats.observe(elapsed, time.monotonic())
        return response, elapsed * 1000


def _name_hop(exc: ShardmeshError, worker: WorkerInfo, also: str = "") -> ShardmeshError:
    """Makes sure the error a caller sees names the hop that failed (id, address and layers)."""
    named = all(part in exc.message for part in (worker.worker_id, worker.address, str(worker.span)))
    if not named:
        exc.message = f"hop {worker.worker_id} ({worker.address}, layers {worker.span}) failed: {exc.message}"
    if also:
        exc.message = f"{exc.message}; {also}"
    exc.failed_worker_id = exc.failed_worker_id or worker.worker_id
    exc.failed_address = exc.failed_address or worker.address
    return exc
