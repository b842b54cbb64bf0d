"""The single-process reference: the whole model as one stage, run in this (the bench) process.

In-process rather than in a child: nothing else runs while it is measured (the mesh and the rpc peer
are started only afterwards), there is no IPC to exclude, and the forward is the same
``load_stage`` code every worker runs, so the only difference between the systems is the split and
the transport. Its throughput is the best batch-1 setting: requests back to back, with whichever
torch thread count is fastest here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from services.bench.records import Measurement, RequestSample
from services.bench.stats import percentile
from services.bench.workloads import Workload
from services.layers import LayerSpan
from services.models.registry import load_stage, resolve_model

Progress = Callable[[str], None]
THREAD_PROBES = 3  # timed forwards per candidate thread count when choosing the fastest


def run_single(
    workload: Workload,
    ids: torch.Tensor,
    mask: torch.Tensor,
    thread_candidates: tuple[int, ...],
    progress: Progress,
) -> tuple[Measurement, torch.Tensor, int]:
    """Returns (back-to-back measurement, the reference output, the thread count used)."""
    source = resolve_model(workload.model)
    stage = load_stage(source, LayerSpan(0, source.total_layers))
    previous = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for _ in range(workload.warmup):
                stage.forward(ids, mask)
            threads = _fastest_threads(lambda: stage.forward(ids, mask), thread_candidates, progress)
            torch.set_num_threads(threads)
            reference = stage.forward(ids, mask).clone()
            samples = []
            started = time.perf_counter()
            for _ in range(workload.requests):
                t0 = time.perf_counter()
                stage.forward(ids, mask)
                samples.append(RequestSample(1000 * (time.perf_counter() - t0)))
            wall_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return Measurement(tuple(samples), wall_s, 1, matches_single=True), reference, threads


def _fastest_threads(forward: Callable[[], object], candidates: tuple[int, ...], progress: Progress) -> int:
    if len(candidates) == 1:
        return candidates[0]
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
    progress("single: threads " + ", ".join(f"{t} -> {ms:.1f} ms" for t, ms in medians.items()) + f"; using {best}")
    return best
