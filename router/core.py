"""What the router does with one request, independent of the gRPC transport."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from services.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted
from services.gen.shardmesh.v1 import router_pb2, tensor_pb2
from services.models.registry import load_tokenizer, resolve_model
from services.telemetry import INFLIGHT
from services.wire import codec
from router.generation import GenerationService
from router.inputs import TokenizerCache, encode_text, request_inputs
from router.pipeline import Pipeline
from router.topology import Topology

GENERATE_TIMEOUT_S = 600.0  # a generation without a client deadline
MODE_NAMES = {"direct": tensor_pb2.MODE_DIRECT, "relay": tensor_pb2.MODE_RELAY}


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
    ) -> None:
        self.topology = topology
        self.pipeline = pipeline
        self.default_mode = MODE_NAMES[default_mode]
        self.request_timeout_s = request_timeout_s
        self.max_inflight = max_inflight
        self.max_tensor_bytes = max_tensor_bytes
        self.inflight = 0
        self.generation = generation
        self._tokenizer_model = tokenizer_model
        self._tokenizers = TokenizerCache(lambda model: load_tokenizer(resolve_model(model)))
        self._claimed: set[tuple[str, str]] = set()  # (kind, client id) of requests in flight

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

    def _tokenizer(self) -> Any:
        model = self._tokenizer_model
        if model is None:
            workers = self.topology.workers
            if not workers:
                raise FailedPrecondition("no worker is known yet, so the model's tokenizer is unknown; retry shortly")
            model = workers[0].model_id
        return self._tokenizers.get(model)

    async def infer(self, request: router_pb2.InferRequest, time_remaining: float | None) -> router_pb2.InferResponse:
        if self.inflight >= self.max_inflight:
            raise ResourceExhausted(
                f"router has {self.inflight} requests in flight (limit --max-inflight {self.max_inflight}); retry later"
            )
        self.inflight += 1
        INFLIGHT.labels(component="router").inc()
        try:
            with self._claim("infer", request.request_id):
                return await self._infer(request, time_remaining)
        finally:
            self.inflight -= 1
            INFLIGHT.labels(component="router").dec()

    async def _infer(self, request: router_pb2.InferRequest, time_remaining: float | None) -> router_pb2.InferResponse:
        started = time.monotonic()
        deadline = started + (time_remaining if time_remaining is not None else self.request_timeout_s)
        mode = request.mode or self.default_mode
        ids, mask = await request_inputs(request, self._tokenizer, self.max_tensor_bytes)
        request_id = request.request_id or uuid.uuid4().hex
        result = await self.pipeline.run(request_id, ids, mask, deadline, relay=mode == tensor_pb2.MODE_RELAY)
        response = router_pb2.InferResponse(
            request_id=request_id,
            output=codec.encode(result.output),
            mode=mode,  # type: ignore[arg-type]
            total_ms=1000 * (time.monotonic() - started),
            attempts=result.attempts,
        )
        response.hops.extend(result.hops)
        response.route.extend(h.worker_id for h in result.hops)
        return response

    async def generate(
        self, request: router_pb2.GenerateRequest, time_remaining: float | None
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        """Streams generated tokens, then a summary (see router/generation.py)."""
        if self.generation is None:
            raise FailedPrecondition("this router has no generation service")
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
        mode = request.mode or self.default_mode
        request_id = request.session_id or request.request_id or uuid.uuid4().hex
        self.inflight += 1
        try:
            with self._claim("generate", request.session_id or request.request_id):
                async for event in self.generation.generate(
                    request, prompt_ids, tokenizer, deadline, request_id, relay=mode == tensor_pb2.MODE_RELAY
                ):
                    yield event
        finally:
            self.inflight -= 1

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
