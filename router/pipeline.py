"""Runs one request through the planned stages (direct or relay), failing over hop by hop.

The router keeps each stage's input until that stage answers, so a failed hop is resent to another
replica of the same layers: nothing upstream is recomputed. A hop failure is attributed to the hop
that failed; retries are bounded per request and by a router-wide budget, and never outlive the
request's deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable, Collection, Sequence

import torch
from dataclasses import dataclass, field

from services import tracing
from services.errors import DeadlineExceeded, FailedPrecondition, ShardmeshError, Unavailable
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2
from services.telemetry import FAILOVERS, HEDGES, HOP_FAILURES, HOP_SECONDS
from services.transport.release import release_response
from services.transport.stream_client import downstream_budget
from services.security.route_mac import sign_route
from services.wire import codec, placement, shm
from router.peers import WorkerPool
from router.scheduling.context import current_priority
from router.planning.balancer import ReplicaStats
from router.planning.balancers import Balancer
from router.planning.hop_errors import counts_against_worker, is_server_fault, may_fail_over
from router.planning.outlier import OutlierDetector
from router.planning.retry_budget import RetryBudget
from router.planning.route_wait import RouteWait, plan_waiting
from router.planning.types import RoutePlan, WorkerInfo
from router.topology import Topology

log = logging.getLogger(__name__)

# Errors after which another replica may succeed are decided in router/planning/hop_errors.py.
# INVALID_ARGUMENT or FAILED_PRECONDITION would fail the same way everywhere, so they are returned at
# once; INTERNAL/UNKNOWN (a broken replica) is retried once per request on another replica.
MAX_SERVER_FAULT_RETRIES = 1


@dataclass(frozen=True)
class PipelineSettings:
    hop_timeout_s: float
    max_attempts: int  # per hop
    hedge_after_s: float = 0.0  # 0 = no hedging
    hedge_fixed: bool = False  # True: hedge after exactly hedge_after_s; False: not before the hop's recent p95
    wire_dtype: int = 0  # tensor_pb2.DType for activations workers send; 0 = each worker's --wire-dtype
    use_shm: bool = True  # shared memory for large activations to co-located workers
    mesh_key: bytes | None = None  # signs relay routes (services/security/route_mac.py); None = unsigned
    route_wait_s: float = 0.0  # --route-wait-s: hold a request with no route this long for coverage (0 = fail at once)


# What a stage gets as input: a decoded tensor, or an inline wire message handed on exactly as the previous
# stage (or the client) sent it. Direct mode passes a stage's inline output to the next stage without decoding
# and re-encoding it (the bytes a re-encode would give, two copies fewer per hop); the message stays the router's
# copy of the stage input for failover and hedging.
StageInput = torch.Tensor | tensor_pb2.Tensor


@dataclass
class PipelineResult:
    output: torch.Tensor
    hops: list[tensor_pb2.HopRecord] = field(default_factory=list)
    attempts: int = 1
    checksum: str = ""  # the weights that computed ``output`` (keys the router's result cache)
    output_wire: tensor_pb2.Tensor | None = None  # ``output`` as the last stage sent it inline (None: it came by shm)


class Pipeline:
    """Direct and relay execution with hop-level failover.

    direct: the router sends each stage's input and receives its output, one stage at a time.
    relay: the router sends the input and the rest of the route to the first stage; each worker
    forwards to the next and the final output returns back along the chain. If a worker cannot
    deliver to its downstream peer, it returns the activation it holds with the failed hop named,
    and the router resumes from that stage on another replica (nothing upstream is recomputed).
    """

    def __init__(
        self,
        topology: Topology,
        pool: WorkerPool,
        settings: PipelineSettings,
        outliers: OutlierDetector,
        retry_budget: RetryBudget,
        rng: random.Random | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        self._topology = topology
        self.balancer = balancer or Balancer()  # --balancer; p2c by default
        self._pool = pool
        self._settings = settings
        self.outliers = outliers
        self._budget = retry_budget
        self._rng = rng or random.Random()
        self.stats: dict[str, ReplicaStats] = {}
        # Worker-side ids (calls, sessions) carry this router's nonce and a per-request sequence number,
        # so client-chosen ids never collide on a worker (another router, or a retry of the same id).
        self.nonce = secrets.token_hex(4)
        self._sequence = itertools.count()
        self._background: set[asyncio.Task[object]] = set()  # cancelled hedge losers finishing their cleanup

    def worker_key(self, client_id: str) -> str:
        """A worker-side id for one request of the client's ``client_id``: unique to this router and request."""
        return f"{self.nonce}.{next(self._sequence)}:{client_id}"

    def excluded(self, failed: Collection[str], now: float) -> frozenset[str]:
        """What planning must avoid: the request's ``failed`` workers and ejected ones, except that a
        span in panic (too few healthy replicas) keeps its ejected replicas routable, and ejection never
        removes a span's last replica (see OutlierDetector.excluded)."""
        return self.outliers.excluded(self._topology.stage_groups().values(), failed, now)

    def stage_members(self, worker: WorkerInfo) -> tuple[str, ...]:
        """Every worker known for ``worker``'s layers and weights (the stage's full membership)."""
        return self._topology.stage_groups().get((worker.checksum, worker.span)) or (worker.worker_id,)

    def record_hop_failure(self, worker: WorkerInfo, exc: BaseException, *, request_deadline: float) -> None:
        """Counts an outlier failure of ``worker`` unless it was not the worker's fault (see hop_errors)."""
        now = time.monotonic()
        HOP_FAILURES.labels(worker=worker.worker_id, reason=type(exc).__name__).inc()
        if counts_against_worker(exc, request_deadline - now):
            if self.outliers.record_failure(worker.worker_id, now, self.stage_members(worker)):
                log.warning("worker %s (%s) ejected after consecutive failures: %s", worker.worker_id, worker.address, exc)

    def choose(self, replicas: Sequence[WorkerInfo]) -> WorkerInfo:
        """One replica of a stage by the --balancer policy over this router's latency and load view; every
        choice (route, relay chain, hedge, generation route and replay) goes through here."""
        return self.balancer.choose(replicas, self.stats, self._rng)

    def record_request(self) -> None:
        """One original request (or generation step) for the retry budget."""
        self._budget.record_request(time.monotonic())

    def try_retry(self) -> bool:
        """Takes one retry (failover, replay) from the router-wide budget; False when it is spent."""
        return self._budget.try_acquire_retry(time.monotonic())

    def route_wait(self, deadline: float) -> RouteWait:
        """One request's coverage wait (--route-wait-s, never past ``deadline``); shared by all its plans."""
        return RouteWait(self._settings.route_wait_s, deadline)

    async def plan_waiting(
        self, plan: Callable[[], RoutePlan], wait: RouteWait, failed: set[str] | None = None,
        failed_joins: dict[str, int] | None = None,
    ) -> RoutePlan:
        """``plan()``, or when it raises Unavailable, the same after waiting for coverage (router/planning/
        route_wait.py). While waiting, workers this request gave up on (``failed``) are forgiven once they
        re-joined the table or answer SERVING again (restarted in place): they may be the stage's only replica."""

        async def forgive() -> None:
            if not failed:
                return
            candidates = sorted(failed)
            rejoined = {w for w in candidates if self._topology.joins(w) != (failed_joins or {}).get(w, self._topology.joins(w))}
            by_id = {w.worker_id: w for w in self._topology.workers}
            probe = [w for w in candidates if w not in rejoined and w in by_id]
            serving = await asyncio.gather(*(self._pool.is_serving(by_id[w].address, FORGIVE_PROBE_S) for w in probe))
            for worker_id in rejoined | {w for w, ok in zip(probe, serving) if ok}:
                failed.discard(worker_id)
                log.info("worker %s is back; this request may use it again", worker_id)

        topology = self._topology  # looked up only when waiting: unit tests' fake topologies have no versions
        return await plan_waiting(plan, wait, lambda v, t: topology.wait_version(v, t), lambda: topology.version,
                                  on_change=forgive)

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
        *,
        relay: bool = False,
    ) -> PipelineResult:
        self._budget.record_request(time.monotonic())
        wait = self.route_wait(deadline)
        plan = await self.plan_waiting(lambda: self._topology.plan(excluded=self.excluded((), time.monotonic())), wait)
        key = self.worker_key(request_id)
        checksum, total = plan.checksum, plan.total_layers
        stage_input: StageInput = ids  # inline, already checked by router/inputs.py: handed on as it came
        result = PipelineResult(output=torch.empty(0), checksum=checksum)
        layer = 0
        failed: set[str] = set()  # workers that failed this request: not tried again for it (unless they come back)
        failed_joins: dict[str, int] = {}  # Topology.joins of each failed worker when it failed
        attempts: dict[int, int] = {}  # failed attempts per starting layer
        server_faults = 0  # INTERNAL/UNKNOWN answers: retried at most MAX_SERVER_FAULT_RETRIES times
        last_error: tuple[ShardmeshError, WorkerInfo] | None = None
        while layer < total:
            now = time.monotonic()
            if now >= deadline:
                raise DeadlineExceeded(f"request {request_id} ran out of time before layer {layer}")
            try:
                stages = (await self.plan_waiting(
                    lambda: self._topology.plan(excluded=self.excluded(failed, time.monotonic()), start_layer=layer,
                                                checksum=checksum),
                    wait, failed, failed_joins,
                )).stages
            except Unavailable as no_route:
                if last_error is None:
                    raise
                # Report the hop that failed first; the planner's view explains why nothing else could serve.
                raise _name_hop(last_error[0], last_error[1], also=str(no_route)) from None
            excluded = self.excluded(failed, time.monotonic())
            chosen = [self.choose(s.replicas) for s in (stages if relay else stages[:1])]
            if tracing.enabled():  # planning, on the request's span (services/tracing.py)
                tracing.current().event("route planned", {"shardmesh.layer": layer, "shardmesh.route": [w.worker_id for w in chosen]})
            call_id = f"{key}/{layer}/{sum(attempts.values())}"
            candidates = [*chosen, *stages[0].replicas]  # a hedge may have gone to another replica of stage 0
            try:
                if relay or self._settings.hedge_after_s <= 0:
                    response, hop_ms = await self._call(chosen, call_id, stage_input, mask, checksum, deadline)
                else:
                    spare = [r for r in stages[0].replicas if r.worker_id not in excluded and r != chosen[0]]
                    response, hop_ms, chosen[0] = await self._hedged(
                        chosen[0], spare, call_id, stage_input, mask, checksum, deadline, failed
                    )
            except ShardmeshError as exc:
                if not may_fail_over(exc):
                    if isinstance(exc, FailedPrecondition) and exc.failed_address:
                        # The hop contradicts the table (restarted with other layers or weights): describe it again.
                        self._topology.suspect(exc.failed_address, exc.message)
                    raise
                worker = next((w for w in candidates if w.worker_id == exc.failed_worker_id), chosen[0])
                partial = exc.relay_response
                if partial is not None and partial.error.HasField("pending_input") and worker is not chosen[0]:
                    # Relay: stages before the failed hop completed; resume from the failed hop's input.
                    result.hops.extend(partial.hops)
                    stage_input = await hand_on(partial.error.pending_input, "pending_input")
                    layer = worker.span.start
                last_error = (exc, worker)
                failed.add(worker.worker_id)
                failed_joins[worker.worker_id] = self._topology.joins(worker.worker_id)
                self.record_hop_failure(worker, exc, request_deadline=deadline)
                attempts[layer] = attempts.get(layer, 0) + 1
                server_faults += is_server_fault(exc)
                retry_ok = (
                    attempts[layer] < self._settings.max_attempts
                    and server_faults <= MAX_SERVER_FAULT_RETRIES
                    and self.try_retry()
                )
                if not retry_ok:
                    raise _name_hop(exc, worker) from None
                FAILOVERS.labels(reason="Internal" if is_server_fault(exc) else type(exc).__name__).inc()
                result.attempts += 1
                log.warning("request %s: hop %s failed (%s); failing over", request_id, worker.worker_id, exc)
                if tracing.enabled():
                    tracing.current().event("failover", {
                        "shardmesh.failed_worker_id": worker.worker_id, "shardmesh.layer": layer,
                        "shardmesh.error": type(exc).__name__, "shardmesh.message": str(exc)[:200],
                    })
                continue
            for worker in chosen:
                self.outliers.record_success(worker.worker_id, time.monotonic())
            response.hops[len(response.hops) - len(chosen)].hop_ms = hop_ms
            result.hops.extend(response.hops[len(response.hops) - len(chosen):])
            stage_input = await hand_on(response.output, "output")
            layer = chosen[-1].span.end
        if isinstance(stage_input, torch.Tensor):
            result.output = stage_input
        else:
            result.output, result.output_wire = await unpack_trusted(stage_input, "output"), stage_input
        return result

    def _hedge_delay(self, worker: WorkerInfo) -> float:
        """Hedge once a hop is slower than its recent p95, but never sooner than --hedge-after-ms
        (``--hedge-delay fixed``: after exactly --hedge-after-ms)."""
        if self._settings.hedge_fixed:
            return self._settings.hedge_after_s
        p95 = self._stats(worker.worker_id).p95_estimate()
        return max(self._settings.hedge_after_s, p95 or 0.0)

    async def _hedged(
        self,
        primary: WorkerInfo,
        spare: list[WorkerInfo],
        call_id: str,
        stage_input: StageInput,
        mask: tensor_pb2.Tensor | None,
        checksum: str,
        deadline: float,
        failed: set[str],
    ) -> tuple[worker_pb2.ForwardResponse, float, WorkerInfo]:
        """Direct mode: if ``primary`` is slow, send the same stage input to a second replica; first answer wins.

        A call that fails while the other is still running is counted against its worker and added to
        ``failed``; the error of the last one to fail is raised for the caller to count. The loser of a
        race is cancelled, which is never counted as its worker's failure.
        """
        first = asyncio.create_task(self._call([primary], call_id, stage_input, mask, checksum, deadline))
        owners = {first: primary}
        pending = {first}
        winner: asyncio.Task[tuple[worker_pb2.ForwardResponse, float]] | None = None
        try:
            done, pending = await asyncio.wait(pending, timeout=self._hedge_delay(primary))
            if done or not spare:
                response, hop_ms = await first
                winner = first
                return response, hop_ms, primary
            backup = self.choose(spare)
            HEDGES.inc()
            if tracing.enabled():
                tracing.current().event("hedge", {"shardmesh.primary": primary.worker_id, "shardmesh.backup": backup.worker_id})
            second = asyncio.create_task(self._call([backup], call_id + "/hedge", stage_input, mask, checksum, deadline))
            owners[second] = backup
            pending = set(owners)
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: t.exception() is not None):  # a success first
                    error = task.exception()
                    if error is None:
                        winner = task
                        response, hop_ms = task.result()
                        return response, hop_ms, owners[task]
                    if not pending or not may_fail_over(error):
                        raise error
                    self.record_hop_failure(owners[task], error, request_deadline=deadline)
                    failed.add(owners[task].worker_id)
        finally:  # also when this request is cancelled while it waits
            for task in owners:
                if task is winner:
                    continue
                if not task.done():
                    task.cancel()
                    self._background.add(task)  # the loser's cleanup (cancel message, segment release) still runs
                    task.add_done_callback(self._background.discard)
                task.add_done_callback(_release_unread)  # an answer nobody takes: free its segment

    async def _call(
        self,
        chosen: list[WorkerInfo],
        call_id: str,
        stage_input: StageInput,
        mask: tensor_pb2.Tensor | None,
        checksum: str,
        deadline: float,
        session: tuple[str, int] | None = None,
        session_key: bytes = b"",
        replay_step_lengths: Sequence[int] = (),
    ) -> tuple[worker_pb2.ForwardResponse, float]:
        """One call to ``chosen[0]`` (relaying to the rest); ``session`` = (session id, position) for generation,
        ``session_key`` the secret that proves this router owns the session (sent on every step),
        ``replay_step_lengths`` the steps a generation replay sends in this one call (ForwardRequest field)."""
        first = chosen[0]
        remaining = deadline - time.monotonic()
        # A relayed call covers several hops: allow the hop timeout for each of them. A replay runs each of
        # its steps on every hop, as that many separate calls would: the hop timeout for each step.
        hop_timeout_s = self._settings.hop_timeout_s * max(1, len(replay_step_lengths))
        timeout = min(hop_timeout_s * len(chosen), remaining)
        colocated = self._settings.use_shm and shm.is_colocated(first.address)
        request = worker_pb2.ForwardRequest(
            request_id=call_id,
            input=await _pack(stage_input, colocated, call_id),  # a segment only this call may hand over
            reply_shm=colocated,
            reply_dtype=self._settings.wire_dtype,
            hop_timeout_ms=int(hop_timeout_s * 1000),
            layers=tensor_pb2.LayerRange(start=first.span.start, end=first.span.end),
            model_checksum=checksum,
            timeout_ms=max(1, int(downstream_budget(timeout) * 1000)),
            source=tensor_pb2.SOURCE_ROUTER,
            mode=tensor_pb2.MODE_RELAY if len(chosen) > 1 else tensor_pb2.MODE_DIRECT,
            priority=current_priority(),  # the request's resolved level (router/scheduling): workers order by it
        )
        for worker in chosen[1:]:
            request.downstream.add(
                worker_id=worker.worker_id,
                address=worker.address,
                layers=tensor_pb2.LayerRange(start=worker.span.start, end=worker.span.end),
            )
        if len(chosen) > 1 and self._settings.mesh_key is not None:  # relay: workers relay only along signed routes
            request.route_expires_ms = int((time.time() + timeout) * 1000) + ROUTE_CLOCK_SKEW_MS
            hops = [tensor_pb2.RouteHop(worker_id=first.worker_id, address=first.address, layers=request.layers), *request.downstream]
            request.route_mac = sign_route(self._settings.mesh_key, call_id, hops, request.route_expires_ms)
        if mask is not None:
            request.attention_mask.CopyFrom(mask)
        if session is not None:
            request.session_id, request.position = session
            request.session_key = session_key
            request.replay_step_lengths.extend(replay_step_lengths)
        stats = [self._stats(w.worker_id) for w in chosen]
        for st in stats:
            st.start()
        started = time.monotonic()
        with _hop_span(chosen, call_id) as hop:  # tracing: one span per hop; NOOP when off
            if hop.recording:
                request.traceparent = hop.traceparent  # per message: the stream is shared by many requests
            try:
                response = await self._pool.stream_to(first).call(request, timeout)
            except BaseException:
                placement.release(request.input)  # never read by the failed peer (no-op when inline or consumed)
                raise
            finally:
                for st in stats:
                    st.finish()
        elapsed = time.monotonic() - started
        # Per step for a replay: its length is the session's, not the replica's slowness (the balancer's peak EWMA).
        self._stats(first.worker_id).observe(elapsed / max(1, len(replay_step_lengths)), time.monotonic())
        HOP_SECONDS.labels(worker=first.worker_id, mode="relay" if len(chosen) > 1 else "direct").observe(elapsed)
        log.debug("hop %s (%s) answered call %s in %.1f ms", first.worker_id, first.address, call_id, elapsed * 1000)
        return response, elapsed * 1000


