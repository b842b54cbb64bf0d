"""The single-process reference: the whole model as one stage, in one spawned child process.

The forward is the same ``load_stage`` code every worker runs, so the only differences between the
systems are the split and the transport. It runs in a child (spawned like every other process of the
bench, with the same :data:`~services.bench.workloads.CHILD_ENV`) rather than in the bench process
because torch's OpenMP reads its wait policy when a process loads torch: the bench process loaded torch
before the plan existed, and with the default spin-waiting policy 2 threads measured 10-20x slower
than 1 on this shared 2-core machine, which would hand the reference an artificial handicap. Nothing
else runs while it is measured (the mesh and the rpc peer start only afterwards).

Its throughput is the best batch-1 setting: requests back to back, with whichever torch thread count
is fastest here.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.bench import noise
from services.bench.procs import run_spawned
from services.bench.records import Measurement, RequestSample
from services.bench.stats import percentile
from services.bench.workloads import Workload

Progress = Callable[[str], None]
THREAD_PROBES = 3  # timed forwards per candidate thread count when choosing the fastest


@dataclass(frozen=True)
class SingleJob:
    workload: Workload
    ids: torch.Tensor
    mask: torch.Tensor
    thread_candidates: tuple[int, ...]
    result_path: str


def run_single(
    workload: Workload,
    ids: torch.Tensor,
    mask: torch.Tensor,
    thread_candidates: tuple[int, ...],
    start_timeout_s: float,
    progress: Progress,
) -> tuple[Measurement, torch.Tensor, int]:
    """Returns (back-to-back measurement, the reference output, the thread count used)."""
    forwards = workload.warmup + (THREAD_PROBES + 1) * len(thread_candidates) + 1 + workload.requests
    with tempfile.TemporaryDirectory(prefix="shardmesh-bench-single-") as tmp:
        job = SingleJob(workload, ids, mask, thread_candidates, str(Path(tmp) / "single.pt"))
        run_spawned(_single_main, (job,), nprocs=1, budget_s=start_timeout_s + forwards * workload.request_timeout_s)
        result = torch.load(job.result_path, weights_only=True)
    progress(str(result["choice"]))
    samples = tuple(RequestSample(float(ms)) for ms in result["latencies_ms"])
    background = result["background_cores"]
    measurement = Measurement(samples, float(result["wall_s"]), 1, matches_single=True, background_cores=background)
    return measurement, result["reference"], int(result["threads"])


def _single_main(_: int, job: SingleJob) -> None:
    from services.layers import LayerSpan
    from services.models.registry import load_stage, resolve_model

    source = resolve_model(job.workload.model)
    stage = load_stage(source, LayerSpan(0, source.total_layers))
    ids, mask = job.ids, job.mask
    with torch.inference_mode():
        for _ in range(job.workload.warmup):
            stage.forward(ids, mask)
        threads, choice = _fastest_threads(lambda: stage.forward(ids, mask), job.thread_candidates)
        torch.set_num_threads(threads)
        reference = stage.forward(ids, mask).clone()
        latencies = []
        before = noise.snapshot(os.getppid())
        started = time.perf_counter()
        for _ in range(job.workload.requests):
            t0 = time.perf_counter()
            stage.forward(ids, mask)
            latencies.append(1000 * (time.perf_counter() - t0))
        wall_s = time.perf_counter() - started
        background = noise.background_cores(before, noise.snapshot(os.getppid()))
    result = {"latencies_ms": latencies, "wall_s": wall_s, "threads": threads, "choice": choice}
    torch.save({**result, "reference": reference, "background_cores": background}, job.result_path)


def _fastest_threads(forward: Callable[[], object], candidates: tuple[int, ...]) -> tuple[int, str]:
    if len(candidates) == 1:
        return candidates[0], f"single: threads {candidates[0]}"
    medians: dict[int, float] = {}
    for threads in candidates:
        torch.set_num_threads(threads)
        forward()  # the first call after a change pays for the thread pool
        times = []
        for _ in range(THREAD_PROBES):
            t0 = time.perf_counter()
            forward()
            times.append(1000 * (time.perf_counter() - t0))
        medians[threads] = percentile(times, 50)
    best = min(medians, key=lambda t: medians[t])
    return best, "single: threads " + ", ".join(f"{t} -> {ms:.1f} ms" for t, ms in medians.items()) + f"; using {best}"
