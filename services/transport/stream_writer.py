"""The one writer of a multiplexed stream: requests are queued, never written by their callers.

In grpc.aio a cancelled ``await call.write()`` cancels the whole RPC, so on a stream shared by many
requests a caller that times out or is cancelled (a hedge loser, a client that went away) must never
be the one writing. Callers hand their messages to this writer through a bounded queue and may give
up at any time: a request not yet started is dropped, one cut off between chunks loses its unsent
chunks, and the peer gets a cancel message for anything it has seen. The writer task itself is
cancelled only when the stream is closed.

Single-message requests interleave freely with the chunks of large ones; at most
``MAX_INTERLEAVED`` chunked requests are in progress at once, so a receiver's reassembly budget
holds a few large tensors, not every queued one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

MAX_QUEUED = 256  # requests accepted but not yet fully written, per stream
MAX_INTERLEAVED = 4  # chunked requests whose chunks alternate on the wire


class WritableCall(Protocol):
    async def write(self, message: Any) -> None: ...

    def cancel(self) -> bool: ...


class Outgoing:
    """One request's messages on their way out; ``sent`` counts messages already written."""

    __slots__ = ("request_id", "parts", "total", "sent", "cancelled", "finished")

    def __init__(self, request_id: str, parts: Sequence[Any]) -> None:
        self.request_id = request_id
        self.parts: list[Any] = list(parts)
        self.total = len(self.parts)
        self.sent = 0
        self.cancelled = False
        self.finished = False  # written, dropped or failed: its queue room is given back

    @property
    def started(self) -> bool:
        return self.sent > 0

    @property
    def written(self) -> bool:
        return self.sent == self.total


class StreamWriter:
    """Owns every ``write`` on one call; see the module docstring."""

    def __init__(
        self,
        call: WritableCall,
        make_cancel: Callable[[str], Any],
        on_failure: Callable[[str], None],
        name: str,
        max_queued: int = MAX_QUEUED,
        max_interleaved: int = MAX_INTERLEAVED,
    ) -> None:
        self._call = call
        self._make_cancel = make_cancel
        self._on_failure = on_failure
        self._max_queued = max_queued
        self._room = asyncio.Semaphore(max_queued)
        self._max_interleaved = max_interleaved
        self._single: collections.deque[Outgoing] = collections.deque()
        self._chunked: collections.deque[Outgoing] = collections.deque()
        self._active: collections.deque[Outgoing] = collections.deque()
        self._cancels: collections.deque[str] = collections.deque()
        self._wake = asyncio.Event()
        self.failure: str | None = None
        self._task = asyncio.create_task(self._run(), name=f"write:{name}")

    @property
    def queued(self) -> int:
        return len(self._single) + len(self._chunked) + len(self._active)

    async def submit(self, request_id: str, parts: Sequence[Any]) -> Outgoing:
        """Queues one request's messages; waits (cancellably: nothing is written here) for room."""
        if self.failure is not None:
            raise ConnectionError(self.failure)
        await self._room.acquire()
        if self.failure is not None:
            self._room.release()
            raise ConnectionError(self.failure)
        out = Outgoing(request_id, parts)
        (self._single if out.total == 1 else self._chunked).append(out)
        self._wake.set()
        return out

    def cancel(self, out: Outgoing) -> None:
        """The caller stopped waiting: drop what is unsent; tell the peer if it saw any of it."""
        if out.cancelled or self.failure is not None:
            return
        out.cancelled = True
        if out.written:  # only the peer's work is left to stop
            self._cancels.append(out.request_id)
        # Otherwise the writer drops the unsent part when it meets it, and sends the cancel if it started.
        self._wake.set()

    async def _run(self) -> None:
        try:
            while True:
                if self._cancels:
                    await self._call.write(self._make_cancel(self._cancels.popleft()))
                    continue
                self._refill()
                if not self._active:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                out = self._active.popleft()
                if out.cancelled:
                    self._finish(out)
                    if out.started:
                        self._cancels.append(out.request_id)
                    continue
                part = out.parts[out.sent]
                out.parts[out.sent] = None  # written bytes are not kept
                await self._call.write(part)
                out.sent += 1
                if not out.written:
                    self._active.append(out)
                else:
                    self._finish(out)
        except asyncio.CancelledError:
            self._fail_all("stream closed")
            raise
        except Exception as exc:  # noqa: BLE001 - any write failure ends this stream, whatever its type
            # A finished call raises InvalidStateError, a broken one AioRpcError or UsageError.
            self._fail_all(f"stream write failed: {type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                self._call.cancel()

    def _refill(self) -> None:
        while self._single:
            self._active.append(self._single.popleft())
        in_progress = sum(1 for out in self._active if out.total > 1)
        while self._chunked and in_progress < self._max_interleaved:
            out = self._chunked.popleft()
            if out.cancelled:
                self._finish(out)
                continue
            self._active.append(out)
            in_progress += 1

    def _finish(self, out: Outgoing) -> None:
        if not out.finished:
            out.finished = True
            out.parts = out.parts[: out.sent]  # frees unsent chunks at once
            self._room.release()

    def _fail_all(self, reason: str) -> None:
        self.failure = self.failure or reason
        for queue in (self._single, self._chunked, self._active):
            while queue:
                self._finish(queue.popleft())
        self._cancels.clear()
        # Wake callers waiting for room: they see ``failure`` and give up.
        for _ in range(self._max_queued):
            self._room.release()
        self._on_failure(reason)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
