"""ShardWorker gRPC servicer: translates between protobuf/gRPC and :class:`WorkerCore`, nothing more."""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.errors import Unavailable, grpc_errors, status_of
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from services.logging_json import request_scope
from services.transport.chunked import MessageAssembler, split_message
from services.transport.stream_server import StreamHandlers, serve_multiplexed
from services.transport.raw import add_parsing_servicer, parser
from services.transport.release import release_request, release_response
from shard_worker.core import WorkerCore

log = logging.getLogger(__name__)


def error_response(core: WorkerCore, request: worker_pb2.ForwardRequest, exc: BaseException) -> worker_pb2.ForwardResponse:
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request %s failed", request.request_id, exc_info=exc)
    failed_worker = getattr(exc, "failed_worker_id", "") or core.worker_id
    return worker_pb2.ForwardResponse(
        request_id=request.request_id,
        error=tensor_pb2.Error(
            code=code.value[0],
            message=message,
            failed_worker_id=failed_worker,
            failed_address=getattr(exc, "failed_address", "") or (core.address if failed_worker == core.worker_id else ""),
        ),
    )


class ShardWorkerServicer(worker_pb2_grpc.ShardWorkerServicer):
    """Registered before the server starts (gRPC needs that); serves once :meth:`attach` gives it a core."""

    def __init__(self, max_stream_pending: int) -> None:
        self._loaded: WorkerCore | None = None
        self._max_stream_pending = max_stream_pending

    def attach(self, core: WorkerCore) -> None:
        self._loaded = core

    @property
    def _core(self) -> WorkerCore:
        if self._loaded is None:
            raise Unavailable("worker is still loading its weights; wait until its health is SERVING")
        return self._loaded

    async def Forward(self, request: worker_pb2.ForwardRequest, context: grpc.aio.ServicerContext) -> worker_pb2.ForwardResponse:
        """Unary form. A relay failure further down comes back as ``response.error`` with the undelivered
        activation (as on streams), so a caller can resume from the failed hop. Every line logged while it runs
        (its relay, session replays, the error it ends with) carries its request id and trace id, as on streams."""
        with request_scope(request.request_id, request.traceparent):
            return await self._forward_unary(request, context)

    @grpc_errors
    async def _forward_unary(self, request: worker_pb2.ForwardRequest, context: grpc.aio.ServicerContext) -> worker_pb2.ForwardResponse:
        return await self._core.forward(request, self._core.deadline_for(request, context.time_remaining()))

    async def ForwardStream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        try:
            core = self._core
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

        async def handle(request: worker_pb2.ForwardRequest) -> worker_pb2.ForwardResponse:
            return await core.forward(request, core.deadline_for(request, None))

        # Chunk 0 is checked against --max-tensor-mb before anything is buffered (chunk bombs).
        assembler: MessageAssembler[worker_pb2.ForwardRequest] = MessageAssembler(core.max_tensor_bytes)
        handlers: StreamHandlers[worker_pb2.ForwardRequest, worker_pb2.ForwardResponse] = StreamHandlers(
            handle=handle,
            on_error=lambda request, exc: error_response(core, request, exc),
            is_cancel=lambda request: request.cancel,
            absorb=assembler.add,
            expand=split_message,
            parse=parser(worker_pb2.ForwardRequest),  # registered with raw bytes: corrupt messages answered in-band
            empty=worker_pb2.ForwardRequest,
            forget=assembler.discard,
            release_request=release_request,
            release_response=release_response,
        )
        try:
            await serve_multiplexed(context, handlers, self._max_stream_pending)
        except asyncio.CancelledError:
            log.debug("ForwardStream from %s ended by the peer", context.peer())
            raise

    @grpc_errors
    async def Describe(self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext) -> worker_pb2.DescribeResponse:
        return self._core.describe()

    async def CloseSession(self, request: worker_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext) -> worker_pb2.CloseSessionResponse:
        """Its log lines carry the session id: the request id the router gives the session's Generate."""
        with request_scope(request.session_id):
            return await self._close_session(request, context)

    @grpc_errors
    async def _close_session(self, request: worker_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext) -> worker_pb2.CloseSessionResponse:
        sessions = self._core.sessions
        existed = sessions.close(request.session_id, request.session_key) if sessions else False
        return worker_pb2.CloseSessionResponse(existed=existed)


def add_to_server(servicer: ShardWorkerServicer, server: grpc.aio.Server) -> None:
    """Registers the ShardWorker service; Forward and ForwardStream parse their messages in the handler,
    so a corrupt message is INVALID_ARGUMENT (in-band on the stream) instead of gRPC's UNKNOWN."""
    add_parsing_servicer(
        worker_pb2_grpc.add_ShardWorkerServicer_to_server,
        servicer,
        server,
        {"Forward": worker_pb2.ForwardRequest, "ForwardStream": worker_pb2.ForwardRequest},
    )
