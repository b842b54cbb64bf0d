"""Runs a workload through a local mesh (router + one worker process per stage) in direct and relay mode.

The mesh is started once per workload and measured mode by mode, level by level, through one
:class:`AsyncRouterClient`; latency is the client's wall time around ``infer`` (encode, router,
every hop, decode). Hop records come from the router's reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from services.bench.load import closed_loop_async
from services.bench.records import (
    SYSTEM_MESH_DIRECT,
    SYSTEM_MESH_RELAY,
    HopSample,
    Outcome,
    RequestSample,
    WireSizes,
)
from services.bench.stats import relay_links
from services.bench.workloads import BenchPlan, Workload
from services.client import AsyncRouterClient, InferResult
from services.errors import FailedPrecondition
from services.layers import LayerSpan
from services.localmesh.launcher import LocalMesh
from services.localmesh.spec import MeshSpec, WorkerSpec

Progress = Callable[[str], None]
RELAY_UNAVAILABLE = "relay mode not available"
MODES = (("direct", SYSTEM_MESH_DIRECT), ("relay", SYSTEM_MESH_RELAY))


def mesh_spec(workload: Workload, worker_threads: int) -> MeshSpec:
    """Loopback-only mesh; hop and request deadlines sized for the workload's queueing at high concurrency."""
    timeout_ms = int(workload.request_timeout_s * 1000)
    return MeshSpec(
        model=workload.model,
        router_listen="127.0.0.1:0",
        workers=tuple(
            WorkerSpec(f"bench-w{i}", LayerSpan.parse(span), "127.0.0.1:0") for i, span in enumerate(workload.split)
        ),
        worker_args=("--threads", str(worker_threads), "--log-level", "warning"),
        router_args=(
            "--hop-timeout-ms", str(timeout_ms),
            "--request-timeout-s", str(workload.request_timeout_s),
            "--max-attempts", "1",  # a retried hop would time two hops as one: report failures instead
            "--log-level", "warning",
        ),
    )  # fmt: skip


def hop_samples(result: InferResult, sizes: WireSizes, *, relay: bool) -> tuple[HopSample, ...]:
    stages = len(result.hops)
    hops = tuple(
        HopSample(h.hop_ms, h.compute_ms, h.queue_ms, sizes.hop_bytes(i, stages, relay=relay))
        for i, h in enumerate(result.hops)
    )
    return relay_links(hops) if relay else hops


async def run_mesh(
    workload: Workload,
    plan: BenchPlan,
    ids: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor,
    sizes: WireSizes,
    progress: Progress,
) -> list[Outcome]:
    """Measures mesh-direct and mesh-relay at every concurrency level; the mesh is always stopped."""
    mesh = LocalMesh(mesh_spec(workload, plan.worker_threads))
    outcomes: list[Outcome] = []
    try:
        progress(f"mesh: starting router + {len(workload.split)} workers ({', '.join(workload.split)})")
        address = await mesh.start(plan.start_timeout_s)
        async with AsyncRouterClient(address) as client:
            await client.wait_ready(plan.start_timeout_s)
            for mode, system in MODES:
                outcomes += await _run_mode(client, mode, system, workload, plan, ids, mask, reference, sizes, progress)
    finally:
        codes = await mesh.stop()
        progress(f"mesh: stopped (exit codes {codes})")
    return outcomes


async def _run_mode(
    client: AsyncRouterClient,
    mode: str,
    system: str,
    workload: Workload,
    plan: BenchPlan,
    ids: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor,
    sizes: WireSizes,
    progress: Progress,
) -> list[Outcome]:
    threads = plan.worker_threads
    first: list[bool] = []

    async def call(_: int) -> RequestSample:
        t0 = time.perf_counter()
        result = await client.infer(tensor=ids, attention_mask=mask, mode=mode, timeout_s=workload.request_timeout_s)
        latency_ms = 1000 * (time.perf_counter() - t0)
        if not first:
            first.append(torch.equal(result.output.reshape(reference.shape), reference))
        return RequestSample(latency_ms, hop_samples(result, sizes, relay=mode == "relay"))

    try:
        for _ in range(workload.warmup):
            await call(-1)
    except FailedPrecondition as exc:
        # The router refuses a mode it does not implement (yet): a row that says so, not a failed run.
        error = f"{RELAY_UNAVAILABLE}: {exc.message}" if mode == "relay" else f"FAILED_PRECONDITION: {exc.message}"
        progress(f"{system}: {error}")
        return [Outcome(system, c, None, threads, error=error) for c in plan.concurrency]
    outcomes = []
    for level in plan.concurrency:
        requests = workload.requests_at(level)
        progress(f"{system}: {requests} requests at concurrency {level}")
        first.clear()
        measurement = await closed_loop_async(
            call,
            requests=requests,
            concurrency=level,
            timeout_s=workload.request_timeout_s * (requests / level + 1),
            matches=lambda: first[0] if first else None,
        )
        outcomes.append(Outcome(system, level, measurement, threads))
    return outcomes
