"""Faults injected into a LocalMesh's worker processes: kill, hang (SIGSTOP), restart."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

from services.localmesh.launcher import Child, LocalMesh


@dataclass(frozen=True)
class FaultRecord:
    kind: str
    worker: str
    at: float  # time.monotonic() when injected
    recovered_at: float | None = None


async def inject(mesh: LocalMesh, kind: str, worker_name: str) -> FaultRecord:
    """``kill``: SIGKILL. ``hang``: SIGSTOP (the socket stays open, nothing answers; SIGCONT at stop).
    ``restart``: SIGTERM, wait for exit, start the same worker again (it re-registers itself)."""
    child = child_of(mesh, worker_name)
    at = time.monotonic()
    if kind == "kill":
        child.send(signal.SIGKILL)
        return FaultRecord(kind, worker_name, at)
    if kind == "hang":
        child.send(signal.SIGSTOP)
        return FaultRecord(kind, worker_name, at)
    if kind == "restart":
        await restart(mesh, worker_name)
        return FaultRecord(kind, worker_name, at, time.monotonic())
    raise ValueError(f"unknown fault {kind!r}: expected kill, hang or restart")


async def restart(mesh: LocalMesh, worker_name: str, *, hard: bool = False) -> None:
    """Stops a worker (SIGTERM and its drain, or SIGKILL when ``hard``) and starts it again from its spec: a
    worker spec with a fixed listen port comes back at the same address."""
    child = child_of(mesh, worker_name)
    if hard:
        child.send(signal.SIGKILL)
    await child.stop()
    spec = next(w for w in mesh.spec.workers if w.name == worker_name)
    mesh.workers.remove(child)
    await mesh.start_worker(spec)


def child_of(mesh: LocalMesh, name: str) -> Child:
    for child in mesh.workers:
        if child.name == name:
            return child
    raise KeyError(f"no worker named {name!r} in the mesh (have: {[c.name for c in mesh.workers]})")


async def resume_all(mesh: LocalMesh) -> None:
    for child in mesh.workers:
        child.send(signal.SIGCONT)
    await asyncio.sleep(0)
