"""Runs one chaos scenario end to end: Consul (emulator or agent), fault proxies, the local mesh, the
oracle, the load and the faults; then checks the history. Every process and proxy it started is
stopped before it returns, whatever happened.

Layout: every worker listens on a fixed free port (so ``restart`` brings it back at the same address).
A worker that a network fault targets advertises a :class:`FaultProxy` in front of that port, so the
router and, in relay mode, upstream workers reach it only through the proxy. With error faults every
worker runs with ``--fault-injection`` and its own (initially empty) control file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.chaos.driver import LoadDriver, OpPlan
from services.chaos.history import History
from services.chaos.history_checker import check
from services.chaos.injector import FaultTargets, run_fault
from services.chaos.proxy import FaultProxy
from services.chaos.references import build_oracle
from services.chaos.scenario import Scenario
from services.client import AsyncRouterClient
from services.errors import ConfigError
from services.localmesh.launcher import LocalMesh
from services.localmesh.spec import MeshSpec, parse_spec

log = logging.getLogger(__name__)

TOPOLOGY_WAIT_S = 60.0
STOP_LIMIT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def consul_backend(scenario: Scenario) -> Iterator[tuple[str, Any]]:
    """(agent host:port, emulator control or None). The emulator lives in tests/ (a repo checkout)."""
    if scenario.mesh.discovery != "consul":
        yield "", None
        return
    if scenario.mesh.consul == "agent":
        addr = os.environ.get("CONSUL_HTTP_ADDR", "")
        if not addr:
            raise ConfigError(f"{scenario.name}: mesh.consul: agent needs CONSUL_HTTP_ADDR set to the agent's HOST:PORT")
        yield addr.split("://")[-1], None
        return
    try:
        from tests.consul_emulator.process import FAST_TEST_ARGS, run_emulator
    except ImportError:
        raise ConfigError("mesh.consul: emulator needs the repository's tests/consul_emulator (run from a checkout) "
                          "or use mesh.consul: agent with CONSUL_HTTP_ADDR") from None
    with run_emulator(*FAST_TEST_ARGS) as control:
        yield control.http, control


def mesh_spec(scenario: Scenario, consul_http: str, ports: dict[str, int], proxy_ports: dict[str, int],
              control_files: dict[str, Path]) -> MeshSpec:
    m = scenario.mesh
    worker_args = list(m.worker_args)
    if scenario.load.generate_share > 0 and "--no-batching" not in worker_args:
        worker_args.append("--no-batching")  # each decode step alone: bit-exact with one process
    spec = parse_spec({
        "model": m.model, "mode": m.mode, "discovery": m.discovery,
        "consul": {"address": consul_http, "service": f"chaos-{scenario.name}-{os.getpid()}"} if consul_http else {},
        "workers": [{"layers": str(s), "replicas": m.replicas} for s in m.stages],
        "router_args": list(m.router_args), "worker_args": worker_args,
    }, source=scenario.name)
    workers = []
    for w in spec.workers:
        extra: list[str] = []
        if w.name in proxy_ports:
            extra += ["--advertise", f"127.0.0.1:{proxy_ports[w.name]}"]
        if w.name in control_files:
            extra += ["--fault-injection", str(control_files[w.name])]
        workers.append(dataclasses.replace(w, listen=f"127.0.0.1:{ports[w.name]}", args=(*w.args, *extra)))
    return dataclasses.replace(spec, workers=tuple(workers))


async def _wait_topology(router: str, count: int) -> None:
    async with AsyncRouterClient(router) as client:
        deadline = time.monotonic() + TOPOLOGY_WAIT_S
        while True:
            view = await client.topology()
            if view.complete and sum(w.healthy for w in view.workers) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router saw {len(view.workers)} of {count} workers after {TOPOLOGY_WAIT_S:.0f}s")
            await asyncio.sleep(0.2)


async def _warm_up(router: str, scenario: Scenario, oracle: Any) -> None:
    """One request of each kind before the clock starts (first calls pay for connections and caches)."""
    history = History()
    driver = LoadDriver(router, dataclasses.replace(scenario.load, requests=1, clients=1, rate=0), oracle, history)
    key = oracle.keys[0]
    async with AsyncRouterClient(router) as client:
        await driver.run_op(client, OpPlan(0, "infer", key), -1)
        if scenario.load.generate_share > 0:
            await driver.run_op(client, OpPlan(1, "generate", key), -1)


async def run_scenario_async(scenario: Scenario, consul_http: str, emulator: Any, echo: bool = False) -> dict[str, Any]:
    names = scenario.mesh.worker_names()
    ports = {n: free_port() for n in names}
    proxies: dict[str, FaultProxy] = {}
    mesh: LocalMesh | None = None
    result: dict[str, Any] = {"name": scenario.name, "description": scenario.description, "mode": scenario.mesh.mode,
                              "model": scenario.mesh.model}
    with tempfile.TemporaryDirectory(prefix="shardmesh-chaos-") as tmp:
        control_files: dict[str, Path] = {}
        if scenario.needs_fault_injection:
            for n in names:
                control_files[n] = Path(tmp) / f"{n}.faults.json"
                control_files[n].write_text("")

        def pids() -> dict[str, int]:
            known = {c.name: c.pid for c in (mesh.workers if mesh else [])}
            if mesh is not None and mesh.router is not None:
                known["router"] = mesh.router.pid
            return known

        try:
            for n in sorted(scenario.proxied_workers):
                proxies[n] = FaultProxy(("127.0.0.1", ports[n]), pids)
                await proxies[n].start()
            spec = mesh_spec(scenario, consul_http, ports, {n: p.port for n, p in proxies.items()}, control_files)
            mesh = LocalMesh(spec, echo_stderr=echo)
            oracle_task = asyncio.create_task(asyncio.to_thread(
                build_oracle, scenario.mesh.model, generate=scenario.load.generate_share > 0,
                max_new_tokens=scenario.load.max_new_tokens, seed=scenario.load.seed,
                threads=scenario.mesh.threads))
            started = time.monotonic()
            try:
                await mesh.start()
            finally:
                oracle = await oracle_task
            await _wait_topology(mesh.router_address, len(names))
            result["mesh_start_s"] = round(time.monotonic() - started, 1)
            await _warm_up(mesh.router_address, scenario, oracle)

            history = History()
            targets = FaultTargets(mesh, history, proxies, control_files, consul_http, emulator)
            load_start = time.monotonic()
            driver = LoadDriver(mesh.router_address, scenario.load, oracle, history)
            fault_tasks = [asyncio.create_task(run_fault(targets, f, load_start)) for f in scenario.faults]
            sent = await driver.run()
            limit = max([0.0] + [f.at_s + f.duration_s + 120 for f in scenario.faults])  # a restart reloads weights
            _, late = await asyncio.wait(fault_tasks, timeout=max(5.0, limit - (time.monotonic() - load_start))) if fault_tasks else (set(), set())
            for task in late:
                task.cancel()
            result["requests_sent"] = sent
            verdict = check(history.events, oracle, scenario.faults, scenario.expect, scenario.mesh.mode)
            result["verdict"] = verdict.to_json()
            result["fault_results"] = targets.results
            result["events"] = history.events
        except Exception as exc:  # noqa: BLE001 - the run failed: reported as a failed scenario with the reason
            log.exception("scenario %s failed to run", scenario.name)
            result["error"] = f"{type(exc).__name__}: {exc}"
            result.setdefault("verdict", _no_verdict(result["error"]))
            result.setdefault("events", [])
        finally:
            if mesh is not None:
                for child in mesh.workers:
                    child.send(signal.SIGCONT)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(mesh.stop(), STOP_LIMIT_S)
            for proxy in proxies.values():
                await proxy.close()
    return result


def _no_verdict(reason: str) -> dict[str, Any]:
    return {"requests": 0, "ok": 0, "failed_allowed": 0, "lost": 0, "wrong": 0, "exactly_once_violations": 0,
            "faults": [], "problems": [f"the scenario did not run: {reason}"], "baseline_ms": {}, "passed": False}


def run_scenario(scenario: Scenario, echo: bool = False) -> dict[str, Any]:
    with consul_backend(scenario) as (consul_http, emulator):
        return asyncio.run(run_scenario_async(scenario, consul_http, emulator, echo))