def _hop_span(chosen: Sequence[WorkerInfo], call_id: str) -> tracing.NoopSpan | tracing.Span:
    """The router's span for one call (a hop; in relay the chain it starts), child of the request's span;
    NOOP when tracing is off or the request is not sampled."""
    if not tracing.enabled():
        return tracing.NOOP
    first = chosen[0]
    hedge = call_id.endswith("/hedge")
    parts = call_id.removesuffix("/hedge").rsplit("/", 2)
    attributes: dict[str, object] = {
        "shardmesh.worker_id": first.worker_id,
        "shardmesh.worker_address": first.address,
        "shardmesh.layers": f"{first.span.start}:{first.span.end}",
        "shardmesh.call_id": call_id,
        "shardmesh.hedge": hedge,
        "shardmesh.mode": "relay" if len(chosen) > 1 else "direct",
    }
    if len(parts) == 3 and parts[2].isdigit():
        attributes["shardmesh.attempt"] = int(parts[2])
    if len(chosen) > 1:
        attributes["shardmesh.relay_chain"] = [w.worker_id for w in chosen]
    return tracing.span("router.hop", attributes, require_parent=True)


FORGIVE_PROBE_S = 0.3  # health probe of a failed worker while its request waits for coverage
ROUTE_CLOCK_SKEW_MS = 10_000  # a route signature outlives the call by this much, for clocks that disagree
def _release_unread(task: asyncio.Task[tuple[worker_pb2.ForwardResponse, float]]) -> None:
    """A hedged call whose answer lost the race (or came after the request gave up): free what it holds."""
    if not task.cancelled() and task.exception() is None:
        release_response(task.result()[0])


