"""The peer system: the same split run as a pipeline over torch.distributed.rpc (TensorPipe).

One rpc process per stage plus a driver process, all started with ``torch.multiprocessing`` spawn
(never fork: the bench process holds gRPC and torch thread pools). Each stage module is built on its
owner with :func:`services.models.registry.load_stage` and held behind an RRef; the driver sends the
activation to stage 1, gets it back, sends it to stage 2, and so on: the same topology as mesh direct.
A stage runs one forward at a time (a lock, like a shard worker's single compute thread) and returns
its compute and queue times with the output, so per-hop overhead means the same thing as for the mesh.

Loopback only: rendezvous through a file (``file://`` FileStore: torch's TCPStore would listen on every
interface) and ``TP_SOCKET_IFNAME=lo`` for TensorPipe's socket transport, so every listener is 127.0.0.1.

Two variants (:data:`RPC_VARIANTS`), because the choice matters on a small machine: TensorPipe's default
shared-memory transport works here and moves 8 MB fastest (echo 2.5-3.9 ms vs 5-7 ms), but its reactor
busy-polls (an idle agent burns about half a core), which on 2 cores starves the stages' compute;
``uv`` (loopback TCP, epoll) with the ``cma`` channel (process_vm_readv for payloads) does not.
The driver is a child too, because an rpc agent cannot be re-initialised reliably within one process and
the bench runs several workloads; every child is joined with a deadline and killed if it overstays.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed import rpc

from services.bench.load import closed_loop_threads
from services.bench.procs import run_spawned
from services.bench.records import (
    SYSTEM_TORCH_RPC,
    SYSTEM_TORCH_RPC_SHM,
    HopSample,
    Measurement,
    Outcome,
    RequestSample,
)
from services.bench.workloads import BenchPlan, Workload

Progress = Callable[[str], None]
DRIVER = "driver"


@dataclass(frozen=True)
class RpcVariant:
    system: str
    transports: tuple[str, ...] | None  # None = TensorPipe's defaults
    channels: tuple[str, ...] | None

    def describe(self) -> str:
        return f"transports={list(self.transports or ['default: shm, uv'])} channels={list(self.channels or ['default'])}"


RPC_UV = RpcVariant(SYSTEM_TORCH_RPC, ("uv",), ("cma", "basic"))
RPC_SHM = RpcVariant(SYSTEM_TORCH_RPC_SHM, None, None)
RPC_VARIANTS = {v.system: v for v in (RPC_UV, RPC_SHM)}
SHUTDOWN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RpcJob:
    """Everything the rpc processes need, pickled into each spawned child."""

    model: str
    split: tuple[str, ...]
    ids: torch.Tensor
    mask: torch.Tensor
    reference: torch.Tensor
    warmup: int
    levels: tuple[tuple[int, int], ...]  # (concurrency, requests)
    request_timeout_s: float
    start_timeout_s: float
    threads: int
    rendezvous_path: str  # a FileStore: rendezvous without a TCP listener (torch's TCPStore binds every interface)
    result_path: str
    variant: RpcVariant

    @property
    def budget_s(self) -> float:
        rounds = self.warmup + sum(requests / concurrency + 1 for concurrency, requests in self.levels)
        return self.start_timeout_s + rounds * self.request_timeout_s + 2 * SHUTDOWN_TIMEOUT_S


class StageHost:
    """One stage, living on its rpc owner; forwards run one at a time, timed without the lock wait."""

    def __init__(self, model: str, span: str) -> None:
        from services.layers import LayerSpan
        from services.models.registry import load_stage, resolve_model

        self.stage = load_stage(resolve_model(model), LayerSpan.parse(span))
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        enqueued = time.perf_counter()
        with self._lock:
            started = time.perf_counter()
            with torch.inference_mode():
                out = self.stage.forward(x, mask)
            finished = time.perf_counter()
        if out.untyped_storage().nbytes() != out.nbytes or not out.is_contiguous():
            out = out.contiguous().clone()  # rpc would send a view's whole storage
        return out, 1000 * (finished - started), 1000 * (started - enqueued)


def _ready(host: rpc.RRef[StageHost]) -> bool:
    return host.local_value() is not None


def _forward(host: rpc.RRef[StageHost], x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    return host.local_value().forward(x, mask)


def _rank_main(rank: int, job: RpcJob) -> None:
    """Entry point of every spawned process: rank 0 drives, ranks 1..N hold one stage each."""
    os.environ.update(MASTER_ADDR="127.0.0.1", TP_SOCKET_IFNAME="lo", GLOO_SOCKET_IFNAME="lo")
    warnings.filterwarnings("ignore", message=".*ProcessGroupGloo.*")
    torch.set_num_threads(1 if rank == 0 else job.threads)
    max_concurrency = max((c for c, _ in job.levels), default=1)
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=max(16, 4 * max_concurrency),
        rpc_timeout=job.request_timeout_s,
        init_method=f"file://{job.rendezvous_path}",
        _transports=list(job.variant.transports) if job.variant.transports else None,
        _channels=list(job.variant.channels) if job.variant.channels else None,
    )
    name = DRIVER if rank == 0 else f"stage{rank - 1}"
    rpc.init_rpc(name, rank=rank, world_size=len(job.split) + 1, rpc_backend_options=options)
    try:
        if rank == 0:
            _drive(job)
    finally:
        # Graceful: stages wait here until the driver is done, bounded by the run's budget.
        rpc.shutdown(graceful=True, timeout=SHUTDOWN_TIMEOUT_S if rank == 0 else job.budget_s)


def _drive(job: RpcJob) -> None:
    owners = [f"stage{i}" for i in range(len(job.split))]
    hosts = [rpc.remote(owner, StageHost, args=(job.model, span), timeout=job.start_timeout_s) for owner, span in zip(owners, job.split)]
    for owner, host in zip(owners, hosts):
        rpc.rpc_sync(owner, _ready, args=(host,), timeout=job.start_timeout_s)
    first: list[bool] = []

    def call(_: int) -> RequestSample:
        x = job.ids
        hops = []
        started = time.perf_counter()
        for owner, host in zip(owners, hosts):
            sent = time.perf_counter()
            out, compute_ms, queue_ms = rpc.rpc_sync(owner, _forward, args=(host, x, job.mask), timeout=job.request_timeout_s)
            hop_ms = 1000 * (time.perf_counter() - sent)
            hops.append(HopSample(hop_ms, compute_ms, queue_ms, x.nbytes + job.mask.nbytes + out.nbytes))
            x = out
        latency_ms = 1000 * (time.perf_counter() - started)
        if not first:
            first.append(torch.equal(x.reshape(job.reference.shape), job.reference))
        return RequestSample(latency_ms, tuple(hops))

    for _ in range(job.warmup):
        call(-1)
    runs = []
    for concurrency, requests in job.levels:
        first.clear()
        m = closed_loop_threads(
            call,
            requests=requests,
            concurrency=concurrency,
            timeout_s=job.request_timeout_s * (requests / concurrency + 1),
            matches=lambda: first[0] if first else None,
            bench_pid=os.getppid(),
        )
        runs.append(_to_json(m))
    Path(job.result_path).write_text(json.dumps({"runs": runs}))


def _to_json(m: Measurement) -> dict[str, Any]:
    return {
        "concurrency": m.concurrency,
        "wall_s": m.wall_s,
        "failures": m.failures,
        "first_failure": m.first_failure,
        "matches_single": m.matches_single,
        "background_cores": m.background_cores,
        "samples": [[s.latency_ms, [[h.hop_ms, h.compute_ms, h.queue_ms, h.bytes_moved] for h in s.hops]] for s in m.samples],
    }


def _from_json(run: dict[str, Any]) -> Measurement:
    samples = tuple(RequestSample(lat, tuple(HopSample(*h) for h in hops)) for lat, hops in run["samples"])
    return Measurement(
        samples, run["wall_s"], run["concurrency"], run["failures"], run["first_failure"], run["matches_single"],
        run["background_cores"],
    )  # fmt: skip


def run_torch_rpc(
    workload: Workload,
    plan: BenchPlan,
    ids: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor,
    progress: Progress,
    variant: RpcVariant = RPC_UV,
) -> list[Outcome]:
    """Measures the rpc pipeline at every concurrency level; all its processes are gone on return."""
    levels = tuple((c, workload.requests_at(c)) for c in plan.concurrency)
    with tempfile.TemporaryDirectory(prefix="shardmesh-bench-rpc-") as tmp:
        job = RpcJob(
            model=workload.model, split=workload.split, ids=ids, mask=mask, reference=reference,
            warmup=workload.warmup, levels=levels, request_timeout_s=workload.request_timeout_s,
            start_timeout_s=plan.start_timeout_s, threads=plan.worker_threads,
            rendezvous_path=str(Path(tmp) / "rendezvous"), result_path=str(Path(tmp) / "result.json"),
            variant=variant,
        )  # fmt: skip
        progress(f"{variant.system}: starting driver + {len(workload.split)} stage processes ({variant.describe()})")
        run_spawned(_rank_main, (job,), nprocs=len(job.split) + 1, budget_s=job.budget_s)
        runs = json.loads(Path(job.result_path).read_text())["runs"]
    progress(f"{variant.system}: done")
    return [Outcome(variant.system, run["concurrency"], _from_json(run), plan.worker_threads) for run in runs]
