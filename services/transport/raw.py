"""Methods that take raw bytes and parse in the handler, so a corrupt message gets a clear answer.

With generated registration gRPC parses each message before the handler runs and answers a message
that does not parse with UNKNOWN; on a stream the call ends and the answers to valid requests sent
before it are lost. Registered through :func:`add_parsing_servicer`, the same RPC names and the
same protobuf messages are served, but a unary method answers INVALID_ARGUMENT and a stream method
receives bytes, which :func:`parser` turns into messages (``StreamHandlers.parse``), answering a
corrupt message in-band while the stream goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def _raw_handler(handler: grpc.RpcMethodHandler, message_type: type[Message]) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _parsing_unary(handler.unary_unary, parser(message_type)),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:  # the servicer parses each message itself (in-band errors)
        return grpc.stream_stream_rpc_method_handler(
            handler.stream_stream, request_deserializer=None, response_serializer=handler.response_serializer
        )
    raise ValueError("only unary-unary and stream-stream methods can take raw bytes")


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
    raw: Mapping[str, type[Message]],
) -> None:
    """Registers ``servicer`` like the generated ``add_to_server`` does, with the methods named in ``raw``
    (method name -> request message type) taking raw bytes. RPC names and wire format are unchanged."""
    capture = _Capture()
    add_to_server(servicer, capture)
    handlers = capture.handlers
    for method, message_type in raw.items():
        handlers[method] = _raw_handler(handlers[method], message_type)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)
