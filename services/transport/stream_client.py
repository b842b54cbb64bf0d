"""Many Forward requests multiplexed over one persistent ForwardStream per peer.

A bidi stream saves the per-call setup of unary RPCs (about 0.2 ms vs 0.34 ms for 1 KB, and 0.37 ms vs
1.03 ms for 166 KB on loopback). Responses are matched to requests by ``request_id``. If the stream
breaks, every pending request fails with UNAVAILABLE naming this peer, and the next call opens a new
stream; a request is never silently retried here (failover is the caller's decision).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from services.errors import DeadlineExceeded, ShardmeshError, Unavailable, error_from_status, code_from_int
from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.transport.chunked import MessageAssembler, split_message

log = logging.getLogger(__name__)


def downstream_budget(remaining_s: float) -> float:
    """Time to grant the next hop: a little less than we have, so that when a hop deep in a chain runs
    out of time, the hop that timed out reports it before every caller above gives up at once."""
    return remaining_s - min(0.05, 0.1 * remaining_s)


class ForwardStreamClient:
    """One peer's multiplexed ForwardStream. Owned by one event loop."""

    def __init__(self, channel: grpc.aio.Channel, address: str, worker_id: str = "") -> None:
        self.address = address
        self.worker_id = worker_id
        self._stub = worker_pb2_grpc.ShardWorkerStub(channel)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[worker_pb2.ForwardResponse]] = {}
        self._write_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._closed = False

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def _fail(self, message: str) -> Unavailable:
        return Unavailable(
            f"hop {self.worker_id or self.address} ({self.address}) failed: {message}",
            failed_worker_id=self.worker_id,
            failed_address=self.address,
        )

    async def _ensure_stream(self) -> grpc.aio.StreamStreamCall:
        async with self._open_lock:
            if self._closed:
                raise self._fail("client closed")
            if self._call is None or self._call.done():
                self._call = self._stub.ForwardStream()
                self._reader = asyncio.create_task(self._read_loop(self._call), name=f"read:{self.address}")
            return self._call

    async def _read_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        reason = "stream ended"
        assembler: MessageAssembler[worker_pb2.ForwardResponse] = MessageAssembler()
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                try:
                    whole = assembler.add(response)
                except ShardmeshError as exc:
                    failed = self._pending.pop(response.request_id, None)
                    if failed is not None and not failed.done():
                        failed.set_exception(exc)
                    continue
                if whole is None:
                    continue  # more chunks to come
                response = whole
                future = self._pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "stream cancelled"
        finally:
            if self._call is call:
                self._call = None
            # Only requests sent on this stream are lost with it.
            for request_id, future in list(self._pending.items()):
                if getattr(future, "_shardmesh_call", None) is call:
                    self._pending.pop(request_id, None)
                    if not future.done():
                        future.set_exception(self._fail(reason))

    async def call(self, request: worker_pb2.ForwardRequest, timeout_s: float) -> worker_pb2.ForwardResponse:
        """Sends ``request`` and waits for its response; errors name this peer as the failed hop."""
        if request.request_id in self._pending:
            raise ShardmeshError(f"duplicate request id {request.request_id!r} in flight to {self.address}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[worker_pb2.ForwardResponse] = loop.create_future()
        try:
            call = await self._ensure_stream()
            future._shardmesh_call = call  # type: ignore[attr-defined]
            self._pending[request.request_id] = future
            async with self._write_lock:  # the chunks of one request go out back to back
                for part in split_message(request):
                    await asyncio.wait_for(call.write(part), timeout_s)
            response = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            await self._cancel_remote(request.request_id)
            raise DeadlineExceeded(
                f"hop {self.worker_id or self.address} ({self.address}) did not answer within {timeout_s * 1000:.0f} ms",
                failed_worker_id=self.worker_id,
                failed_address=self.address,
            ) from None
        except asyncio.CancelledError:
            await self._cancel_remote(request.request_id)
            raise
        except grpc.aio.AioRpcError as exc:
            raise self._fail(f"{exc.code().name}: {exc.details()}") from None
        except (grpc.aio.UsageError, RuntimeError) as exc:  # write on a stream that just closed
            raise self._fail(str(exc)) from None
        finally:
            self._pending.pop(request.request_id, None)
        if response.HasField("error"):
            err = response.error
            exc = error_from_status(
                code_from_int(err.code),
                err.message,
                failed_worker_id=err.failed_worker_id or self.worker_id,
                failed_address=err.failed_address or self.address,
            )
            exc.relay_response = response
            raise exc
        return response

    async def _cancel_remote(self, request_id: str) -> None:
        """Tells the peer to drop a request we stopped waiting for (frees its state there)."""
        call = self._call
        if call is None or call.done():
            return
        with contextlib.suppress(Exception):
            async with self._write_lock:
                await asyncio.wait_for(call.write(worker_pb2.ForwardRequest(request_id=request_id, cancel=True)), 1.0)

    async def close(self) -> None:
        self._closed = True
        call, reader = self._call, self._reader
        if call is not None:
            with contextlib.suppress(Exception):
                await call.done_writing()
            call.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
