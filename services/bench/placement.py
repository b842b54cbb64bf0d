"""``shardmesh bench placement``: the planned split against the even split on heterogeneous workers.

Workers differ by a CPU quota where the host allows one (``services/bench/cpulimit.py``; default one thread
each, the third limited to 0.3 cores), else by ``--threads`` (2,1,1). The even mesh starts first; each worker's Describe reports
the speed its start-up calibration measured, and the planner (``services/placement``) uses those speeds and
the per-layer costs measured on this host to choose the planned split. Both meshes then serve the same
closed-loop load (direct mode, dynamic batching off so a hop's compute is one request's), and the suite
reports throughput of each, the ratio (target >= 1.2x), and every stage's predicted compute time beside
the measured median compute of its hops (target within 15 %), with the host's load average. The planned
split uses the speeds each worker showed during the even run (its stage's compute at speed 1.0 over its
measured compute), because a start-up calibration is a snapshot that a busy host's load makes noisy; the
calibrated speeds and the plan they would give are reported beside them.

On a machine whose cores are busy with other work, threads do not make a worker faster, so the speeds
the workers measure, not their thread counts, decide the plan: the report prints both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import torch

from services.bench import cpulimit
from services.bench.workloads import CHILD_ENV
from services.client import AsyncRouterClient
from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.layers import LayerSpan
from services.localmesh.launcher import LocalMesh
from services.localmesh.spec import MeshSpec, WorkerSpec
from services.placement.costs import ModelCosts, WorkerCapacity
from services.placement.measure import measure_model_costs
from services.placement.planner import Plan, evaluate, even_spans, plan

MODEL = "minilm"
SHAPE = (1, 128)
DEFAULT_THREADS = (2, 1, 1)  # where no CPU quota can be set: on 2 busy cores this barely makes workers unequal
QUOTA_THREADS, QUOTA_CPUS = (1, 1, 1), (0.0, 0.0, 0.3)  # the default where it can (0 = no limit)
DEFAULT_REQUESTS, QUICK_REQUESTS = 80, 12
CONCURRENCY = 6  # enough requests in flight to keep every stage of a 3-stage pipeline busy
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 60.0


def _spec(spans: list[LayerSpan], threads: tuple[int, ...], label: str) -> MeshSpec:
    workers = tuple(
        WorkerSpec(f"{label}-w{i}", span, "127.0.0.1:0", ("--threads", str(t))) for i, (span, t) in enumerate(zip(spans, threads))
    )
    worker_args = ["--log-level", "warning"]
    if _worker_has_flag("--max-batch-size"):
        worker_args += ["--max-batch-size", "1"]  # one request per forward: stage times comparable to the model
    return MeshSpec(
        model=MODEL, router_listen="127.0.0.1:0", workers=workers, worker_args=tuple(worker_args),
        router_args=("--log-level", "warning", "--request-timeout-s", str(REQUEST_TIMEOUT_S),
                     "--hop-timeout-ms", str(int(REQUEST_TIMEOUT_S * 1000))),
    )


def _worker_has_flag(flag: str) -> bool:
    from services.cli.parser import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return any(flag in action.option_strings for action in sub.choices["worker"]._actions)  # noqa: SLF001


async def _describe_speeds(mesh: LocalMesh) -> list[float]:
    speeds = []
    for child in mesh.workers:
        async with grpc.aio.insecure_channel(child.address) as channel:
            reply = await worker_pb2_grpc.ShardWorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)
        speeds.append(reply.capacity.speed or 1.0)
    return speeds


async def _load(mesh: LocalMesh, requests: int, ids: torch.Tensor) -> dict[str, Any]:
    """Closed loop at CONCURRENCY; per stage (by layer range) the median compute_ms of its hops."""
    compute: dict[str, list[float]] = {}
    failures: list[str] = []
    outputs: list[torch.Tensor] = []
    async with AsyncRouterClient(mesh.router_address) as client:
        await client.wait_ready(START_TIMEOUT_S)
        for _ in range(3):  # warm-up: connections, allocator
            outputs.append((await client.infer(tensor=ids, mode="direct", timeout_s=REQUEST_TIMEOUT_S)).output)
        remaining = iter(range(requests))

        async def one_client() -> None:
            for _ in remaining:
                try:
                    result = await client.infer(tensor=ids, mode="direct", timeout_s=REQUEST_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    failures.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                for hop in result.hops:
                    compute.setdefault(f"{hop.layers.start}:{hop.layers.end}", []).append(hop.compute_ms)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - started
    done = requests - len(failures)
    return {"throughput_rps": done / wall, "wall_s": wall, "requests": done, "failures": failures[:3],
            "failed": len(failures), "stage_compute_ms": {k: statistics.median(v) for k, v in compute.items()},
            "output": outputs[0]}


def _stage_rows(predicted: Plan, measured: Mapping[str, float]) -> list[dict[str, Any]]:
    rows = []
    for stage in predicted.stages:
        got = measured.get(str(stage.span))
        want = stage.compute_s * 1000
        rows.append({"worker": stage.worker, "layers": str(stage.span), "predicted_ms": want, "measured_ms": got,
                     "error": (got - want) / got if got else None})
    return rows


@contextlib.contextmanager
def _limited(cpus: tuple[float, ...], label: str, order: list[int]) -> Iterator[Any]:
    """An ``on_spawn`` for LocalMesh putting worker ``{label}-w{i}`` (which is worker ``order[i]``) under its quota."""
    limits = {i: cpulimit.CpuLimit(cpus[w], f"{label}-w{i}") for i, w in enumerate(order) if cpus[w] > 0}

    def on_spawn(name: str, pid: int) -> None:
        index = int(name.rsplit("-w", 1)[1])
        if index in limits:
            limits[index].add(pid)

    try:
        yield on_spawn
    finally:
        for limit in limits.values():
            limit.close()


async def _run_split(
    split: Plan, label: str, threads: tuple[int, ...], cpus: tuple[float, ...], requests: int, ids: torch.Tensor
) -> dict[str, Any]:
    """Serves the closed-loop load on ``split`` (stage i on the worker its plan names, with that worker's
    threads and CPU quota)."""
    order = [int(s.worker[1:]) for s in split.stages]
    with _limited(cpus, label, order) as on_spawn:
        mesh = LocalMesh(_spec([s.span for s in split.stages], tuple(threads[i] for i in order), label), on_spawn=on_spawn)
        try:
            await mesh.start(START_TIMEOUT_S)
            return await _load(mesh, requests, ids)
        finally:
            await mesh.stop()


async def _run(threads: tuple[int, ...], cpus: tuple[float, ...], requests: int, say: Any) -> dict[str, Any]:
    costs: ModelCosts = await asyncio.to_thread(measure_model_costs, MODEL, shape=SHAPE, progress=say)
    n = len(threads)
    ids = torch.randint(1000, 20000, SHAPE, generator=torch.Generator().manual_seed(7))
    even = even_spans(costs.total_layers, n)
    say(f"even mesh: {', '.join(map(str, even))} with threads {threads}, CPU limits {cpus} (0 = none)")
    with _limited(cpus, "even", list(range(n))) as on_spawn:
        mesh = LocalMesh(_spec(even, threads, "even"), on_spawn=on_spawn)
        try:
            await mesh.start(START_TIMEOUT_S)
            speeds = await _describe_speeds(mesh)
            say(f"workers' calibrated speeds: {', '.join(f'{s:.2f}' for s in speeds)}")
            capacities = [WorkerCapacity(f"w{i}", s) for i, s in enumerate(speeds)]
            even_pred = evaluate(costs, capacities, even)
            even_run = await _load(mesh, requests, ids)
        finally:
            await mesh.stop()
    # A start-up calibration is a 0.3 s snapshot; on a busy host the even run's own hops say better how fast
    # each worker is under this load: observed speed = its stage's compute at speed 1.0 / measured compute.
    observed = []
    for stage, speed in zip(even_pred.stages, speeds):
        got = even_run["stage_compute_ms"].get(str(stage.span))
        observed.append(stage.compute_s * speed * 1000 / got if got else speed)
    say(f"speeds observed in the even run: {', '.join(f'{s:.2f}' for s in observed)}")
    calibrated_plan = plan(costs, capacities)
    capacities = [WorkerCapacity(f"w{i}", s) for i, s in enumerate(observed)]
    even_observed = evaluate(costs, capacities, even)
    planned = plan(costs, capacities)
    order = [int(s.worker[1:]) for s in planned.stages]  # planned stage i runs on worker order[i]
    spans = [s.span for s in planned.stages]
    say(f"planned mesh: {', '.join(f'{s.span} on w{i} (threads {threads[i]})' for s, i in zip(planned.stages, order))}")
    planned_run = await _run_split(planned, "planned", threads, cpus, requests, ids)
    # The production path (`shardmesh plan`, `layers: auto`) plans from the start-up calibration: run that plan too.
    if [(s.worker, s.span) for s in calibrated_plan.stages] != [(s.worker, s.span) for s in planned.stages]:
        say(f"calibrated plan's mesh: {', '.join(f'{s.span} on {s.worker}' for s in calibrated_plan.stages)}")
        calibrated_run = await _run_split(calibrated_plan, "calibrated", threads, cpus, requests, ids)
    else:
        calibrated_run = dict(planned_run)  # the same split: its measurement stands for both
    same = all(torch.equal(even_run["output"], r.pop("output")) for r in (planned_run, calibrated_run) if "output" in r)
    even_run.pop("output")
    rows = _stage_rows(planned, planned_run["stage_compute_ms"])  # predicted from speeds measured before this run
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    return {
        "model": MODEL, "shape": list(SHAPE), "threads": list(threads), "cpu_limits": list(cpus), "speeds": speeds, "observed_speeds": observed,
        "calibrated_plan": [str(s.span) for s in calibrated_plan.stages], "requests": requests,
        "even_stages_calibrated": _stage_rows(even_pred, even_run["stage_compute_ms"]),
        "concurrency": CONCURRENCY, "load_average": os.getloadavg(), "cpu_count": os.cpu_count(),
        "even": {"spans": [str(s) for s in even], "predicted_rps": 1 / max(even_pred.bottleneck_s, 1e-9),
                 **even_run},
        "planned": {"spans": [str(s) for s in spans], "workers": [f"w{i}" for i in order],
                    "predicted_rps": 1 / max(planned.bottleneck_s, 1e-9), **planned_run},
        "throughput_ratio": planned_run["throughput_rps"] / max(even_run["throughput_rps"], 1e-9),
        "calibrated": {"spans": [str(s.span) for s in calibrated_plan.stages],
                       "workers": [s.worker for s in calibrated_plan.stages], **calibrated_run},
        "calibrated_throughput_ratio": calibrated_run["throughput_rps"] / max(even_run["throughput_rps"], 1e-9),
        "predicted_ratio": even_observed.bottleneck_s / max(planned.bottleneck_s, 1e-9),
        "stages": rows, "max_stage_error": max(errors) if errors else None,
        "median_stage_error": statistics.median(errors) if errors else None,
        "outputs_identical": same,
    }


def _print(result: dict[str, Any]) -> None:
    print(f"placement bench: {result['model']} {result['shape'][0]}x{result['shape'][1]}, threads {result['threads']}, "
          f"CPU limits {result['cpu_limits']} (cores, 0 = none), "
          f"calibrated speeds {[round(s, 2) for s in result['speeds']]} (plan {result['calibrated_plan']}), "
          f"observed {[round(s, 2) for s in result['observed_speeds']]}, load average {[round(v, 2) for v in result['load_average']]} "
          f"on {result['cpu_count']} cores")
    for name in ("even", "planned"):
        r = result[name]
        print(f"  {name:8} {' '.join(r['spans']):24} measured {r['throughput_rps']:6.2f} req/s "
              f"(predicted {r['predicted_rps']:6.2f}), {r['failed']} failed")
    print(f"  planned / even throughput: measured {result['throughput_ratio']:.2f}x (target >= 1.20x), "
          f"predicted {result['predicted_ratio']:.2f}x")
    calibrated = result["calibrated"]
    print(f"  from the start-up calibration alone (the production path): {' '.join(calibrated['spans'])} on "
          f"{' '.join(calibrated['workers'])}, {calibrated['throughput_rps']:.2f} req/s = "
          f"{result['calibrated_throughput_ratio']:.2f}x the even split")
    for row in result["even_stages_calibrated"]:
        got = f"{row['measured_ms']:7.1f}" if row["measured_ms"] is not None else "    n/a"
        print(f"    even stage {row['layers']:>5} on {row['worker']}: from calibration {row['predicted_ms']:7.1f} ms, measured {got} ms")
    for row in result["stages"]:
        got = f"{row['measured_ms']:7.1f}" if row["measured_ms"] is not None else "    n/a"
        err = f"{100 * row['error']:+5.0f} %" if row["error"] is not None else ""
        print(f"    planned stage {row['layers']:>5} on {row['worker']}: predicted {row['predicted_ms']:7.1f} ms, measured {got} ms {err}")
    if result["max_stage_error"] is not None:
        print(f"  stage time error: median {100 * result['median_stage_error']:.0f} %, max {100 * result['max_stage_error']:.0f} % "
              "(target within 15 %)")
    print(f"  outputs of both splits identical: {result['outputs_identical']}")


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    threads = tuple(int(t) for t in environ.get("SHARDMESH_BENCH_PLACEMENT_THREADS", "").split(",") if t)
    cpus = tuple(float(c) for c in environ.get("SHARDMESH_BENCH_PLACEMENT_CPUS", "").split(",") if c)
    if not threads and not cpus:
        threads, cpus = (QUOTA_THREADS, QUOTA_CPUS) if cpulimit.available() else (DEFAULT_THREADS, ())
    threads = threads or tuple(1 for _ in cpus)
    cpus = cpus or tuple(0.0 for _ in threads)
    if len(cpus) != len(threads):
        print(f"SHARDMESH_BENCH_PLACEMENT_CPUS has {len(cpus)} entries but there are {len(threads)} workers", file=sys.stderr)
        return 2
    if any(c > 0 for c in cpus) and not cpulimit.available():
        print("SHARDMESH_BENCH_PLACEMENT_CPUS needs a writable cgroup cpu controller (root); none here", file=sys.stderr)
        return 2
    requests = args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS)
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)  # children read it when they load torch

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = asyncio.run(_run(threads, cpus, requests, say))
    _print(result)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0
