"""serve_multiplexed's bounds, with a scripted stream: cancels get through saturated slots, a client that
does not read stops being read, and whatever is dropped unanswered is released."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pytest

from services.errors import InvalidArgument
from services.transport.stream_server import StreamHandlers, parked_limit, serve_multiplexed


@dataclass
class Msg:
    request_id: str
    cancel: bool = False


class ScriptedContext:
    """Messages to read come from a queue; writes block while ``writable`` is clear (a client not reading)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.read_count = 0
        self.written: list[str] = []
        self.writable = asyncio.Event()
        self.writable.set()

    async def read(self) -> object:
        message = await self.inbox.get()
        if message is not grpc.aio.EOF:
            self.read_count += 1
        return message

    async def write(self, response: str) -> None:
        await self.writable.wait()
        self.written.append(response)


class Recorder:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.gate = asyncio.Event()
        self.released_requests: list[str] = []
        self.released_responses: list[str] = []

    async def handle(self, request: Msg) -> str:
        self.started.append(request.request_id)
        await self.gate.wait()
        return f"ok:{request.request_id}"

    def handlers(self) -> StreamHandlers[Msg, str]:
        return StreamHandlers(
            self.handle,
            on_error=lambda request, exc: f"error:{request.request_id}:{exc}",
            is_cancel=lambda request: request.cancel,
            release_request=lambda request: self.released_requests.append(request.request_id),
            release_response=self.released_responses.append,
        )


async def _settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


async def _stalled_client(requests: int) -> tuple[ScriptedContext, Recorder, asyncio.Task[None]]:
    """A stream (2 slots) whose client sent ``requests`` requests and reads nothing."""
    context, rec = ScriptedContext(), Recorder()
    context.writable.clear()
    rec.gate.set()
    serving = asyncio.create_task(serve_multiplexed(context, rec.handlers(), max_pending=2))  # type: ignore[arg-type]
    for i in range(requests):
        context.inbox.put_nowait(Msg(f"r{i}"))
    await _settle()
    return context, rec, serving


async def test_cancel_is_read_while_every_slot_is_taken() -> None:
    context, rec = ScriptedContext(), Recorder()
    serving = asyncio.create_task(serve_multiplexed(context, rec.handlers(), max_pending=2))  # type: ignore[arg-type]
    for rid in ("a", "b", "parked"):
        context.inbox.put_nowait(Msg(rid))
    context.inbox.put_nowait(Msg("parked", cancel=True))
    context.inbox.put_nowait(Msg("a", cancel=True))
    await _settle()
    assert context.read_count == 5, "the cancels waited behind saturated slots"
    assert sorted(rec.released_requests) == ["a", "parked"]  # dropped unanswered: their segments are freed
    rec.gate.set()
    context.inbox.put_nowait(grpc.aio.EOF)
    await asyncio.wait_for(serving, 5)
    assert context.written == ["ok:b"] and "parked" not in rec.started


async def test_a_client_that_does_not_read_stops_being_read() -> None:
    context, rec, serving = await _stalled_client(100)
    # Two answers hold the slots until written, a few more wait parked; nothing else is read.
    assert context.read_count == 2 + parked_limit(2), context.read_count
    context.writable.set()
    context.inbox.put_nowait(grpc.aio.EOF)
    await asyncio.wait_for(serving, 5)
    assert sorted(context.written) == sorted(f"ok:r{i}" for i in range(100))


async def test_answers_never_written_are_released_when_the_stream_ends() -> None:
    context, rec, serving = await _stalled_client(6)
    serving.cancel()  # the call ends (client gone) with answers and parked requests outstanding
    with pytest.raises(asyncio.CancelledError):
        await serving
    await _settle()
    assert rec.released_responses, "answers that were never written kept their segments"
    assert rec.released_requests, "requests dropped unanswered kept their segments"


async def test_unparsable_message_is_answered_in_band_and_the_stream_goes_on() -> None:
    context, rec = ScriptedContext(), Recorder()
    rec.gate.set()
    handlers = rec.handlers()

    def parse(raw: object) -> Msg:
        if not isinstance(raw, Msg):
            raise InvalidArgument("message is not a valid Msg")
        return raw

    handlers.parse = parse
    handlers.empty = lambda: Msg("")
    serving = asyncio.create_task(serve_multiplexed(context, handlers, max_pending=2))  # type: ignore[arg-type]
    for message in (Msg("before"), b"\x0a\x05ab", Msg("after"), grpc.aio.EOF):
        context.inbox.put_nowait(message)
    await asyncio.wait_for(serving, 5)
    assert sorted(context.written) == sorted(["ok:before", "error::message is not a valid Msg", "ok:after"])
