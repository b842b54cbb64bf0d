"""Starting the emulator as a child process, and a small synchronous client for its controls.

A subprocess keeps the emulator's event loop, gRPC probes and sockets apart from the test's loop, and
a stopped or killed emulator looks to clients exactly like a Consul agent that went away.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.consul_emulator.server import READY_PREFIX

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Reap 1 s after a check turns critical, probe every 0.1 s: real Consul floors are 1 m, 30 s and 1 s.
FAST_TEST_ARGS = ("--reap-interval", "0.1", "--min-deregister-after", "0", "--min-check-interval", "0.1")


@dataclass(frozen=True)
class EmulatorControl:
    """Addresses of a running emulator and its ``/_emulator/`` controls (blocking calls, for tests)."""

    http: str  # host:port of the Consul HTTP API
    control: str  # host:port of the control listener, which stays up while the API is paused
    pid: int = 0

    def _call(self, method: str, path: str, **params: object) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"http://{self.control}/_emulator/{path}" + (f"?{query}" if query else "")
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"emulator control {path} failed: {exc.code} {exc.read().decode()}") from None

    def pause(self, mode: str = "refuse") -> None:
        """``refuse``: connection refused; ``error``: 500 No cluster leader; ``hang``: never answers."""
        self._call("POST", "pause", mode=mode)

    def resume(self) -> None:
        self._call("POST", "resume")

    def restore(self, index: int = 1) -> int:
        """Moves the raft index back to ``index``, as a snapshot restore does; returns the new index."""
        return int(self._call("POST", "restore", index=index)["index"])

    def touch(self, service: str) -> int:
        """Takes a new index for ``service`` without changing it; returns that index."""
        return int(self._call("POST", "touch", service=service)["index"])

    def forget(self) -> list[str]:
        """The agent restarts without its data: every service and check is gone; returns the service IDs."""
        return list(self._call("POST", "forget")["forgotten"])

    def mode(self, *, blocking: str | None = None, strip_index: bool | None = None) -> dict[str, Any]:
        """Sets the blocking backend (``streaming``/``rpc``) and whether X-Consul-Index is stripped."""
        return dict(self._call("POST", "mode", blocking=blocking,
                               strip_index=None if strip_index is None else str(strip_index).lower()))

    def state(self) -> dict[str, Any]:
        return dict(self._call("GET", "state"))


def _read_ready_line(proc: subprocess.Popen[str], log: Any, timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=0.1):
                line = proc.stdout.readline()
                if line.startswith(READY_PREFIX):
                    return line.strip()
                if not line:
                    break  # EOF: it exited
    log.seek(0)
    raise AssertionError(f"consul emulator did not start (exit code {proc.poll()}):\n{log.read()[-3000:]}")


@contextmanager
def run_emulator(*args: str, timeout_s: float = 30.0) -> Iterator[EmulatorControl]:
    """Starts ``python -m tests.consul_emulator --port 0 ARGS``; always stops it (TERM, then KILL, then wait)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.consul_emulator", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, cwd=_REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            info = dict(part.split("=", 1) for part in _read_ready_line(proc, log, timeout_s).split()[1:])
            yield EmulatorControl(http=info["http"], control=info["control"], pid=int(info["pid"]))
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()
