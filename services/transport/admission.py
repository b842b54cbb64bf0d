"""Admission by kind of call, so long-lived streams cannot starve health checks and short calls.

grpc's ``maximum_concurrent_rpcs`` counts every RPC alike: 120 idle ForwardStreams used up a worker's
cap, and health checks and Describe got RESOURCE_EXHAUSTED, so probes would have killed the pod.
This interceptor keeps separate counts: short calls (unary) up to ``max_calls``, streams (request or
response streaming) up to ``max_streams``; probes and introspection (health, reflection, the methods
named in ``exempt``) are never refused. A refused call is RESOURCE_EXHAUSTED naming the limit, and
it is refused before its handler runs.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

EXEMPT_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")
INTROSPECTION = ("/shardmesh.v1.ShardWorker/Describe", "/shardmesh.v1.Router/Topology")


class _Count:
    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.active = 0


def _counted(behavior: Callable[..., Any], count: _Count) -> Callable[..., Any]:
    """The handler's behavior, holding one unit of ``count`` for as long as the RPC runs."""
    if inspect.isasyncgenfunction(behavior):

        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            count.active += 1
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                count.active -= 1

        return stream_out

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        count.active += 1
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            count.active -= 1

    return call


def _refusing(
    handler: grpc.RpcMethodHandler, count: _Count, method: str, on_refused: Callable[[str], None] | None
) -> grpc.RpcMethodHandler:
    message = (
        f"{method}: {count.active} {count.what} already open on this server (limit {count.limit}); retry later"
        " or on another replica"
    )

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        if on_refused is not None:
            on_refused(method)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    return _rebuild(handler, refuse)


def _rebuild(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(behavior, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(behavior, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(behavior, **kwargs)
    return grpc.stream_stream_rpc_method_handler(behavior, **kwargs)


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Awaitable[Any]]:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream  # type: ignore[return-value]


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """See the module docstring; ``exempt`` are full method names such as ``/shardmesh.v1.ShardWorker/Describe``."""

    def __init__(
        self, max_calls: int, max_streams: int, exempt: Iterable[str] = INTROSPECTION,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        """``on_refused(method)`` runs for every refused call (the request metric: the handler never sees it)."""
        self.calls = _Count(max_calls, "calls")
        self.streams = _Count(max_streams, "streams")
        self._exempt = frozenset(exempt)
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in self._exempt or method.startswith(EXEMPT_SERVICES):
            return handler
        count = self.streams if handler.request_streaming or handler.response_streaming else self.calls
        if count.active >= count.limit:
            return _refusing(handler, count, method, self._on_refused)
        return _rebuild(handler, _counted(_behavior(handler), count))
