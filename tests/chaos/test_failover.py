"""Chaos under steady load: with 2 replicas per stage, killing, hanging or restarting a worker loses no
request, and every output stays bit-identical to the single-process model (direct and relay)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import torch

from services.chaos.checker import check_history
from services.chaos.faults import inject, resume_all
from services.chaos.load import LoadGenerator
from services.client import AsyncRouterClient
from services.errors import Unavailable
from services.localmesh.launcher import LocalMesh
from services.localmesh.spec import parse_spec
from services.chaos.references import TEXTS
from services.models.registry import resolve_model

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.consul, pytest.mark.slow]

ROUTER_ARGS = ["--hop-timeout-ms", "1000", "--eject-after-failures", "2", "--eject-base-s", "5"]


@pytest.fixture(scope="module")
def references() -> dict[str, torch.Tensor]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")
    return {t: model.encode(t, convert_to_tensor=True) for t in TEXTS}


async def _mesh(consul_addr: str, service: str, mode: str, *extra_router_args: str) -> LocalMesh:
    spec = parse_spec(
        {
            "model": "minilm",
            "mode": mode,
            "discovery": "consul",
            "consul": {"address": consul_addr, "service": service},
            "workers": [{"layers": "0:3", "replicas": 2}, {"layers": "3:6", "replicas": 2}],
            "router_args": [*ROUTER_ARGS, *extra_router_args],
            "worker_args": ["--threads", "1"],
        }
    )
    mesh = LocalMesh(spec)
    await mesh.start()
    async with AsyncRouterClient(mesh.router_address) as client:  # the router saw all four workers
        for _ in range(200):
            if len((await client.topology()).workers) == 4:
                break
            await asyncio.sleep(0.1)
    return mesh


@pytest.fixture
async def mesh_factory(consul_addr: str, consul_service_name: str) -> AsyncIterator[object]:
    meshes: list[LocalMesh] = []

    async def make(mode: str, *extra_router_args: str) -> LocalMesh:
        mesh = await _mesh(consul_addr, consul_service_name, mode, *extra_router_args)
        meshes.append(mesh)
        return mesh

    yield make
    for mesh in meshes:
        await resume_all(mesh)
        await mesh.stop()


@pytest.mark.parametrize("mode", ["direct", "relay"])
@pytest.mark.parametrize("fault", ["kill", "hang", "restart"])
async def test_no_request_lost(mesh_factory, references, mode: str, fault: str) -> None:  # type: ignore[no-untyped-def]
    mesh = await mesh_factory(mode)
    load = LoadGenerator(mesh.router_address, TEXTS, clients=4, requests_per_client=25, mode=mode)
    running = asyncio.create_task(load.run())
    await load.wait_completed(20, timeout_s=120)
    victim = "w1r0" if mode == "relay" else "w0r0"  # relay: the downstream hop, so the upstream worker must reroute
    record = await inject(mesh, fault, victim)
    history = await asyncio.wait_for(running, 300)
    verdict = check_history(history, references, fault_at=record.at, faulty_workers=frozenset({victim}))
    assert verdict.ok, verdict.problems
    assert verdict.requests == 100
    # The fault must have hit the load: requests in flight at the moment of injection ...
    in_flight = [op for op in history if op.started <= record.at <= op.finished]
    assert in_flight, "no request was in flight when the fault was injected: nothing was tested"
    # ... and the claimed failover must have happened.
    failed_over = [op for op in history if op.attempts > 1]
    window_end = record.recovered_at if record.recovered_at is not None else record.at + 2.0
    in_window = [op for op in history if record.at <= op.started <= window_end]
    if fault in ("kill", "hang"):
        # A dead or stopped replica answers nothing: whatever the router sent it next had to be retried elsewhere.
        assert failed_over, f"no request needed a failover after {fault} of {victim}"
    else:
        # A restart drains first, so a retry is not required; but requests must have been sent while the victim
        # was away, and served by its twin (checked lost-free above).
        assert in_window, "no request was sent while the worker restarted"
        assert failed_over or any(victim not in op.route for op in in_window), [op.route for op in in_window]
    if fault in ("kill", "hang"):
        # The dead or hung instance leaves the routing table (Consul's check, or ejection by the router).
        async with AsyncRouterClient(mesh.router_address) as client:
            deadline = time.monotonic() + 30
            while True:
                view = await client.topology()
                gone = all(w.worker_id != victim or not w.healthy for w in view.workers)
                if gone or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert gone, [(w.worker_id, w.healthy) for w in view.workers]


async def test_layer_range_without_replicas_is_unavailable_then_recovers(mesh_factory, references) -> None:  # type: ignore[no-untyped-def]
    mesh = await mesh_factory("direct", "--route-wait-s", "0")  # no wait for coverage: the fast failure is tested
    await inject(mesh, "kill", "w1r0")
    await inject(mesh, "kill", "w1r1")
    async with AsyncRouterClient(mesh.router_address) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            for _ in range(3):
                await client.infer(text=TEXTS[0], timeout_s=10)
        assert time.monotonic() - started < 10, "no-replica failure must be fast, not a hang"
        assert "3:6" in str(info.value)
        spec = next(w for w in mesh.spec.workers if w.name == "w1r0")
        await mesh.start_worker(spec)
        deadline = time.monotonic() + 60
        while True:
            try:
                result = await client.infer(text=TEXTS[0], timeout_s=10)
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert torch.equal(result.output.reshape(references[TEXTS[0]].shape), references[TEXTS[0]])


async def test_consul_outage_keeps_serving_then_catches_up(mesh_factory, references, consul_emulator) -> None:  # type: ignore[no-untyped-def]
    mesh = await mesh_factory("direct")
    load = LoadGenerator(mesh.router_address, TEXTS, clients=2, requests_per_client=30)
    running = asyncio.create_task(load.run())
    await load.wait_completed(10, timeout_s=120)
    consul_emulator.pause("refuse")
    await asyncio.sleep(2.0)
    await inject(mesh, "restart", "w0r1")  # the table changes while Consul is away (re-registration retries)
    consul_emulator.resume()
    history = await asyncio.wait_for(running, 300)
    verdict = check_history(history, references)
    assert verdict.ok, verdict.problems
    async with AsyncRouterClient(mesh.router_address) as client:
        deadline = time.monotonic() + 30
        while True:
            view = await client.topology()
            if view.complete and len(view.workers) == 4 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert view.complete and len(view.workers) == 4
