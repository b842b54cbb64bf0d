"""Test helpers that run real shardmesh processes (``shardmesh up``, single workers, routers) and
always clean them up. Every helper reads the child's stdout for the lines the CLI promises."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CLI = [sys.executable, "-m", "services.cli.main"]
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240.0

_live: set[subprocess.Popen[str]] = set()


def reap_all() -> None:
    """Kills every process these helpers started and that is still running (session teardown)."""
    for proc in list(_live):
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        _live.discard(proc)


@dataclass
class Proc:
    """A child process whose stdout and stderr lines are collected by reader threads."""

    argv: list[str]
    proc: subprocess.Popen[str] = field(init=False)
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, cwd=REPO
        )
        _live.add(self.proc)
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True).start()

    def _pump(self, stream: object, sink: list[str], to_queue: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line.rstrip("\n"))
            if to_queue:
                self.lines.put(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, prefix: str, timeout_s: float = START_TIMEOUT_S) -> str:
        """Waits for a stdout line starting with ``prefix``; fails with the child's stderr if it exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    time.sleep(0.2)  # let the reader threads drain
                    raise AssertionError(
                        f"process exited with {self.proc.returncode} before printing {prefix!r}:\n"
                        + "\n".join(self.stderr[-30:])
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {prefix!r} line within {timeout_s}s:\n" + "\n".join(self.stderr[-30:]))
                continue
            if line.startswith(prefix):
                return line

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        code = self.proc.wait(timeout_s)
        time.sleep(0.1)
        _live.discard(self.proc)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
            try:
                return self.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait(timeout_s)


def fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


@dataclass
class UpMesh:
    proc: Proc
    router: str
    workers: dict[str, dict[str, str]]  # name -> {pid, address}
    mesh_key_path: str = ""  # from the "security: ... mesh key PATH" line

    @property
    def mesh_metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata that lets a test call workers' mesh methods (Forward, ForwardStream, CloseSession)."""
        from services.security.mesh_auth import mesh_call_metadata
        from services.security.mesh_key import load_mesh_key

        return mesh_call_metadata(load_mesh_key(self.mesh_key_path, {})) if self.mesh_key_path else ()


@contextmanager
def mesh_up(config: dict[str, object], timeout_s: float = START_TIMEOUT_S) -> Iterator[UpMesh]:
    """Runs ``shardmesh up`` on ``config``; yields once it printed ``ready router=``; stops it after."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
        path = f.name
    proc = Proc([*CLI, "up", path])
    try:
        workers: dict[str, dict[str, str]] = {}
        key_path = ""
        while True:
            line = proc.expect("", timeout_s)
            if line.startswith("worker "):
                info = fields(line)
                workers[info["name"]] = info
            elif line.startswith("security:") and "mesh key /" in line:
                key_path = line.rsplit("mesh key ", 1)[1].strip()
            elif line.startswith("ready router="):
                yield UpMesh(proc, fields(line)["router"], workers, key_path)
                break
    finally:
        code = proc.stop(signal.SIGINT, 60)
        os.unlink(path)
    assert code == 0, f"shardmesh up exited {code}:\n" + "\n".join(proc.stderr[-30:])


def start_worker(model: str, layers: str, *extra: str) -> tuple[Proc, str]:
    """One worker on a free loopback port; returns once it listens (not yet SERVING)."""
    proc = Proc([*CLI, "worker", "--model", model, "--layers", layers, "--listen", "127.0.0.1:0", *extra])
    line = proc.expect("shardmesh-listening")
    return proc, fields(line)["address"]


def start_router(workers: list[str], *extra: str) -> tuple[Proc, str]:
    proc = Proc([*CLI, "router", "--listen", "127.0.0.1:0", "--workers", ",".join(workers), *extra])
    line = proc.expect("shardmesh-listening")
    return proc, fields(line)["address"]


def wait_serving(address: str, timeout_s: float = START_TIMEOUT_S) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{address} not SERVING within {timeout_s}s")


def describe_all(mesh: UpMesh) -> dict[str, object]:
    """Each worker's Describe reply (capacity counts tell what state a worker still holds)."""
    import grpc

    from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc

    replies: dict[str, object] = {}
    for name, info in mesh.workers.items():
        with grpc.insecure_channel(info["address"]) as channel:
            replies[name] = worker_pb2_grpc.ShardWorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=5)
    return replies


def worker_channel(mesh: UpMesh, name: str):  # type: ignore[no-untyped-def]
    """A blocking channel to one of ``mesh``'s workers whose calls carry the mesh token (a mesh member's)."""
    import collections

    import grpc

    class _Details(
        collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails,
    ):
        pass

    class _AddMetadata(
        grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
    ):
        def _details(self, d):  # type: ignore[no-untyped-def]
            metadata = (*(d.metadata or ()), *mesh.mesh_metadata)
            return _Details(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

        def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
            return continuation(self._details(details), request)

        intercept_unary_stream = intercept_unary_unary

        def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
            return continuation(self._details(details), request_iterator)

        intercept_stream_stream = intercept_stream_unary

    return grpc.intercept_channel(grpc.insecure_channel(mesh.workers[name]["address"]), _AddMetadata())


def retry_until(probe, timeout_s: float = 60.0):  # type: ignore[no-untyped-def]
    """Calls ``probe`` until it returns without raising (start-up takes a few seconds); re-raises at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return probe()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
