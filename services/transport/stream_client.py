"""Many Forward requests multiplexed over one persistent ForwardStream per peer.

A bidi stream saves the per-call setup of unary RPCs (about 0.2 ms vs 0.34 ms for 1 KB, and 0.37 ms vs
1.03 ms for 166 KB on loopback). Responses are matched to requests by ``request_id``.

Fault model: callers never write on the stream themselves (a cancelled grpc.aio write would cancel the
RPC that every request to this peer shares); one :class:`StreamWriter` per stream does, fed by a
bounded queue. One deadline covers the wait for queue room, the writing and the reply; a request
that times out or is cancelled drops its unsent chunks and the peer gets a cancel message. If the
stream itself breaks, every request on it fails with UNAVAILABLE naming this peer (so the caller fails
over) and the next call opens a new stream; a request is never silently retried here. A response that
arrives for a request nobody waits for any more has its shared-memory segment released.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.errors import DeadlineExceeded, ShardmeshError, Unavailable, code_from_int, error_from_status
from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.telemetry import STREAMS_OPEN, STREAMS_OPENED
from services.transport.chunked import MessageAssembler, split_message
from services.transport.release import release_response
from services.transport.stream_writer import Outgoing, StreamWriter

log = logging.getLogger(__name__)


def downstream_budget(remaining_s: float) -> float:
    """Time to grant the next hop: a little less than we have, so that when a hop deep in a chain runs
    out of time, the hop that timed out reports it before every caller above gives up at once."""
    return remaining_s - min(0.05, 0.1 * remaining_s)


class _Stream:
    """One ForwardStream call: its writer, its reader and the requests waiting on it."""

    def __init__(self, call: grpc.aio.StreamStreamCall, name: str, on_failure: object) -> None:
        self.call = call
        self.pending: dict[str, asyncio.Future[worker_pb2.ForwardResponse]] = {}
        self.writer = StreamWriter(
            call,
            lambda request_id: worker_pb2.ForwardRequest(request_id=request_id, cancel=True),
            on_failure,  # type: ignore[arg-type]
            name,
        )
        self.reader: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.writer.failure is None and not self.call.done()


class ForwardStreamClient:
    """One peer's multiplexed ForwardStream. Owned by one event loop."""

    def __init__(self, channel: grpc.aio.Channel, address: str, worker_id: str = "") -> None:
        self.address = address
        self.worker_id = worker_id
        self._stub = worker_pb2_grpc.ShardWorkerStub(channel)
        self._stream: _Stream | None = None
        self._inflight: set[str] = set()
        self._closed = False

    @property
    def pending_count(self) -> int:
        return len(self._inflight)

    def _fail(self, message: str) -> Unavailable:
        return Unavailable(
            f"hop {self.worker_id or self.address} ({self.address}) failed: {message}",
            failed_worker_id=self.worker_id,
            failed_address=self.address,
        )

    def _open(self) -> _Stream:
        """The live stream, or a new one (synchronous: no caller can interleave between check and open)."""
        if self._closed:
            raise self._fail("client closed")
        stream = self._stream
        if stream is None or not stream.alive:
            call = self._stub.ForwardStream()
            holder: list[_Stream] = []
            stream = _Stream(call, self.address, lambda reason: self._lose(holder[0], reason))
            holder.append(stream)
            stream.reader = asyncio.create_task(self._read_loop(stream), name=f"read:{self.address}")
            STREAMS_OPENED.labels(direction="outbound").inc()
            STREAMS_OPEN.labels(direction="outbound").inc()  # until its reader ends (even if never started)
            stream.reader.add_done_callback(lambda _task: STREAMS_OPEN.labels(direction="outbound").dec())
            self._stream = stream
        return stream

    def _lose(self, stream: _Stream, reason: str) -> None:
        """The stream is gone: only requests sent on it fail, as UNAVAILABLE naming this peer."""
        if self._stream is stream:
            self._stream = None
        pending, stream.pending = stream.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self._fail(reason))

    async def _read_loop(self, stream: _Stream) -> None:
        reason = "stream ended"
        assembler: MessageAssembler[worker_pb2.ForwardResponse] = MessageAssembler()
        try:
            while True:
                response = await stream.call.read()
                if response is grpc.aio.EOF:
                    break
                if response.request_id not in stream.pending:
                    # Timed out, cancelled or a hedge loser: nobody reads it; free its segment.
                    assembler.discard(response.request_id)
                    release_response(response)
                    continue
                try:
                    whole = assembler.add(response)
                except ShardmeshError as exc:
                    failed = stream.pending.pop(response.request_id, None)
                    if failed is not None and not failed.done():
                        failed.set_exception(exc)
                    continue
                if whole is None:
                    continue  # more chunks to come
                future = stream.pending.pop(whole.request_id, None)
                if future is not None and not future.done():
                    future.set_result(whole)
                else:
                    release_response(whole)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "stream cancelled"
        except Exception as exc:  # noqa: BLE001 - whatever broke the read, the requests on it fail over
            reason = f"stream read failed: {type(exc).__name__}: {exc}"
        finally:
            self._lose(stream, reason)
            await stream.writer.close()

    async def call(self, request: worker_pb2.ForwardRequest, timeout_s: float) -> worker_pb2.ForwardResponse:
        """Sends ``request`` and waits for its response; errors name this peer as the failed hop.

        ``timeout_s`` bounds everything: waiting for room in the writer's queue, writing every chunk and
        the reply. Cancelling the caller is always safe for the other requests on the stream.
        """
        request_id = request.request_id
        if request_id in self._inflight:
            raise ShardmeshError(f"duplicate request id {request_id!r} in flight to {self.address}")
        stream = self._open()  # before the first await: a pool cannot evict a peer with requests in flight
        future: asyncio.Future[worker_pb2.ForwardResponse] = asyncio.get_running_loop().create_future()
        stream.pending[request_id] = future
        self._inflight.add(request_id)
        out: Outgoing | None = None
        delivered = False
        try:
            async with asyncio.timeout(timeout_s):
                out = await stream.writer.submit(request_id, split_message(request))
                response = await future
                delivered = True
        except TimeoutError:
            raise DeadlineExceeded(
                f"hop {self.worker_id or self.address} ({self.address}) did not answer within {timeout_s * 1000:.0f} ms",
                failed_worker_id=self.worker_id,
                failed_address=self.address,
            ) from None
        except ConnectionError as exc:  # the writer failed before this request was queued
            raise self._fail(str(exc)) from None
        finally:
            self._inflight.discard(request_id)
            if stream.pending.get(request_id) is future:
                del stream.pending[request_id]
                if out is not None:
                    stream.writer.cancel(out)
            if not delivered and future.done() and not future.cancelled() and future.exception() is None:
                release_response(future.result())  # answered just as the caller gave up: nobody reads it
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

    async def close(self) -> None:
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.call.cancel()
        await stream.writer.close()
        if stream.reader is not None:
            stream.reader.cancel()
            try:
                await stream.reader
            except asyncio.CancelledError:
                pass
