"""Runs a scenario's faults on schedule against a running local mesh and records each as ``info`` events.

Process faults signal the worker process; ``error`` rewrites the worker's ``--fault-injection`` control
file; network faults add a rule to the worker's :class:`FaultProxy`; Consul faults use the emulator's
controls or the agent's HTTP API (``deregister``, and ``consul-forget`` when the emulator has no
``forget`` control: deregistering every service is what an agent restarted without its data shows).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.chaos.faults import child_of, restart
from services.chaos.history import Event, History
from services.chaos.proxy import FaultProxy, Rule
from services.chaos.scenario import FaultPlan
from services.localmesh.launcher import LocalMesh

log = logging.getLogger(__name__)

RECOVERY_POLL_S = 0.2
RECOVERY_LIMIT_S = 30.0


@dataclass
class FaultTargets:
    mesh: LocalMesh
    history: History
    proxies: dict[str, FaultProxy] = field(default_factory=dict)
    control_files: dict[str, Path] = field(default_factory=dict)
    consul_http: str = ""  # host:port of the agent's HTTP API
    emulator: Any = None  # tests.consul_emulator.process.EmulatorControl, when the emulator runs
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # per fault label: measurements


async def run_fault(t: FaultTargets, fault: FaultPlan, load_start: float) -> None:
    """Waits until ``fault.at_s`` after the load started, injects, holds for the window, heals."""
    await asyncio.sleep(max(0.0, load_start + fault.at_s - time.monotonic()))
    h = t.history
    h.add(Event("info", h.now(), "fault", fault.label, status="start", extra={"kind": fault.kind, "target": list(fault.target)}))
    result: dict[str, Any] = {}
    try:
        await _inject(t, fault, result)
    except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported, not hidden
        log.exception("fault %s failed", fault.label)
        result["error"] = f"{type(exc).__name__}: {exc}"
    t.results[fault.label] = result
    h.add(Event("info", h.now(), "fault", fault.label, status="end", extra=result))


async def _sockets_closed_ms(pid: int, since: float, limit_s: float = 10.0) -> float | None:
    """Milliseconds from ``since`` until a SIGKILLed process's sockets are closed, or None if unknown.

    The kernel closes a dying process's files only after it has freed its address space (``do_exit``:
    ``exit_mm`` before ``exit_files``); until then a peer sees no FIN or RST and cannot tell that it died.
    For a worker's ~450 MiB on a loaded 2-core VM that took 280-1000 ms (8-80 ms for a bare process), so
    a kill's extra latency is this host share plus the mesh's own failover. Threads other than the group
    leader vanish from ``/proc/PID/task`` once they have exited; the files are closed when only the leader,
    a zombie, is left (or the process is gone).
    """
    task_dir = Path(f"/proc/{pid}/task")
    deadline = since + limit_s
    while time.monotonic() < deadline:
        try:
            states = [(task_dir / tid / "stat").read_text().rsplit(")", 1)[1].split()[0] for tid in os.listdir(task_dir)]
        except FileNotFoundError:  # reaped (done), or a thread vanished while listing (look again)
            states = ["?"] if task_dir.exists() else []
        except OSError:
            return None
        if all(state in ("Z", "X") for state in states):
            return round(1000 * (time.monotonic() - since), 1)
        await asyncio.sleep(0.002)
    return None


async def _inject(t: FaultTargets, fault: FaultPlan, result: dict[str, Any]) -> None:
    kind, p = fault.kind, fault.params
    if kind == "kill":
        child = child_of(t.mesh, fault.worker)
        killed = time.monotonic()
        child.send(signal.SIGKILL)
        exit_ms = await _sockets_closed_ms(child.pid, killed)
        if exit_ms is not None:
            result["exit_ms"] = exit_ms
    elif kind == "hang":
        child = child_of(t.mesh, fault.worker)
        child.send(signal.SIGSTOP)
        try:
            await asyncio.sleep(fault.duration_s)
        finally:
            child.send(signal.SIGCONT)
    elif kind == "restart":
        started = time.monotonic()
        await restart(t.mesh, fault.worker, hard=p["signal"] == "KILL")
        result["back_serving_s"] = round(time.monotonic() - started, 3)
    elif kind == "slow":
        await _slow(t, fault)
    elif kind == "error":
        path = t.control_files[fault.worker]
        path.write_text(json.dumps({"abort": {"code": p["code"], "percent": p["percent"]}}))
        try:
            await asyncio.sleep(fault.duration_s)
        finally:
            path.write_text("")
    elif kind in ("delay", "bandwidth", "blackhole", "partition", "reset"):
        proxy = t.proxies[fault.worker]
        rule = proxy.add(Rule(kind, source=fault.target[0] if len(fault.target) == 2 else None,
                              direction=p.get("direction", "both"), delay_ms=p.get("delay_ms", 0.0),
                              jitter_ms=p.get("jitter_ms", 0.0), kbps=p.get("kbps", 0.0)))
        try:
            await asyncio.sleep(fault.duration_s)
        finally:
            proxy.remove(rule)
        result["proxy"] = dict(proxy.stats)
    elif kind == "flap":
        proxy = t.proxies[fault.worker]
        source = fault.target[0] if len(fault.target) == 2 else None
        await _cycle(fault, p["period_ms"], p["down_share"],
                     lambda: proxy.add(Rule("partition", source=source)), proxy.remove)
    elif kind == "consul-down":
        await _emulator(t, "pause", mode=p["mode"])
        try:
            await asyncio.sleep(fault.duration_s)
        finally:
            await _emulator(t, "resume")
    elif kind == "consul-flap":
        async def down() -> None:
            await _emulator(t, "pause", mode=p["mode"])
        await _cycle_async(fault, p["period_ms"], p["down_share"], down, lambda: _emulator(t, "resume"))
    elif kind == "consul-forget":
        before = set(await asyncio.to_thread(_agent_services, t.consul_http))
        try:
            await _emulator(t, "forget")
            result["how"] = "emulator forget control"
        except Exception:  # noqa: BLE001 - no such control (older emulator) or a real agent: deregister all
            for service_id in before:
                await asyncio.to_thread(_agent_put, t.consul_http, f"/v1/agent/service/deregister/{service_id}")
            result["how"] = "deregistered every service through the agent API"
        await _await_services(t, before, result)
    elif kind == "deregister":
        await asyncio.to_thread(_agent_put, t.consul_http, f"/v1/agent/service/deregister/{fault.worker}")
        await _await_services(t, {fault.worker}, result)
    else:  # the scenario parser admits only the kinds above
        raise ValueError(f"unknown fault kind {kind!r}")


async def _slow(t: FaultTargets, fault: FaultPlan) -> None:
    child = child_of(t.mesh, fault.worker)
    period = fault.params["period_ms"] / 1000
    stopped = period * fault.params["stopped_share"]
    end = time.monotonic() + fault.duration_s
    try:
        while time.monotonic() < end:
            child.send(signal.SIGSTOP)
            await asyncio.sleep(stopped)
            child.send(signal.SIGCONT)
            await asyncio.sleep(period - stopped)
    finally:
        child.send(signal.SIGCONT)


async def _cycle(fault: FaultPlan, period_ms: float, down_share: float, down: Any, up: Any) -> None:
    end = time.monotonic() + fault.duration_s
    period = period_ms / 1000
    while time.monotonic() < end:
        token = down()
        try:
            await asyncio.sleep(period * down_share)
        finally:
            up(token)
        await asyncio.sleep(period * (1 - down_share))


async def _cycle_async(fault: FaultPlan, period_ms: float, down_share: float, down: Any, up: Any) -> None:
    end = time.monotonic() + fault.duration_s
    period = period_ms / 1000
    while time.monotonic() < end:
        await down()
        try:
            await asyncio.sleep(period * down_share)
        finally:
            await up()
        await asyncio.sleep(period * (1 - down_share))


async def _emulator(t: FaultTargets, control: str, **params: Any) -> None:
    if t.emulator is None:
        raise RuntimeError(f"the {control} control needs the Consul emulator (mesh.consul: emulator)")
    await asyncio.to_thread(t.emulator._call, "POST", control, **params)


async def _await_services(t: FaultTargets, wanted: set[str], result: dict[str, Any]) -> None:
    """Measures how long until every service in ``wanted`` is registered with the agent again."""
    started = time.monotonic()
    await asyncio.sleep(RECOVERY_POLL_S)
    while time.monotonic() - started < RECOVERY_LIMIT_S:
        try:
            present = set(await asyncio.to_thread(_agent_services, t.consul_http))
        except OSError:
            present = set()
        if wanted <= present:
            result["recovered_s"] = round(time.monotonic() - started, 3)
            return
        await asyncio.sleep(RECOVERY_POLL_S)
    result["recovered_s"] = None
    result["missing"] = sorted(wanted - present)


def _agent_services(http: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{http}/v1/agent/services", timeout=5) as response:
        return dict(json.loads(response.read() or b"{}"))


def _agent_put(http: str, path: str) -> None:
    request = urllib.request.Request(f"http://{http}{path}", method="PUT", data=b"")
    with urllib.request.urlopen(request, timeout=5):
        pass
