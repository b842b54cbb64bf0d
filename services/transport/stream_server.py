"""Server side of a multiplexed bidi stream: many requests in flight, answered out of order by id.

Shared by the worker's ForwardStream and the router's InferStream. One failing request becomes an
error message on the stream, never the end of the stream; so does a message that does not parse
(methods registered with raw bytes, see :mod:`services.transport.raw`), answered with an empty id.

Bounds, so that a client that floods or never reads costs a fixed amount of memory:
- at most ``max_pending`` requests run at once, and a request keeps its slot until its answer is
  written: a client that stops reading stops getting answers written, then stops being read from;
- at most ``parked_limit(max_pending)`` complete requests wait for a slot, and the outbox holds at
  most that many unslotted error answers. Beyond these the stream is not read, so HTTP/2 flow
  control holds the client back instead of this process's memory;
- cancel messages are read while requests wait for slots (a parked request is simply dropped), so a
  cancel does not wait behind saturated slots.
Requests dropped unanswered and answers never written release their shared-memory segments.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc

from services.errors import InvalidArgument
from services.logging_json import request_scope
from services.telemetry import STREAMS_OPEN, STREAMS_OPENED

log = logging.getLogger(__name__)

_END = object()  # marks the end of the outbox


class _HasRequestId(Protocol):
    request_id: str


Req = TypeVar("Req", bound=_HasRequestId)
Resp = TypeVar("Resp")


def parked_limit(max_pending: int) -> int:
    """Complete requests held while every slot is taken: enough to keep reading cancels, never many."""
    return max(1, min(max_pending, 16))


def _nothing(_item: Any) -> None:
    return None


class StreamHandlers(Generic[Req, Resp]):
    """What a multiplexed stream does with each request."""

    def __init__(
        self,
        handle: Callable[[Req], Awaitable[Resp]],
        on_error: Callable[[Req, BaseException], Resp],
        is_cancel: Callable[[Req], bool] = lambda _req: False,
        absorb: Callable[[Req], Req | None] = lambda req: req,
        expand: Callable[[Resp], list[Resp]] = lambda resp: [resp],
        parse: Callable[[Any], Req] = lambda msg: msg,
        empty: Callable[[], Req] | None = None,
        forget: Callable[[str], None] = _nothing,
        release_request: Callable[[Req], None] = _nothing,
        release_response: Callable[[Resp], None] = _nothing,
    ) -> None:
        self.handle = handle
        self.on_error = on_error
        self.is_cancel = is_cancel
        self.absorb = absorb  # reassembly: None until a request is complete
        self.expand = expand  # chunking: one response as several messages
        self.parse = parse  # raw bytes -> request; raises InvalidArgument for a corrupt message
        self.empty = empty  # the request an unparsable message is answered as (empty id)
        self.forget = forget  # drops a cancelled request's partial reassembly
        self.release_request = release_request  # frees what a request dropped unanswered holds (shm)
        self.release_response = release_response  # frees what an answer never written holds (shm)


async def serve_multiplexed(
    context: grpc.aio.ServicerContext, handlers: StreamHandlers[Req, Resp], max_pending: int
) -> None:
    """Runs until the client half-closes and every admitted request is answered, or the call ends."""
    limit = parked_limit(max_pending)
    outbox: asyncio.Queue[tuple[Resp, bool] | object] = asyncio.Queue(maxsize=max_pending + limit)
    tasks: dict[str, asyncio.Task[None]] = {}
    parked: collections.OrderedDict[str, Req] = collections.OrderedDict()
    free = [max_pending]  # slots: taken when a request starts, given back once its answer is written
    progress = asyncio.Event()  # a slot came back or a task ended: the reader and the closer look again
    closing = [False]

    def admit() -> None:
        while parked and free[0] > 0 and not closing[0]:
            _, request = parked.popitem(last=False)
            free[0] -= 1
            task = asyncio.create_task(run_one(request))
            tasks[request.request_id] = task
            task.add_done_callback(lambda t, req=request: finished(req, t))

    def give_back_slot() -> None:
        free[0] += 1
        admit()
        progress.set()

    def finished(request: Req, task: asyncio.Task[None]) -> None:
        if tasks.get(request.request_id) is task:
            del tasks[request.request_id]
        if task.cancelled():  # before or while handling (perhaps before it even started): no answer
            handlers.release_request(request)  # its input may never have been read (a no-op once consumed)
            give_back_slot()
        progress.set()

    async def run_one(request: Req) -> None:
        # Log lines about this request carry its id (and its trace id, from ForwardRequest.traceparent).
        with request_scope(request.request_id, getattr(request, "traceparent", "")):
            try:
                response = await handlers.handle(request)
            except Exception as exc:  # noqa: BLE001 - each request's failure is reported on the stream
                response = handlers.on_error(request, exc)
                log.debug("stream request %s failed: %s", request.request_id, exc)
            else:
                log.debug("stream request %s answered", request.request_id)
        try:
            await outbox.put((response, True))
        except asyncio.CancelledError:
            handlers.release_response(response)
            give_back_slot()

    def cancel(request_id: str) -> None:
        handlers.forget(request_id)
        task = tasks.get(request_id)
        if task is not None:
            task.cancel()
        dropped = parked.pop(request_id, None)
        if dropped is not None:
            handlers.release_request(dropped)

    async def reader() -> None:
        while True:
            while len(parked) >= limit:  # every slot taken and the parking full: stop reading
                progress.clear()
                await progress.wait()
            message = await context.read()
            if message is grpc.aio.EOF:
                break
            try:
                request = handlers.parse(message)
            except InvalidArgument as exc:
                if handlers.empty is None:
                    raise
                await outbox.put((handlers.on_error(handlers.empty(), exc), False))
                continue
            if handlers.is_cancel(request):
                cancel(request.request_id)
                continue
            try:
                whole = handlers.absorb(request)
            except Exception as exc:  # noqa: BLE001 - a malformed chunk fails that request only
                await outbox.put((handlers.on_error(request, exc), False))
                continue
            if whole is None:
                continue
            request = whole
            if request.request_id in tasks or request.request_id in parked:
                handlers.release_request(request)
                await outbox.put(
                    (handlers.on_error(request, InvalidArgument(f"duplicate request_id {request.request_id!r} in flight")), False)
                )
                continue
            parked[request.request_id] = request
            admit()

    async def read_then_close() -> None:
        try:
            await reader()
            while tasks or parked:
                progress.clear()
                await progress.wait()
        finally:
            await outbox.put(_END)

    closer = asyncio.create_task(read_then_close())
    STREAMS_OPENED.labels(direction="inbound").inc()
    STREAMS_OPEN.labels(direction="inbound").inc()
    try:
        while (item := await outbox.get()) is not _END:
            response, holds_slot = item  # type: ignore[misc]
            try:
                for part in handlers.expand(response):
                    await context.write(part)
            finally:
                if holds_slot:
                    give_back_slot()
        await closer  # re-raises a reader failure (e.g. the call was cancelled)
    finally:
        STREAMS_OPEN.labels(direction="inbound").dec()
        closing[0] = True
        for request in parked.values():
            handlers.release_request(request)
        parked.clear()
        closer.cancel()
        for task in list(tasks.values()):
            task.cancel()
        with contextlib.suppress(BaseException):
            await closer
        while not outbox.empty():
            item = outbox.get_nowait()
            if item is not _END:
                handlers.release_response(item[0])  # type: ignore[index]
