"""Starts and stops a local mesh: workers and router as child processes (exec'd, never forked copies
of this process, so no gRPC state crosses a fork), waits for each to be SERVING, and reaps them all."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.errors import ShardmeshError
from services.lifecycle import LISTENING_PREFIX
from services.localmesh.security import MESH_KEY_FLAG, MeshKeyDir, has_flag, security_line
from services.localmesh.spec import MeshSpec, WorkerSpec
from services.security.mesh_auth import mesh_call_metadata
from services.security.mesh_key import load_mesh_key

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 15.0
HEALTH_POLL_S = 0.1

Progress = Callable[[str, str], None]  # (child name, event)


class ChildFailed(ShardmeshError):
    """A child process exited during start-up; the message carries its last stderr lines."""


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    address: str = ""
    stderr_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    _io: list[asyncio.Task[None]] = field(default_factory=list)
    _listening: asyncio.Future[str] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    async def spawn(self, echo_stderr: bool) -> None:
        self._listening = asyncio.get_running_loop().create_future()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._io = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr(echo_stderr)),
        ]

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith(LISTENING_PREFIX) and self._listening and not self._listening.done():
                fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
                self._listening.set_result(fields.get("address", ""))

    async def _read_stderr(self, echo: bool) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr_tail.append(line)
            if echo:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)

    def failure(self) -> ChildFailed:
        tail = "\n".join(f"    {line}" for line in self.stderr_tail) or "    (no output)"
        code = self.proc.returncode if self.proc else None
        return ChildFailed(f"{self.name} exited with code {code} during start-up:\n{tail}")

    async def wait_listening(self, timeout_s: float) -> str:
        assert self.proc is not None and self._listening is not None
        exited = asyncio.create_task(self.proc.wait())
        try:
            done, _ = await asyncio.wait({self._listening, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if self._listening.done():
            self.address = self._listening.result()
            return self.address
        if done:
            await asyncio.gather(*self._io, return_exceptions=True)
            raise self.failure()
        raise ChildFailed(f"{self.name} did not report a listening address within {timeout_s:.0f}s")

    async def wait_serving(self, timeout_s: float, on_wait: Callable[[], None] | None = None) -> None:
        """Polls grpc.health.v1 until SERVING; fails fast (with its stderr) if the process exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.returncode is not None:
                    await asyncio.gather(*self._io, return_exceptions=True)
                    raise self.failure()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise ChildFailed(f"{self.name} at {self.address} was not SERVING within {timeout_s:.0f}s")
                if on_wait:
                    on_wait()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.proc.wait()), HEALTH_POLL_S)

    def send(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.send(signal.SIGCONT)  # a stopped (SIGSTOP) child cannot handle SIGTERM
            self.send(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.send(signal.SIGKILL)
                await self.proc.wait()
        await asyncio.gather(*self._io, return_exceptions=True)
        return self.proc.returncode


def _cli() -> list[str]:
    return [sys.executable, "-m", "services.cli.main"]


def worker_argv(spec: MeshSpec, worker: WorkerSpec, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        *_cli(), "worker", "--model", spec.model, "--layers", str(worker.span), "--listen", worker.listen,
        "--worker-id", worker.name, *spec.worker_args, *worker.args, *extra,
    ]  # fmt: skip


def router_argv(spec: MeshSpec, worker_addresses: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    if spec.discovery == "consul":
        discovery = ["--discovery", f"consul://{spec.consul_address}?service={spec.consul_service}"]
    else:
        discovery = ["--workers", ",".join(worker_addresses)]
    return [*_cli(), "router", "--listen", spec.router_listen, "--mode", spec.mode, *discovery, *spec.router_args, *extra]


class LocalMesh:
    """A running local mesh. ``async with LocalMesh(spec) as mesh: mesh.router_address``."""

    def __init__(
        self, spec: MeshSpec, *, progress: Progress | None = None, echo_stderr: bool = False,
        on_spawn: Callable[[str, int], None] | None = None,
    ) -> None:
        self.spec = spec
        self.workers: list[Child] = []
        self.router: Child | None = None
        self._progress = progress or (lambda name, event: None)
        # (worker name, pid) right after each worker starts, before it loads anything (bench placement's CPU quota)
        self._on_spawn = on_spawn or (lambda name, pid: None)
        self._echo = echo_stderr
        self._key_dir: MeshKeyDir | None = None

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    @property
    def router_address(self) -> str:
        return self.router.address if self.router else ""

    @property
    def mesh_key_path(self) -> Path | None:
        """The mesh key generated for this run (None when the spec brings its own --mesh-key-file)."""
        return self._key_dir.path if self._key_dir else None

    def mesh_metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata that makes a caller a member of this mesh (for tests and tools calling workers)."""
        return mesh_call_metadata(load_mesh_key(str(self._key_dir.path), {})) if self._key_dir else ()

    def security_line(self) -> str:
        listens = [self.spec.router_listen, *(w.listen for w in self.spec.workers)]
        tls = has_flag(self.spec.router_args, "--tls-cert")
        return security_line(listens, tls, self.mesh_key_path)

    def _key_args(self) -> tuple[str, ...]:
        return (MESH_KEY_FLAG, str(self._key_dir.path)) if self._key_dir else ()

    def _worker_extra(self) -> tuple[str, ...]:
        if self.spec.discovery != "consul":
            return self._key_args()
        agent = ("--consul", self.spec.consul_address) if self.spec.consul_address else ()
        return (*agent, "--consul-service", self.spec.consul_service, *self._key_args())

    def _ensure_mesh_key(self) -> None:
        """Every local mesh runs with a mesh key unless its spec passes one itself."""
        brings_own = has_flag(self.spec.router_args, MESH_KEY_FLAG) or has_flag(self.spec.worker_args, MESH_KEY_FLAG)
        if self._key_dir is None and not brings_own:
            self._key_dir = MeshKeyDir()

    async def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        if self.spec.needs_placement:  # layers: auto: plan every range before starting anything
            from services.localmesh.auto import place_auto

            self.spec, _, _ = await asyncio.to_thread(place_auto, self.spec, progress=self._say)
        try:
            self._ensure_mesh_key()
            for w in self.spec.workers:
                child = Child(w.name, worker_argv(self.spec, w, self._worker_extra()))
                await child.spawn(self._echo)
                self.workers.append(child)
                self._on_spawn(w.name, child.pid)
                self._progress(w.name, "started")
            await asyncio.gather(*(self._await_worker(c, timeout_s) for c in self.workers))
            self.router = Child("router", router_argv(self.spec, [c.address for c in self.workers], self._key_args()))
            await self.router.spawn(self._echo)
            self._progress("router", "started")
            await self.router.wait_listening(timeout_s)
            await self.router.wait_serving(timeout_s)
            self._progress("router", "serving")
            return self.router.address
        except BaseException:
            await self.stop()
            raise

    async def _await_worker(self, child: Child, timeout_s: float) -> None:
        await child.wait_listening(timeout_s)
        self._progress(child.name, "listening")
        await child.wait_serving(timeout_s, on_wait=lambda: self._progress(child.name, "loading"))
        self._progress(child.name, "serving")

    async def start_worker(self, worker: WorkerSpec, timeout_s: float = START_TIMEOUT_S) -> Child:
        """Starts one more worker (e.g. a restarted replica) and waits until it is SERVING."""
        child = Child(worker.name, worker_argv(self.spec, worker, self._worker_extra()))
        await child.spawn(self._echo)
        self.workers.append(child)
        try:
            self._on_spawn(worker.name, child.pid)
            await self._await_worker(child, timeout_s)
        except BaseException:
            await child.stop()
            raise
        return child

    async def stop(self) -> dict[str, int | None]:
        """Stops router first (no new requests), then workers; returns each child's exit code."""
        codes: dict[str, int | None] = {}
        if self.router is not None:
            codes["router"] = await self.router.stop()
        results = await asyncio.gather(*(c.stop() for c in self.workers), return_exceptions=True)
        for child, code in zip(self.workers, results):
            codes[child.name] = code if not isinstance(code, BaseException) else None
        if self._key_dir is not None:
            self._key_dir.remove()
            self._key_dir = None
        return codes

    async def __aenter__(self) -> LocalMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
