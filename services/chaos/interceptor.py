"""Injected errors, in the manner of Envoy's fault filter: a server interceptor that makes a share of calls
fail with a chosen gRPC status (and optionally delays unary calls). Servers install it only when started
with ``--fault-injection FILE``; without the flag nothing here is loaded.

FILE is a small JSON control file, re-read whenever it changes (a missing or empty file = no faults)::

    {"abort": {"code": "UNAVAILABLE", "percent": 30},
     "delay": {"ms": 200, "percent": 100},
     "methods": ["ForwardStream", "Forward"]}

``methods`` (default: every method except health, reflection and Describe) limits which RPCs are touched.
Unary and server-streaming calls are aborted with the status. On a multiplexed bidi stream (the worker's
ForwardStream, shared by many requests) aborting the call would fail every request on it, so each
*request* on the stream is answered in-band with an error message built by ``stream_error`` instead, as
the worker itself answers a failed request. Counts of injected faults are kept in ``stats``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger(__name__)

SKIPPED_SERVICES = ("grpc.health.v1.", "grpc.reflection.")
SKIPPED_METHODS = frozenset({"Describe", "Topology"})
CODES = {"UNAVAILABLE": grpc.StatusCode.UNAVAILABLE, "INTERNAL": grpc.StatusCode.INTERNAL,
         "UNKNOWN": grpc.StatusCode.UNKNOWN, "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
         "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED}
MESSAGE = "fault injected by --fault-injection"

StreamError = Callable[[Any, grpc.StatusCode, str], Any]  # (request, code, message) -> in-band error response


@dataclass(frozen=True)
class FaultSettings:
    abort_code: grpc.StatusCode | None = None
    abort_percent: float = 0.0
    delay_ms: float = 0.0
    delay_percent: float = 0.0
    methods: frozenset[str] = frozenset()  # empty: all

    def wants(self, method: str) -> bool:
        return not self.methods or method in self.methods

    def abort(self) -> grpc.StatusCode | None:
        return self.abort_code if self.abort_code and random.uniform(0, 100) < self.abort_percent else None

    def delay_s(self) -> float:
        return self.delay_ms / 1000 if self.delay_ms and random.uniform(0, 100) < self.delay_percent else 0.0


def parse_settings(text: str) -> FaultSettings:
    """Raises ValueError with what is wrong; the interceptor then keeps its previous settings."""
    if not text.strip():
        return FaultSettings()
    data = json.loads(text)
    if not isinstance(data, dict) or set(data) - {"abort", "delay", "methods"}:
        raise ValueError("expected an object with keys abort, delay, methods")
    abort = data.get("abort") or {}
    delay = data.get("delay") or {}
    code = abort.get("code")
    if code is not None and code not in CODES:
        raise ValueError(f"abort.code must be one of {', '.join(CODES)}")
    return FaultSettings(
        abort_code=CODES[code] if code else None,
        abort_percent=float(abort.get("percent", 100 if code else 0)),
        delay_ms=float(delay.get("ms", 0)),
        delay_percent=float(delay.get("percent", 100 if delay.get("ms") else 0)),
        methods=frozenset(data.get("methods") or ()),
    )


class ControlFile:
    """The settings in a file, re-read when its modification time or size changes (one stat per call)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.settings = FaultSettings()

    def current(self) -> FaultSettings:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self.settings = None, FaultSettings()
            return self.settings
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                with open(self.path) as f:
                    self.settings = parse_settings(f.read())
                log.warning("fault injection settings from %s: %s", self.path, self.settings)
            except (OSError, ValueError) as exc:
                log.error("ignoring fault injection file %s: %s", self.path, exc)
        return self.settings


class FaultInjectionInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, control_path: str, stream_error: StreamError | None = None) -> None:
        self.control = ControlFile(control_path)
        self.stream_error = stream_error
        self.stats: collections.Counter[str] = collections.Counter()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method  # "/package.Service/Method"
        method = full.rsplit("/", 1)[-1]
        if handler is None or full.lstrip("/").startswith(SKIPPED_SERVICES) or method in SKIPPED_METHODS:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(method, handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None and self.stream_error is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_stream(method, handler.stream_stream), handler.request_deserializer, handler.response_serializer)
        return handler

    async def _before(self, method: str, context: grpc.aio.ServicerContext) -> None:
        settings = self.control.current()
        if not settings.wants(method):
            return
        delay = settings.delay_s()
        if delay:
            self.stats[f"{method}:delay"] += 1
            await asyncio.sleep(delay)
        code = settings.abort()
        if code is not None:
            self.stats[f"{method}:{code.name}"] += 1
            await context.abort(code, MESSAGE)

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._before(method, context)
            return await behavior(request, context)
        return wrapped

    def _unary_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            async def wrapped_gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._before(method, context)
                async for item in behavior(request, context):
                    yield item
            return wrapped_gen

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._before(method, context)
            return await behavior(request, context)
        return wrapped

    def _stream_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(request_iterator, _FaultyStreamContext(context, self, method))
        return wrapped


class _FaultyStreamContext:
    """Wraps a bidi stream's context: a chosen share of *requests* read from it are answered with an
    in-band error instead of reaching the handler. Writes are serialised, since the injected answer is
    written from the reading side while the handler's writer task writes too."""

    MAX_TRACKED = 4096

    def __init__(self, context: grpc.aio.ServicerContext, owner: FaultInjectionInterceptor, method: str) -> None:
        self._context = context
        self._owner = owner
        self._method = method
        self._lock = asyncio.Lock()
        self._decided: collections.OrderedDict[str, bool] = collections.OrderedDict()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        async with self._lock:
            await self._context.write(message)

    async def read(self) -> Any:
        while True:
            message = await self._context.read()
            if message is grpc.aio.EOF:
                return message
            parsed = self._parse(message)
            request_id = getattr(parsed, "request_id", None)
            if not request_id:
                return message
            cancel = bool(getattr(parsed, "cancel", False))
            if not cancel and _chunk_index(parsed) == 0:  # the first message of a request (or attempt)
                faulted = self._decide(request_id)
                if faulted:
                    code = self._owner.control.current().abort_code or grpc.StatusCode.UNAVAILABLE
                    self._owner.stats[f"{self._method}:{code.name}"] += 1
                    with contextlib.suppress(Exception):
                        await self.write(self._owner.stream_error(parsed, code, MESSAGE))  # type: ignore[misc]
            else:
                faulted = self._decided.get(request_id, False)
            if not faulted:
                return message  # later chunks and cancels of a faulted request are swallowed

    def _parse(self, message: Any) -> Any:
        """Methods registered with raw bytes (services/transport/raw.py) read bytes: parse a copy to see the id;
        a message that does not parse is left for the handler to answer."""
        if not isinstance(message, (bytes, bytearray, memoryview)):
            return message
        parse = getattr(self._owner.stream_error, "parse", None)
        if parse is None:
            return None
        try:
            return parse(bytes(message))
        except Exception:  # noqa: BLE001 - corrupt input is the handler's to report
            return None

    def _decide(self, request_id: str) -> bool:
        settings = self._owner.control.current()
        faulted = settings.wants(self._method) and settings.abort() is not None
        self._decided[request_id] = faulted
        while len(self._decided) > self.MAX_TRACKED:
            self._decided.popitem(last=False)
        return faulted


def _chunk_index(message: Any) -> int:
    """0 for a whole message or the first chunk of a chunked one (see services/transport/chunked.py)."""
    tensor = getattr(message, "input", None)
    try:
        return int(tensor.chunk_index) if tensor is not None and message.HasField("input") else 0
    except (AttributeError, ValueError):
        return 0


class WorkerStreamError:
    """In-band error for the worker's ForwardStream, attributed to this worker as its own failures are;
    ``parse`` reads the raw bytes that stream receives."""

    def __init__(self, worker_id: str, address: str) -> None:
        from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2

        self._worker_id, self._address = worker_id, address
        self._tensor_pb2, self._worker_pb2 = tensor_pb2, worker_pb2

    def parse(self, raw: bytes) -> Any:
        return self._worker_pb2.ForwardRequest.FromString(raw)

    def __call__(self, request: Any, code: grpc.StatusCode, message: str) -> Any:
        error = self._tensor_pb2.Error(code=code.value[0], message=message, failed_worker_id=self._worker_id,
                                       failed_address=self._address)
        return self._worker_pb2.ForwardResponse(request_id=request.request_id, error=error)


def worker_stream_error(worker_id: str, address: str) -> StreamError:
    return WorkerStreamError(worker_id, address)
