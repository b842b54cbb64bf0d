"""Server side of a multiplexed bidi stream: many requests in flight, answered out of order by id.

Shared by the worker's ForwardStream and the router's InferStream. One failing request becomes an
error message on the stream, never the end of the stream. Requests are read only while fewer than
``max_pending`` are unanswered, so a flood is held back by HTTP/2 flow control instead of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import grpc

from services.errors import InvalidArgument

log = logging.getLogger(__name__)

_END = object()  # marks the end of the outbox


class _HasRequestId(Protocol):
    request_id: str


Req = TypeVar("Req", bound=_HasRequestId)
Resp = TypeVar("Resp")


class StreamHandlers(Generic[Req, Resp]):
    """What a multiplexed stream does with each request."""

    def __init__(
        self,
        handle: Callable[[Req], Awaitable[Resp]],
        on_error: Callable[[Req, BaseException], Resp],
        is_cancel: Callable[[Req], bool] = lambda _req: False,
        absorb: Callable[[Req], Req | None] = lambda req: req,
        expand: Callable[[Resp], list[Resp]] = lambda resp: [resp],
    ) -> None:
        self.handle = handle
        self.on_error = on_error
        self.is_cancel = is_cancel
        self.absorb = absorb  # reassembly: None until a request is complete
        self.expand = expand  # chunking: one response as several messages


async def serve_multiplexed(
    context: grpc.aio.ServicerContext, handlers: StreamHandlers[Req, Resp], max_pending: int
) -> None:
    """Runs until the client half-closes and every admitted request is answered, or the call ends."""
    outbox: asyncio.Queue[Resp | object] = asyncio.Queue()
    tasks: dict[str, asyncio.Task[None]] = {}
    slots = asyncio.Semaphore(max_pending)

    async def run_one(request: Req) -> None:
        try:
            response = await handlers.handle(request)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - each request's failure is reported on the stream
            response = handlers.on_error(request, exc)
        await outbox.put(response)

    def finished(request_id: str, task: asyncio.Task[None]) -> None:
        if tasks.get(request_id) is task:
            del tasks[request_id]
        slots.release()

    async def reader() -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                break
            if handlers.is_cancel(request):
                task = tasks.get(request.request_id)
                if task is not None:
                    task.cancel()
                continue
            try:
                whole = handlers.absorb(request)
            except Exception as exc:  # noqa: BLE001 - a malformed chunk fails that request only
                await outbox.put(handlers.on_error(request, exc))
                continue
            if whole is None:
                continue
            request = whole
            if request.request_id in tasks:
                await outbox.put(
                    handlers.on_error(request, InvalidArgument(f"duplicate request_id {request.request_id!r} in flight"))
                )
                continue
            await slots.acquire()
            task = asyncio.create_task(run_one(request))
            tasks[request.request_id] = task
            task.add_done_callback(lambda t, rid=request.request_id: finished(rid, t))

    async def read_then_close() -> None:
        try:
            await reader()
            while tasks:
                await asyncio.wait(list(tasks.values()))
        finally:
            await outbox.put(_END)  # type: ignore[arg-type]

    closer = asyncio.create_task(read_then_close())
    try:
        while (response := await outbox.get()) is not _END:
            for part in handlers.expand(response):  # type: ignore[arg-type]
                await context.write(part)
        await closer  # re-raises a reader failure (e.g. the call was cancelled)
    finally:
        closer.cancel()
        for task in list(tasks.values()):
            task.cancel()
        with contextlib.suppress(BaseException):
            await closer
