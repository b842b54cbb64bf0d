"""A userspace TCP fault proxy (what toxiproxy does), placed in front of one worker.

The worker listens on a private port and advertises the proxy's port, so every peer that dials it (the
router, upstream workers in relay mode, Consul's gRPC check) goes through here. Each accepted connection
is attributed to the process that opened it (by looking up which known pid owns the peer's socket), so a
fault can target one pair, e.g. ``[w0r0, w1r0]``, while other callers pass untouched.

Faults, per rule (source ``None`` = every caller), per direction (``to`` the worker, ``from`` it):
- ``delay`` (+ uniform jitter): every chunk is held back, pipelined and in order, as a slow link does;
- ``bandwidth``: a token bucket per connection and direction;
- ``blackhole``: forwarding stops and reading stops, the sockets stay open (half-open: no RST, no FIN);
  the peer's writes fill kernel buffers and its reads get nothing. When the rule ends the held bytes flow
  on, as TCP retransmission would deliver them after a routing blackhole heals;
- ``partition``: blackhole in both directions; ``reset``: open connections are aborted with RST
  (SO_LINGER 0) and new ones are reset on accept while the rule holds.
While a rule aimed at one caller is active, a new connection forwards nothing until its caller is known, so the
fault applies from the first byte.
Nothing here touches the host's network configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_QUEUED_BYTES = 8 * 1024 * 1024  # per connection and direction, while a delay holds chunks back
TO, FROM = "to", "from"
IDENTIFY_TIMEOUT_S = 5.0  # a caller not attributed by then counts as "other"


@dataclass
class Rule:
    kind: str  # delay | bandwidth | blackhole | partition | reset
    source: str | None = None  # None: every caller
    direction: str = "both"  # to | from | both
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    kbps: float = 0.0

    def applies(self, source: str, direction: str) -> bool:
        return (self.source is None or self.source == source) and self.direction in ("both", direction)


@dataclass(eq=False)
class _Conn:
    source: str
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    identify: asyncio.Task[str] | None = None

    def reset(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                _abort_with_rst(w)
        for t in self.tasks:
            t.cancel()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def owner_of_port(port: int, pids: Mapping[str, int], remote_port: int | None = None) -> str:
    """Name of the known process holding the local TCP socket on ``port`` (connected to ``remote_port`` when
    given), or "other". One read of the kernel's socket table and a readlink per open file of each known
    process: a few ms, where psutil's per-process scan took 10 ms idle and 100s of ms on a loaded host, and a
    fault aimed at the caller waits for this answer."""
    inode = _socket_inode(port, remote_port)
    if inode is None:
        return "other"
    target = f"socket:[{inode}]"
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return name
    return "other"


def _socket_inode(port: int, remote_port: int | None) -> str | None:
    """Inode of the TCP socket whose local port is ``port`` (and remote port ``remote_port``), from
    /proc/net/tcp and tcp6 (this network namespace)."""
    local_suffix = f":{port:04X}"
    remote_suffix = f":{remote_port:04X}" if remote_port is not None else ""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            with open(table) as f:
                next(f, None)  # header
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[1].endswith(local_suffix) and fields[2].endswith(remote_suffix):
                        if fields[9] != "0":
                            return fields[9]
    return None


class FaultProxy:
    """Listens on ``listen_port`` (0 = any) and forwards to ``upstream``; rules change while it runs."""

    def __init__(self, upstream: tuple[str, int], pids: Callable[[], Mapping[str, int]] = dict, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self._pids = pids
        self.rules: list[Rule] = []
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()
        self.stats = {"connections": 0, "reset": 0, "held_chunks": 0, "delayed_chunks": 0}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, listen_port: int = 0) -> str:
        self._server = await asyncio.start_server(self._accept, self.host, listen_port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.reset()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # -- rules ----------------------------------------------------------------------------------------
    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        if rule.kind == "reset":
            for conn in list(self._conns):
                if rule.source is None or conn.source == rule.source:
                    self.stats["reset"] += 1
                    conn.reset()
        self._wake()
        return rule

    def remove(self, rule: Rule) -> None:
        with contextlib.suppress(ValueError):
            self.rules.remove(rule)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _active(self, kind: str, source: str, direction: str) -> Rule | None:
        for rule in self.rules:
            if rule.kind == kind and rule.applies(source, direction):
                return rule
        return None

    def _aimed_rule_active(self) -> bool:
        return any(rule.source is not None for rule in self.rules)

    def _held(self, source: str, direction: str) -> bool:
        return bool(self._active("blackhole", source, direction) or self._active("partition", source, "both"))

    # -- forwarding -----------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Conn("other", writer)
        self.stats["connections"] += 1
        # Attributing the caller reads the socket table and a few processes' fds: off the loop, and without
        # delaying the connection unless a fault aimed at one caller is active (then see below).
        identify = asyncio.create_task(asyncio.to_thread(owner_of_port, peer[1], dict(self._pids()), self.port)) if peer else None
        conn.identify = identify
        if identify is not None:
            identify.add_done_callback(lambda t: self._identified(conn, t))
            if self._aimed_rule_active():
                # A fault aimed at one caller holds from its first byte: until the caller is known, nothing is
                # forwarded (its bytes wait in the kernel's buffer). Letting it through meanwhile gave that
                # caller a working link for as long as the lookup took (100s of ms on a loaded host).
                with contextlib.suppress(Exception):
                    conn.source = await asyncio.wait_for(asyncio.shield(identify), IDENTIFY_TIMEOUT_S)
        if self._active("reset", conn.source, TO):
            self.stats["reset"] += 1
            conn.reset()
            return
        self._conns.add(conn)
        try:
            while self._held(conn.source, TO):  # a partitioned caller's connect "succeeds", then nothing flows
                await self._changed.wait()
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
            except (OSError, TimeoutError):
                conn.reset()  # the worker is down: the caller sees what it would see without the proxy
                return
            conn.upstream = up_writer
            conn.tasks = [
                asyncio.create_task(self._pipe(reader, up_writer, conn, TO)),
                asyncio.create_task(self._pipe(up_reader, writer, conn, FROM)),
            ]
            done, _ = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
            # One side ended: a reset there becomes a reset here, an orderly close stays orderly.
            failed = any(t.cancelled() or t.exception() is not None for t in done)
            if failed:
                conn.reset()
            else:
                await asyncio.wait(conn.tasks, timeout=30)
        except asyncio.CancelledError:
            conn.reset()
        finally:
            for t in conn.tasks:
                t.cancel()
            self._conns.discard(conn)
            for w in (writer, conn.upstream):
                if w is not None:
                    w.close()

    def _identified(self, conn: _Conn, task: asyncio.Task[str]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        conn.source = task.result()
        if conn not in self._conns:  # still in _accept, which applies the rules once it knows the caller
            return
        for rule in self.rules:  # a reset aimed at this caller that began before it was known
            if rule.kind == "reset" and rule.source == conn.source:
                self.stats["reset"] += 1
                conn.reset()
        self._wake()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn, direction: str) -> None:
        """Reader and writer halves joined by a queue, so a delay pipelines chunks instead of serialising."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        budget = asyncio.Semaphore(max(1, MAX_QUEUED_BYTES // CHUNK))

        async def read_side() -> None:
            try:
                await read_chunks()
            except BaseException:
                queue.put_nowait((-1.0, b""))  # tell the writer half: this side broke
                raise

        async def read_chunks() -> None:
            last_release = 0.0
            while True:
                while self._held(conn.source, direction):
                    self.stats["held_chunks"] += 1
                    await self._changed.wait()
                data = await reader.read(CHUNK)
                await budget.acquire()
                if not data:
                    await queue.put((0.0, b""))
                    return
                release = time.monotonic()
                rule = self._active("delay", conn.source, direction)
                if rule is not None:
                    self.stats["delayed_chunks"] += 1
                    jitter = random.uniform(-rule.jitter_ms, rule.jitter_ms) if rule.jitter_ms else 0.0
                    release += max(0.0, rule.delay_ms + jitter) / 1000
                last_release = max(last_release, release)  # in order, as one link delivers
                await queue.put((last_release, data))

        async def write_side() -> None:
            while True:
                release, data = await queue.get()
                budget.release()
                if release < 0:
                    raise ConnectionResetError(f"{conn.source} {direction}: the other side of the proxy broke")
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                while self._held(conn.source, direction):
                    await self._changed.wait()
                wait = release - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                rule = self._active("bandwidth", conn.source, direction)
                if rule is not None and rule.kbps > 0:  # a chunk arrives after its transmission time on the link
                    await asyncio.sleep(len(data) / (rule.kbps * 1000 / 8))
                writer.write(data)
                await writer.drain()

        reading = asyncio.create_task(read_side())
        try:
            await write_side()
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
