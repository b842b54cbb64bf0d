"""A real shard worker process with one injected fault, for router failover tests.

``python -m tests.fault_worker FAULT worker --model ... --layers ...`` runs ``shardmesh worker`` after
patching one spot, so the worker answers through its real gRPC handlers with the real status codes:

- ``internal``: every stateless forward raises inside the stage -> INTERNAL (a broken replica).
- ``lose-session:N``: the N-th session step after the prompt finds every session gone, as after a
  restart at the same address -> NOT_FOUND.
- ``shift-position:N``: the N-th session step after the prompt finds its cache one token ahead -> the
  worker's position refusal (FAILED_PRECONDITION); the stale session stays open on the live worker.

The chaos harness's ``--fault-injection`` interceptor is the operator-facing tool; this one reaches
states (a lost or shifted cache) that no wire-level fault produces deterministically.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _count_session_steps(fault: str, nth: int) -> None:
    from services.models.kv_cache import SessionCacheStore

    original = SessionCacheStore.prepare_step
    seen = {"steps": 0}

    def prepare_step(self: SessionCacheStore, session_id: str, position: int, *args: Any, **kwargs: Any) -> Any:
        if position > 0:
            seen["steps"] += 1
            if seen["steps"] == nth:
                with self._lock:
                    if fault == "lose-session":
                        self._sessions.clear()
                    elif session_id in self._sessions:
                        self._sessions[session_id].position += 1
        return original(self, session_id, position, *args, **kwargs)

    SessionCacheStore.prepare_step = prepare_step  # type: ignore[method-assign]


def _break_forward() -> None:
    import shard_worker.main as worker_main

    load_stage = worker_main.load_stage

    def broken_load(*args: Any, **kwargs: Any) -> Any:
        stage = load_stage(*args, **kwargs)

        def forward(*_: Any, **__: Any) -> Any:
            raise RuntimeError("injected fault: this replica is broken")

        stage.forward = forward
        return stage

    worker_main.load_stage = broken_load  # type: ignore[assignment]


def start_fault_worker(fault: str, model: str, layers: str, *extra: str) -> tuple[Any, str]:
    """Starts ``shardmesh worker`` with ``fault`` on a free loopback port (a tests.procs.Proc); returns it and its address."""
    from tests.procs import Proc, fields

    argv = [sys.executable, "-m", "tests.fault_worker", fault, "worker", "--model", model, "--layers", layers]
    proc = Proc([*argv, "--listen", "127.0.0.1:0", *extra])
    return proc, fields(proc.expect("shardmesh-listening"))["address"]


def main(argv: list[str]) -> int:
    fault, rest = argv[0], argv[1:]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `shardmesh worker` does, before torch loads
    kind, _, nth = fault.partition(":")
    if kind == "internal":
        _break_forward()
    elif kind in ("lose-session", "shift-position"):
        _count_session_steps(kind, int(nth))
    else:
        raise SystemExit(f"unknown fault {fault!r}: internal, lose-session:N or shift-position:N")
    from services.cli.main import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
