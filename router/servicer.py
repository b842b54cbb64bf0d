"""Router gRPC servicer: translates InferRequest/InferResponse around :class:`RouterCore`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from services import tracing
from services.errors import InvalidArgument, grpc_errors, grpc_stream_errors, status_of
from services.security.client_auth import ANONYMOUS, CURRENT_TENANT
from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from services.transport.raw import parser
from services.transport.stream_server import StreamHandlers, serve_multiplexed
from router.core import RouterCore
from router.inputs import check_text_size
from router.scheduling import CallerInfo

DEFAULT_MAX_TEXT_BYTES = 1024 * 1024


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        core: RouterCore,
        max_stream_pending: int,
        *,
        max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
        charge_stream_request: Callable[[], None] | None = None,
    ) -> None:
        self._core = core
        self._max_stream_pending = max_stream_pending
        self._max_text_bytes = max_text_bytes
        # Each request on an InferStream counts against the caller's rate limit, as a unary call does.
        self._charge_stream_request = charge_stream_request

    def _check_text(self, request: router_pb2.InferRequest | router_pb2.GenerateRequest) -> None:
        if request.WhichOneof("input" if isinstance(request, router_pb2.InferRequest) else "prompt") == "text":
            check_text_size(request.text, self._max_text_bytes)

    def _admit_stream_request(self, request: router_pb2.InferRequest) -> None:
        """Limits an InferStream request must pass before any work (raises: answered in-band)."""
        if self._charge_stream_request is not None:
            self._charge_stream_request()
        if not request.request_id:  # answers are matched by id: a server-made one could not be matched
            raise InvalidArgument("request_id: required on InferStream (answers are matched to requests by it)")
        self._check_text(request)

    @staticmethod
    def _caller(context: grpc.aio.ServicerContext) -> CallerInfo:
        """Priority and tenant metadata; the tenant client auth named (CURRENT_TENANT) wins over metadata."""
        tenant = CURRENT_TENANT.get()
        return CallerInfo.from_metadata(context.invocation_metadata(), tenant if tenant != ANONYMOUS else None)

    @grpc_errors
    async def Infer(self, request: router_pb2.InferRequest, context: grpc.aio.ServicerContext) -> router_pb2.InferResponse:
        self._check_text(request)
        traceparent = tracing.traceparent_from_metadata(context.invocation_metadata())  # "" when tracing is off
        return await self._core.infer(request, context.time_remaining(), self._caller(context), traceparent=traceparent)

    async def InferStream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        core = self._core
        caller = self._caller(context)  # the stream's metadata applies to each request on it
        traceparent = tracing.traceparent_from_metadata(context.invocation_metadata())  # "" when tracing is off

        async def handle(request: router_pb2.InferRequest) -> router_pb2.InferResponse:
            self._admit_stream_request(request)
            return await core.infer(
                request, request.timeout_ms / 1000.0 if request.timeout_ms else None, caller, traceparent=traceparent
            )

        def on_error(request: router_pb2.InferRequest, exc: BaseException) -> router_pb2.InferResponse:
            code, message = status_of(exc)
            return router_pb2.InferResponse(
                request_id=request.request_id,
                error=tensor_pb2.Error(
                    code=code.value[0],
                    message=message,
                    failed_worker_id=getattr(exc, "failed_worker_id", ""),
                    failed_address=getattr(exc, "failed_address", ""),
                ),
            )

        # Registered with raw bytes (router/main.py): a corrupt message is answered in-band, the stream goes on.
        handlers = StreamHandlers(handle, on_error, parse=parser(router_pb2.InferRequest), empty=router_pb2.InferRequest)
        await serve_multiplexed(context, handlers, self._max_stream_pending)

    @grpc_errors
    async def Topology(self, request: router_pb2.TopologyRequest, context: grpc.aio.ServicerContext) -> router_pb2.TopologyResponse:
        return self._core.topology_view()

    @grpc_stream_errors
    async def Generate(  # type: ignore[override]
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        self._check_text(request)
        traceparent = tracing.traceparent_from_metadata(context.invocation_metadata())  # "" when tracing is off
        async for event in self._core.generate(request, context.time_remaining(), self._caller(context), traceparent=traceparent):
            yield event
