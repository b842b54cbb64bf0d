"""Wraps a gRPC method handler so a check runs before the method does any work.

Used by the server interceptors: an interceptor sees only the method name and metadata, while the
caller's identity (peer address, TLS certificate) lives on the servicer context. The wrapped handler
runs the check first; for unary requests the body stays raw bytes until the check passed, so a
refused caller costs no parsing, and a body that is no valid protobuf is INVALID_ARGUMENT.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.errors import InvalidArgument, ShardmeshError, status_of

log = logging.getLogger(__name__)

Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


async def _checked(check: Check, context: grpc.aio.ServicerContext) -> None:
    try:
        await check(context)
    except ShardmeshError as exc:
        code, message = status_of(exc)
        await context.abort(code, message)


def _parse(deserializer: Callable[[bytes], Any] | None, raw: Any, method: str) -> Any:
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Exception:  # noqa: BLE001 - any parse failure is the caller's malformed message
        raise InvalidArgument(f"{method}: the request is not a valid protobuf message for this method") from None


def guard_handler(handler: grpc.RpcMethodHandler, check: Check, method: str) -> grpc.RpcMethodHandler:
    """The same RPC kind as ``handler``, with ``check(context)`` run before its behaviour."""
    if handler.request_streaming:
        inner = handler.stream_stream if handler.response_streaming else handler.stream_unary
        if handler.response_streaming and inspect.isasyncgenfunction(inner):

            async def stream_gen(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await _checked(check, context)
                async for item in inner(request_iterator, context):
                    yield item

            behaviour: Any = stream_gen
        else:

            async def stream_call(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                await _checked(check, context)
                return await inner(request_iterator, context)

            behaviour = stream_call
        make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
        return make(behaviour, handler.request_deserializer, handler.response_serializer)

    inner = handler.unary_stream if handler.response_streaming else handler.unary_unary
    deserializer = handler.request_deserializer

    async def parsed(raw: Any, context: grpc.aio.ServicerContext) -> Any:
        await _checked(check, context)
        try:
            return _parse(deserializer, raw, method)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    if handler.response_streaming and inspect.isasyncgenfunction(inner):

        async def unary_gen(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = await parsed(raw, context)
            async for item in inner(request, context):
                yield item

        behaviour = unary_gen
    else:

        async def unary_call(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(await parsed(raw, context), context)

        behaviour = unary_call
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(behaviour, None, handler.response_serializer)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that runs :meth:`check` before every method :meth:`guards` selects."""

    def guards(self, service: str, method: str) -> bool:
        raise NotImplementedError

    async def check(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """Raises a ShardmeshError (its status is the caller's answer) to refuse the call."""
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = short_method(handler_call_details.method)
        if not self.guards(service, method):
            return handler

        async def check(context: grpc.aio.ServicerContext) -> None:
            await self.check(context, method)

        return guard_handler(handler, check, handler_call_details.method)


def short_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, name = full_method.strip("/").partition("/")
    return service, name
