"""What the router does with one request, independent of the gRPC transport."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import torch

from services import tracing
from services.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted, ShardmeshError, status_of
from services.gen.shardmesh.v1 import router_pb2, tensor_pb2
from services.models.registry import load_tokenizer, resolve_model
from services.logging_json import REQUEST_ID, request_scope
from services.telemetry import INFLIGHT, LATENCY, REQUESTS
from services.wire import codec
from router.generation import GenerationService
from router.infer_batches import InferBatcher, InferItem
from router.inputs import TokenizerCache, encode_text, request_inputs, resolve_mode
from router.pipeline import Pipeline
from router.result_cache import ResultCache, result_key
from router.scheduling import CallerInfo, Scheduler, SchedulerSettings, hop_priority, resolve_priority, resolve_tenant
from router.scheduling.context import set_default_level
from router.scheduling.metrics import SchedulerMetrics
from router.topology import Topology

GENERATE_TIMEOUT_S = 600.0  # a generation without a client deadline
MODE_NAMES = {"direct": tensor_pb2.MODE_DIRECT, "relay": tensor_pb2.MODE_RELAY}
# --max-concurrency 0: this many requests per replica of the narrowest stage (the workers' default --max-inflight)
WORKER_SLOTS = 64
CAPACITY_TTL_S = 1.0


class RouterCore:
    def __init__(
        self,
        topology: Topology,
        pipeline: Pipeline,
        *,
        default_mode: str,
        request_timeout_s: float,
        max_inflight: int,
        max_tensor_bytes: int,
        tokenizer_model: str | None,
        generation: GenerationService | None = None,
        result_cache: ResultCache | None = None,
        scheduling: SchedulerSettings | None = None,
        coalesce: int = 0,
        coalesce_depth: int = 0,
    ) -> None:
        self.topology = topology
        self.pipeline = pipeline
        self.default_mode = MODE_NAMES[default_mode]
        self.request_timeout_s = request_timeout_s
        self.max_inflight = max_inflight
        self.max_tensor_bytes = max_tensor_bytes
        self.inflight = 0
        self.generation = generation
        self.result_cache = result_cache  # --cache-mb; None = off
        self.batcher = InferBatcher(  # --coalesce (0: every request alone)
            pipeline, max_rows=coalesce, depth=coalesce_depth, stages=lambda: len(topology.stage_groups())
        )
        self._tokenizer_model = tokenizer_model
        self._tokenizers = TokenizerCache(lambda model: load_tokenizer(resolve_model(model)))
        self._claimed: set[tuple[str, str]] = set()  # (kind, client id) of requests in flight
        self._capacity = (0.0, WORKER_SLOTS)  # (computed at, value) of the automatic concurrency limit
        settings = scheduling or SchedulerSettings()
        self.scheduler = Scheduler(settings, self.auto_concurrency, observer=SchedulerMetrics(settings.tenant_weights))
        set_default_level(self.scheduler.settings.default_priority)

    def auto_concurrency(self) -> int:
        """Requests the route's narrowest stage admits: WORKER_SLOTS per replica, at most --max-inflight."""
        now = time.monotonic()
        if now - self._capacity[0] > CAPACITY_TTL_S:
            try:
                replicas = min(len(stage.replicas) for stage in self.topology.plan().stages)
            except Exception:  # noqa: BLE001 - no route yet: requests fail in the pipeline with the reason
                replicas = 1
            self._capacity = (now, min(self.max_inflight, WORKER_SLOTS * max(1, replicas)))
        return self._capacity[1]

    def _who(self, priority: int, caller: CallerInfo | None) -> tuple[int, str]:
        """The request's resolved priority level and tenant (InvalidArgument for bad values)."""
        caller = caller or CallerInfo()
        settings = self.scheduler.settings
        level = resolve_priority(priority, caller.priority_metadata, settings.priority_levels, settings.default_priority)
        return level, resolve_tenant(caller.authenticated_tenant, caller.tenant_metadata)

    @contextlib.contextmanager
    def _claim(self, kind: str, client_id: str) -> Iterator[None]:
        """A client's id may be in flight once per router; a second request with it is ALREADY_EXISTS."""
        key = (kind, client_id)
        if client_id and key in self._claimed:
            raise AlreadyExists(
                f"{kind} request id {client_id!r} is already in flight in this router; "
                "wait for it to finish, or send each concurrent request with its own id"
            )
        if client_id:
            self._claimed.add(key)
        try:
            yield
        finally:
            if client_id:
                self._claimed.discard(key)

    def _tokenizer_model_id(self) -> str | None:
        """The router's --model, else the model the workers serve (None while no worker is known)."""
        if self._tokenizer_model is not None:
            return self._tokenizer_model
        workers = self.topology.workers
        return workers[0].model_id if workers else None

    def _loaded_tokenizer(self) -> Any | None:
        """The tokenizer if already loaded, else None (never loads, never raises)."""
        model = self._tokenizer_model_id()
        return None if model is None else self._tokenizers.loaded(model)

    def _tokenizer(self) -> Any:
        model = self._tokenizer_model_id()
        if model is None:
            raise FailedPrecondition("no worker is known yet, so the model's tokenizer is unknown; retry shortly")
        return self._tokenizers.get(model)

    async def infer(
        self, request: router_pb2.InferRequest, time_remaining: float | None, caller: CallerInfo | None = None,
        *, traceparent: str = "",
    ) -> router_pb2.InferResponse:
        """One Infer; ``traceparent``: the client's W3C trace context (gRPC metadata), continued when tracing is on."""
        if not tracing.enabled():
            return await self._admit_infer(request, time_remaining, caller)
        attributes = {"shardmesh.request_id": request.request_id, "shardmesh.mode": int(request.mode)}
        with tracing.span("router.request", attributes, traceparent=traceparent or None):
            return await self._admit_infer(request, time_remaining, caller)

    async def _admit_infer(
        self, request: router_pb2.InferRequest, time_remaining: float | None, caller: CallerInfo | None = None
    ) -> router_pb2.InferResponse:
        if self.inflight >= self.max_inflight:  # counted here: a dashboard sees refusals (not in the latency)
            REQUESTS.labels(component="router", rpc="Infer", code="RESOURCE_EXHAUSTED").inc()
            raise ResourceExhausted(
                f"router has {self.inflight} requests in flight (limit --max-inflight {self.max_inflight}); retry later"
            )
        self.inflight += 1
        INFLIGHT.labels(component="router").inc()
        started, code = time.monotonic(), "OK"
        try:
            with request_scope(request.request_id), self._claim("infer", request.request_id):  # tags its log lines
                return await self._infer(request, time_remaining, caller)
        except BaseException as exc:
            code = _code_name(exc)
            raise
        finally:
            self.inflight -= 1
            INFLIGHT.labels(component="router").dec()
            REQUESTS.labels(component="router", rpc="Infer", code=code).inc()
            LATENCY.labels(component="router", rpc="Infer").observe(time.monotonic() - started)

    async def _infer(
        self, request: router_pb2.InferRequest, time_remaining: float | None, caller: CallerInfo | None = None
    ) -> router_pb2.InferResponse:
        priority, tenant = self._who(request.priority, caller)
        started = time.monotonic()
        deadline = started + (time_remaining if time_remaining is not None else self.request_timeout_s)
        mode = resolve_mode(request.mode, self.default_mode)
        ids, mask = await request_inputs(request, self._tokenizer, self.max_tensor_bytes, self._loaded_tokenizer)
        request_id = request.request_id or uuid.uuid4().hex
        probe = self._cache_probe(ids, mask)
        if probe is not None and probe[2] is not None:
            if tracing.enabled():
                tracing.current().event("result cache hit")
            return _cached_response(request_id, mode, probe[2], started)
        if tracing.enabled():
            tracing.current().event("admitted", {"shardmesh.priority": priority, "shardmesh.tenant": tenant,
                                                 "shardmesh.cache": "miss" if probe is not None else "off"})
        async with self.scheduler.slot(self.scheduler.ticket("infer", priority, tenant), deadline):
            if tracing.enabled():
                tracing.current().event("dequeued", {"shardmesh.ms_since_start": 1000 * (time.monotonic() - started)})
            relay = mode == tensor_pb2.MODE_RELAY
            result = await self.batcher.run(InferItem(request_id, ids, mask, deadline, relay, priority))
        response = router_pb2.InferResponse(
            request_id=request_id,
            output=result.output_wire if result.output_wire is not None else codec.encode(result.output),
            mode=mode,  # type: ignore[arg-type]
            total_ms=1000 * (time.monotonic() - started),
            attempts=result.attempts,
        )
        response.hops.extend(result.hops)
        response.route.extend(h.worker_id for h in result.hops)
        if probe is not None and self.result_cache is not None and result.checksum:
            key = result_key(result.checksum, probe[0], probe[1])
            self.result_cache.put(result.checksum, key, response.output.SerializeToString())
        return response

    def _cache_probe(
        self, ids: tensor_pb2.Tensor, mask: tensor_pb2.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, bytes | None] | None:
        """With --cache-mb: the decoded ids and mask, and the cached output bytes for them on the checksum
        the pipeline would route to now (None: a miss). None when the cache is off or no route exists."""
        if self.result_cache is None:
            return None
        try:
            checksum = self.topology.plan(excluded=self.pipeline.excluded((), time.monotonic())).checksum
        except ShardmeshError:
            return None  # the pipeline reports why there is no route
        ids_t = codec.decode(ids, field="input", max_bytes=_TRUSTED_BYTES)
        mask_t = codec.decode(mask, field="attention_mask", max_bytes=_TRUSTED_BYTES) if mask is not None else None
        return ids_t, mask_t, self.result_cache.get(checksum, result_key(checksum, ids_t, mask_t))

    def generate(
        self, request: router_pb2.GenerateRequest, time_remaining: float | None, caller: CallerInfo | None = None,
        *, traceparent: str = "",
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        """Streams generated tokens, then a summary (see router/generation.py); ``traceparent`` as for :meth:`infer`.
        With tracing off this is :meth:`_generate` itself (no wrapper, nothing allocated for tracing)."""
        events = self._generate(request, time_remaining, caller)
        return events if not tracing.enabled() else self._traced_generate(events, request, traceparent)

    async def _generate(
        self, request: router_pb2.GenerateRequest, time_remaining: float | None, caller: CallerInfo | None = None
    ) -> AsyncGenerator[router_pb2.GenerateEvent, None]:
        """:meth:`_generate_events`, counted once in shardmesh_requests_total{rpc="Generate"} with how it ended,
        refusals (bad prompt, --max-inflight, queue full) included."""
        code = "OK"
        try:
            async with contextlib.aclosing(self._generate_events(request, time_remaining, caller)) as events:
                async for event in events:
                    yield event
        except BaseException as exc:
            code = _code_name(exc)
            raise
        finally:
            REQUESTS.labels(component="router", rpc="Generate", code=code).inc()

    async def _traced_generate(
        self, events: AsyncGenerator[router_pb2.GenerateEvent, None], request: router_pb2.GenerateRequest, traceparent: str
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        """The Generate's ``router.generate`` span around its events: current while each step runs, so steps and
        hops (router/generation.py, router/pipeline.py) are its children; ends with the last event or the error."""
        attributes = {"shardmesh.request_id": request.session_id or request.request_id, "shardmesh.mode": int(request.mode)}
        with tracing.span("router.generate", attributes, traceparent=traceparent or None):
            async with contextlib.aclosing(events):  # closed with this one (a cancelled or abandoned stream)
                async for event in events:
                    yield event

    async def _generate_events(
        self, request: router_pb2.GenerateRequest, time_remaining: float | None, caller: CallerInfo | None = None
    ) -> AsyncGenerator[router_pb2.GenerateEvent, None]:
        """The Generate itself: checks, admission, the scheduler's slot, then router/generation.py's events."""
        if self.generation is None:
            raise FailedPrecondition("this router has no generation service")
        priority, tenant = self._who(request.priority, caller)
        kind = request.WhichOneof("prompt")
        tokenizer = None
        if kind == "text":
            if not request.text.strip():
                raise InvalidArgument("text: empty prompt; send at least one non-blank character")
            tokenizer = self._tokenizer()
            prompt_ids, _ = await encode_text(request.text, lambda: tokenizer)
        elif kind == "tokens":
            prompt_ids = list(request.tokens.ids)
            try:
                tokenizer = self._tokenizer()
            except Exception:  # noqa: BLE001 - token-id prompts work without a tokenizer (no text in events)
                tokenizer = None
        else:
            raise InvalidArgument("prompt: missing; set text or tokens")
        if self.inflight >= self.max_inflight:
            raise ResourceExhausted(
                f"router has {self.inflight} requests in flight (limit --max-inflight {self.max_inflight}); retry later"
            )
        deadline = time.monotonic() + (time_remaining if time_remaining is not None else GENERATE_TIMEOUT_S)
        mode = resolve_mode(request.mode, self.default_mode)
        request_id = request.session_id or request.request_id or uuid.uuid4().hex
        REQUEST_ID.set(request_id)  # log lines of this Generate call (its own task; an async generator cannot reset)
        self.inflight += 1
        try:
            with self._claim("generate", request.session_id or request.request_id):
                if self.scheduler.preempts_sessions:  # each step is scheduled (mlfq demotes long sessions)
                    session_slot: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
                else:  # run to completion: the session holds one slot until its last token
                    ticket = self.scheduler.ticket("generate", priority, tenant)
                    session_slot = self.scheduler.slot(ticket, deadline, record=False)
                async with session_slot:
                    async for event in self.generation.generate(
                        request, prompt_ids, tokenizer, deadline, request_id, relay=mode == tensor_pb2.MODE_RELAY,
                        gate=self._step_gate(priority, tenant, deadline),
                    ):
                        yield event
        finally:
            self.inflight -= 1

    def _step_gate(
        self, priority: int, tenant: str, deadline: float
    ) -> Callable[[int], contextlib.AbstractAsyncContextManager[None]]:
        """What each generation step runs under: its own slot when steps are scheduled, and its priority."""

        @contextlib.asynccontextmanager
        async def gate(tokens: int) -> AsyncIterator[None]:
            if self.scheduler.preempts_sessions:
                ticket = self.scheduler.ticket("step" if tokens else "generate", priority, tenant, tokens=tokens)
                async with self.scheduler.slot(ticket, deadline):
                    with hop_priority(priority):
                        yield
            else:
                with hop_priority(priority):
                    yield

        return gate

    def topology_view(self) -> router_pb2.TopologyResponse:
        reply = router_pb2.TopologyResponse(discovery=self.topology.discovery.name)
        now = time.monotonic()
        for w in self.topology.workers:
            reply.workers.add(
                worker_id=w.worker_id,
                address=w.address,
                layers=tensor_pb2.LayerRange(start=w.span.start, end=w.span.end),
                model_id=w.model_id,
                weights_checksum=w.checksum,
                healthy=not self.pipeline.outliers.is_ejected(w.worker_id, now),
                outstanding=self.pipeline.stats[w.worker_id].outstanding if w.worker_id in self.pipeline.stats else 0,
            )
        try:
            plan = self.topology.plan()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            reply.complete = False
            reply.problem = str(exc)
            return reply
        reply.complete = True
        for stage in plan.stages:
            for w in stage.replicas:
                reply.route.add(worker_id=w.worker_id, address=w.address, layers=tensor_pb2.LayerRange(start=w.span.start, end=w.span.end))
        return reply


_TRUSTED_BYTES = 1 << 40  # inputs reaching the cache probe were already size-checked by router/inputs.py


def _code_name(exc: BaseException) -> str:
    """The status name a request that raised ``exc`` is counted with (a caller that went away: CANCELLED)."""
    return "CANCELLED" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else status_of(exc)[0].name


def _cached_response(request_id: str, mode: int, output: bytes, started: float) -> router_pb2.InferResponse:
    """A result-cache hit: the stored output bytes, no route, no hops and attempts 0 (no worker was asked)."""
    response = router_pb2.InferResponse(request_id=request_id, mode=mode)  # type: ignore[arg-type]
    response.output.ParseFromString(output)
    response.total_ms = 1000 * (time.monotonic() - started)
    return response
