"""The single stream writer: callers that give up never cancel a write, and what they leave unsent is dropped."""

from __future__ import annotations

import asyncio

import pytest

from services.transport.stream_writer import StreamWriter


class GatedCall:
    """A call whose writes complete only while the test's gate is open; records what was written."""

    def __init__(self) -> None:
        self.written: list[object] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.cancelled = False
        self.fail_with: BaseException | None = None

    async def write(self, message: object) -> None:
        await asyncio.sleep(0)  # a real write yields to the loop
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.written.append(message)

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def _writer(call: GatedCall, failures: list[str], **kw: int) -> StreamWriter:
    return StreamWriter(call, lambda rid: ("cancel", rid), failures.append, "test", **kw)


async def _drain() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_cancel_mid_message_drops_unsent_chunks_and_sends_cancel() -> None:
    call, failures = GatedCall(), []
    writer = _writer(call, failures)
    call.gate.clear()  # the writer blocks inside a write, as on a stalled HTTP/2 window
    big = await writer.submit("big", [("big", i) for i in range(5)])
    await _drain()
    writer.cancel(big)
    small = await writer.submit("small", [("small", 0)])
    call.gate.set()
    await _drain()
    assert [m for m in call.written if m[0] == "big"] == [("big", 0)] and ("small", 0) in call.written
    assert ("cancel", "big") in call.written
    assert not call.cancelled and not failures and small.written
    await writer.close()


async def test_cancel_before_start_sends_nothing() -> None:
    call, failures = GatedCall(), []
    call.gate.clear()
    writer = _writer(call, failures)
    first = await writer.submit("first", [("first", 0)])
    queued = await writer.submit("queued", [("queued", 0), ("queued", 1)])
    writer.cancel(queued)
    call.gate.set()
    await _drain()
    assert call.written == [("first", 0)] and first.written
    await writer.close()


async def test_small_requests_interleave_with_chunks_of_large_ones() -> None:
    call, failures = GatedCall(), []
    call.gate.clear()
    writer = _writer(call, failures)
    await writer.submit("big", [("big", i) for i in range(10)])
    await writer.submit("small", [("small", 0)])
    call.gate.set()
    await _drain()
    assert call.written.index(("small", 0)) <= 2


async def test_queue_is_bounded_and_waiting_for_room_is_cancellable() -> None:
    call, failures = GatedCall(), []
    call.gate.clear()
    writer = _writer(call, failures, max_queued=2)
    await writer.submit("a", [1])
    await writer.submit("b", [2])
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await writer.submit("c", [3])
    assert not call.cancelled and call.written == []
    call.gate.set()
    await _drain()
    assert call.written == [1, 2]
    await writer.submit("c", [3])
    await _drain()
    assert call.written == [1, 2, 3]
    await writer.close()


@pytest.mark.parametrize("error", [asyncio.InvalidStateError("RPC already finished."), RuntimeError("boom")])
async def test_a_failed_write_fails_the_stream_once_and_refuses_new_requests(error: BaseException) -> None:
    call, failures = GatedCall(), []
    call.fail_with = error
    writer = _writer(call, failures)
    await writer.submit("a", [1])
    await _drain()
    assert len(failures) == 1 and type(error).__name__ in failures[0] and call.cancelled
    with pytest.raises(ConnectionError, match=type(error).__name__):
        await writer.submit("b", [2])
