"""Methods that take raw bytes and parse in the handler, so a corrupt message gets a clear answer.

With generated registration gRPC parses each message before the handler runs and answers a message
that does not parse with UNKNOWN; on a stream the call ends and the answers to valid requests sent
before it are lost. Registered through :func:`add_parsing_servicer`, the same RPC names and the
same protobuf messages are served, but a unary method answers INVALID_ARGUMENT and a stream method
receives bytes, which :func:`parser` turns into messages (``StreamHandlers.parse``), answering a
corrupt message in-band while the stream goes on.
"""

from __future__ import annotations

import inspect

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from services.errors import InvalidArgument

M = TypeVar("M", bound=Message)


def parser(message_type: type[M]) -> Callable[[bytes | M], M]:
    """Bytes -> ``message_type`` (a message already parsed passes through); InvalidArgument if corrupt."""
    name = message_type.DESCRIPTOR.full_name

    def parse(raw: bytes | M) -> M:
        if isinstance(raw, message_type):
            return raw
        message = message_type()
        try:
            message.ParseFromString(raw)  # type: ignore[arg-type]
        except (DecodeError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"message is not a valid {name} ({len(raw)} bytes): {exc}") from None  # type: ignore[arg-type]
        return message

    return parse


def _parsing_unary(behavior: Callable[..., Any], parse: Callable[[Any], Any]) -> Callable[..., Any]:
    async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = parse(raw)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return await behavior(request, context)

    return unary


def _parsing_unary_stream(behavior: Callable[..., Any], parse: Callable[[Any], Any]) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):  # a handler that writes with context.write()
        return _parsing_unary(behavior, parse)

    async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            request = parse(raw)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        async for item in behavior(request, context):
            yield item

    return unary_stream


def _message_type(handler: grpc.RpcMethodHandler, method: str) -> type[Message]:
    """The request type behind a generated handler's deserializer (``SomeRequest.FromString``)."""
    owner = getattr(handler.request_deserializer, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, Message):
        return owner
    raise ValueError(f"{method}: cannot tell its request message type; name it in raw=")


def _raw_handler(handler: grpc.RpcMethodHandler, message_type: type[Message]) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _parsing_unary(handler.unary_unary, parser(message_type)),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _parsing_unary_stream(handler.unary_stream, parser(message_type)),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:  # the servicer parses each message itself (in-band errors)
        return grpc.stream_stream_rpc_method_handler(
            handler.stream_stream, request_deserializer=None, response_serializer=handler.response_serializer
        )
    raise ValueError("client-streaming methods cannot take raw bytes")


class _Capture:
    """Stands in for the server while generated code registers its method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass  # re-registered below, with the raw methods swapped in

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_parsing_servicer(
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    server: grpc.aio.Server,
    raw: Mapping[str, type[Message]] | None = None,
) -> None:
    """Registers ``servicer`` like the generated ``add_to_server`` does, but every method with a single
    request parses it in the handler (a corrupt message is INVALID_ARGUMENT, never UNKNOWN), and the
    stream methods named in ``raw`` (method name -> request message type) receive raw bytes to parse
    message by message. RPC names and wire format are unchanged."""
    capture = _Capture()
    add_to_server(servicer, capture)
    handlers = capture.handlers
    named = dict(raw or {})
    for method, handler in list(handlers.items()):
        if method in named:
            handlers[method] = _raw_handler(handler, named[method])
        elif not handler.request_streaming:
            handlers[method] = _raw_handler(handler, _message_type(handler, method))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)