_OFF_LOOP_BYTES = 1 << 20  # (de)serialising more than this runs in a thread, not on the event loop


async def _pack(tensor: StageInput, colocated: bool, request_id: str) -> tensor_pb2.Tensor:
    if isinstance(tensor, tensor_pb2.Tensor):
        if not (colocated and len(tensor.data) >= placement.SHM_MIN_BYTES):
            return tensor  # inline stays inline: sent as it came
        tensor = await unpack_trusted(tensor, "input")  # large, to a co-located worker: by shared memory
    if tensor.numel() * tensor.element_size() >= _OFF_LOOP_BYTES:
        return await asyncio.to_thread(placement.pack, tensor, colocated=colocated, request_id=request_id)
    return placement.pack(tensor, colocated=colocated, request_id=request_id)


# Stage outputs come from workers the router planned with, and client input is size-checked in router/inputs.py,
# so these decodes check consistency (dtype, shape, bytes) but apply no size limit of their own.
_NO_SIZE_LIMIT = 1 << 40


async def hand_on(msg: tensor_pb2.Tensor, field: str) -> StageInput:
    """A stage's output as the next stage's input: an inline message is checked (dtype, shape, byte count)
    and kept as it came; a shared-memory segment is read now (reading frees it)."""
    if msg.shm_handle:
        return await unpack_trusted(msg, field)
    codec.check_inline(msg, field=field, max_bytes=_NO_SIZE_LIMIT)
    return msg


async def unpack_trusted(msg: tensor_pb2.Tensor, field: str) -> torch.Tensor:
    """Decodes a tensor the router already trusts; shared-memory segments are read off the event loop."""
    if msg.shm_handle:
        return await asyncio.to_thread(placement.unpack, msg, field=field, max_bytes=_NO_SIZE_LIMIT)
    return placement.unpack(msg, field=field, max_bytes=_NO_SIZE_LIMIT)


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
