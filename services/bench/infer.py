"""The ``infer`` suite: every system on the same inputs, one system at a time, on the same machine.

Order per workload: single process (one child, nothing else running), then the mesh (direct and
relay), then the torch.distributed.rpc peer; each system's processes are stopped before the next one
starts, so systems never compete for the cores. The whole order repeats ``--rounds`` times (3 by default),
rotated by one system each round; rows pool the rounds and carry each round's ratios as the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping

import torch

from services.bench.load import closed_loop_async
from services.bench.machine import describe_machine, load_average
from services.bench.mesh import RELAY_UNAVAILABLE, hop_samples, mesh_spec, run_mesh
from services.bench.records import (
    SYSTEM_MESH_DIRECT,
    SYSTEM_MESH_RELAY,
    SYSTEM_SINGLE,
    BenchRow,
    Measurement,
    Outcome,
    RequestSample,
    WireSizes,
)
from services.bench.report import markdown_table, plot, results_document, write_json
from services.bench.single import run_single
from services.bench.stats import pool_rounds, round_spread, summarise
from services.bench.tdrpc import RPC_VARIANTS, run_torch_rpc
from services.bench.workloads import BenchPlan, Workload, build_plan
from services.client import AsyncRouterClient
from services.localmesh.launcher import LocalMesh
from services.models.registry import resolve_model

Progress = Callable[[str], None]
FLOAT32_BYTES = 4
SINGLE_AT_LEVEL_NOTE = (
    "single process: requests back to back at batch 1 (its best batch-1 setting); the same run as concurrency 1"
)
# --batching: batched outputs differ from the single process by float rounding only; the bound measured
# for minilm is 5.5e-6 (docs/architecture.md), so a row "matches" when every output is within this.
BATCHED_TOLERANCE = 1e-5


def make_inputs(workload: Workload, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded token ids (skipping the first ids, which are special tokens) and an all-ones mask."""
    generator = torch.Generator().manual_seed(workload.seed)
    ids = torch.randint(3, vocab_size, (workload.batch, workload.seq_len), generator=generator, dtype=torch.int64)
    return ids, torch.ones_like(ids)


def progress_printer() -> Progress:
    started = time.monotonic()

    def report(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return report


def _failed(systems: tuple[str, ...], plan: BenchPlan, exc: BaseException, threads: int) -> list[Outcome]:
    message = f"{type(exc).__name__}: {exc}".strip()[:800]
    return [Outcome(system, level, None, threads, error=message) for system in systems for level in plan.concurrency]


@dataclasses.dataclass(frozen=True)
class _Baseline:
    """A workload's inputs and its single-process measurement, which every other system is compared with."""

    ids: torch.Tensor
    mask: torch.Tensor
    single: Measurement
    reference: torch.Tensor
    sizes: WireSizes
    outcomes: list[Outcome]  # the single process's row at every concurrency level


def _baseline(workload: Workload, plan: BenchPlan, say: Progress) -> _Baseline:
    source = resolve_model(workload.model)
    ids, mask = make_inputs(workload, source.vocab_size)
    single, reference, single_threads = _measure_single(workload, plan, ids, mask, say)
    sizes = WireSizes(
        ids_bytes=ids.nbytes,
        mask_bytes=mask.nbytes,
        activation_bytes=workload.batch * workload.seq_len * source.hidden_size * FLOAT32_BYTES,
        output_bytes=reference.nbytes,
    )
    outcomes = [
        Outcome(SYSTEM_SINGLE, level, single, single_threads, note="" if level == 1 else SINGLE_AT_LEVEL_NOTE)
        for level in plan.concurrency
    ]
    return _Baseline(ids, mask, single, reference, sizes, outcomes)


def _measure_single(
    workload: Workload, plan: BenchPlan, ids: torch.Tensor, mask: torch.Tensor, say: Progress
) -> tuple[Measurement, torch.Tensor, int]:
    """The single process, back to back, at its faster thread count: (measurement, output, threads)."""
    say(f"single process, {workload.requests} requests back to back")
    return run_single(workload, ids, mask, plan.single_threads, plan.start_timeout_s, say)


def _progress_for(workload: Workload, progress: Progress) -> Progress:
    return lambda message: progress(f"{workload.label}: {message}")


_BatchStats = dict[tuple[str, int], dict[str, float]]  # (system, level) -> hop batch sizes of one round


def _systems_once(
    workload: Workload, plan: BenchPlan, base: _Baseline, order: list[str], first_round: bool, say: Progress,
    stats: _BatchStats | None = None,
) -> tuple[Measurement, int, list[Outcome]]:
    """One round: every system once, in ``order`` ("single", "mesh", rpc variants, or ``batch:N`` for mesh-direct
    at --max-batch-size N); the round's single measurement and its thread count (the first round's are the
    baseline's, measured just before) and everyone else's outcomes; a batched mesh's hop batch sizes go to ``stats``."""
    single, threads, outcomes = base.single, base.outcomes[0].threads, []
    for name in order:
        if name == SYSTEM_SINGLE:
            if not first_round:
                single, _, threads = _measure_single(workload, plan, base.ids, base.mask, say)
        elif name.startswith(BATCH_PREFIX):
            size = int(name[len(BATCH_PREFIX):])
            try:
                found, by_level = asyncio.run(
                    run_batched_mesh(workload, plan, size, base.ids, base.mask, base.reference, base.sizes, say)
                )
            except Exception as exc:  # noqa: BLE001 - one configuration failing must not lose the others' numbers
                say(f"{batched_system(size)} failed: {exc}")
                outcomes += _failed((batched_system(size),), plan, exc, plan.worker_threads)
                continue
            outcomes += found
            if stats is not None:
                stats.update({(batched_system(size), level): value for level, value in by_level.items()})
        elif name == "mesh":
            try:
                outcomes += asyncio.run(run_mesh(workload, plan, base.ids, base.mask, base.reference, base.sizes, say))
            except Exception as exc:  # noqa: BLE001 - one system failing must not lose the others' numbers
                say(f"mesh failed: {exc}")
                outcomes += _failed((SYSTEM_MESH_DIRECT, SYSTEM_MESH_RELAY), plan, exc, plan.worker_threads)
        else:
            try:
                outcomes += run_torch_rpc(workload, plan, base.ids, base.mask, base.reference, say, RPC_VARIANTS[name])
            except Exception as exc:  # noqa: BLE001
                say(f"{name} failed: {exc}")
                outcomes += _failed((name,), plan, exc, plan.worker_threads)
    return single, threads, outcomes


def run_workload(workload: Workload, plan: BenchPlan, progress: Progress) -> list[BenchRow]:
    """Every system ``plan.rounds`` times, interleaved: round r runs the systems in an order rotated by r (the
    single process too), so drift in the machine's speed lands on every system alike. A row pools its rounds'
    requests; ``extra`` keeps each round's p50 and its ratios to the same round's single process (the spread).
    With ``plan.batch_sizes`` (``--batching``) the systems are the single process and mesh-direct once per
    --max-batch-size, and each batched row's ``extra`` also has its hop batch sizes (mean over the rounds)."""
    say = _progress_for(workload, progress)
    base = _baseline(workload, plan, say)
    if plan.batch_sizes:
        systems = [SYSTEM_SINGLE, *(f"{BATCH_PREFIX}{size}" for size in plan.batch_sizes)]
    else:
        systems = [SYSTEM_SINGLE, "mesh", *plan.rpc_systems]
    singles: list[Measurement] = []
    single_threads: list[int] = []  # the single process picks its faster thread count anew each round
    rounds: list[list[Outcome]] = []
    stats: list[_BatchStats] = []
    for r in range(plan.rounds):
        order = systems[r % len(systems):] + systems[: r % len(systems)]
        if plan.rounds > 1:
            say(f"round {r + 1} of {plan.rounds}: {', '.join(order)}")
        stats.append({})
        single, threads, outcomes = _systems_once(workload, plan, base, order, r == 0, say, stats[-1])
        singles.append(single)
        single_threads.append(threads)
        rounds.append(outcomes)
    keys = list(dict.fromkeys((o.system, o.concurrency) for o in rounds[0]))
    single_rounds = [dataclasses.replace(base.outcomes[0], measurement=m) for m in singles]
    single_all = pool_rounds(single_rounds).measurement  # every ratio's reference: all rounds' single requests
    assert single_all is not None
    rows = []
    for outcome in base.outcomes:  # the single process's rows (one per level, the same measurements)
        per_round = [dataclasses.replace(o, concurrency=outcome.concurrency, note=outcome.note) for o in single_rounds]
        row = _pooled_row(per_round, singles, single_all, workload, base.sizes, plan.rounds)
        rows.append(row if plan.rounds < 2 else dataclasses.replace(row, extra={**row.extra, "threads_per_round": single_threads}))
    for key in keys:
        per_round = [next(o for o in outcomes if (o.system, o.concurrency) == key) for outcomes in rounds]
        row = _pooled_row(per_round, singles, single_all, workload, base.sizes, plan.rounds)
        batches = [round_stats[key] for round_stats in stats if key in round_stats]
        rows.append(row if not batches else dataclasses.replace(row, extra={**row.extra, **_pooled_batches(batches)}))
    return rows


def _pooled_batches(batches: list[dict[str, float]]) -> dict[str, float]:
    """One batched row's hop batch sizes over its rounds: the mean of the rounds' means, the largest batch."""
    return {
        "max_batch_size": batches[0]["max_batch_size"],
        "mean_hop_batch": round(sum(b["mean_hop_batch"] for b in batches) / len(batches), 2),
        "max_hop_batch": max(b["max_hop_batch"] for b in batches),
    }


def _pooled_row(
    per_round: list[Outcome], singles: list[Measurement], single_all: Measurement, workload: Workload,
    sizes: WireSizes, rounds: int,
) -> BenchRow:
    """The row of one system at one level over the rounds, with the per-round spread in ``extra`` (2+ rounds)."""
    row = summarise(pool_rounds(per_round), single_all, workload, sizes)
    if rounds < 2:
        return row
    return dataclasses.replace(row, extra={**row.extra, "rounds": rounds, **round_spread(per_round, singles)})


BATCH_PREFIX = "batch:"  # a system name in a --batching round: mesh-direct at --max-batch-size N


def batched_system(max_batch_size: int) -> str:
    return f"{SYSTEM_MESH_DIRECT} batch<={max_batch_size}" if max_batch_size > 1 else f"{SYSTEM_MESH_DIRECT} unbatched"


async def run_batched_mesh(
    workload: Workload,
    plan: BenchPlan,
    max_batch_size: int,
    ids: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor,
    sizes: WireSizes,
    progress: Progress,
) -> tuple[list[Outcome], dict[int, dict[str, float]]]:
    """mesh-direct with every worker at ``--max-batch-size max_batch_size`` (and ``plan.max_queue_delay_us``;
    0: continuous batching) and, with ``plan.coalesce``, the router at ``--coalesce max_batch_size``, at every
    concurrency level; also returns, per level, the hop batch sizes the workers reported."""
    base = mesh_spec(workload, plan.worker_threads)
    batching = ("--max-batch-size", str(max_batch_size), "--max-queue-delay-us", str(plan.max_queue_delay_us))
    coalesce = ("--coalesce", str(max_batch_size)) if plan.coalesce and max_batch_size > 1 else ()
    spec = dataclasses.replace(base, worker_args=(*base.worker_args, *batching), router_args=(*base.router_args, *coalesce))
    system = batched_system(max_batch_size)
    mesh = LocalMesh(spec)
    outcomes: list[Outcome] = []
    batch_stats: dict[int, dict[str, float]] = {}
    matched: list[bool] = []
    hop_batches: list[int] = []

    try:
        progress(f"{system}: starting router + {len(workload.split)} workers ({', '.join(workload.split)})")
        address = await mesh.start(plan.start_timeout_s)
        async with AsyncRouterClient(address) as client:
            await client.wait_ready(plan.start_timeout_s)

            async def call(_: int) -> RequestSample:
                t0 = time.perf_counter()
                result = await client.infer(tensor=ids, attention_mask=mask, mode="direct", timeout_s=workload.request_timeout_s)
                latency_ms = 1000 * (time.perf_counter() - t0)
                out = result.output.reshape(reference.shape)
                exact = bool(torch.equal(out, reference))
                matched.append(exact or (max_batch_size > 1 and (out - reference).abs().max().item() <= BATCHED_TOLERANCE))
                hop_batches.extend(h.batch_size or 1 for h in result.hops)
                return RequestSample(latency_ms, hop_samples(result, sizes, relay=False))

            for _ in range(workload.warmup):
                await call(-1)
            for level in plan.concurrency:
                requests = workload.requests_at(level)
                progress(f"{system}: {requests} requests at concurrency {level}")
                matched.clear()
                hop_batches.clear()
                measurement = await closed_loop_async(
                    call,
                    requests=requests,
                    concurrency=level,
                    timeout_s=workload.request_timeout_s * (requests / level + 1),
                    matches=lambda: all(matched) if matched else None,
                )
                mean_batch = sum(hop_batches) / len(hop_batches) if hop_batches else 0.0
                batch_stats[level] = {"max_batch_size": max_batch_size, "mean_hop_batch": round(mean_batch, 2),
                                      "max_hop_batch": max(hop_batches, default=0)}  # fmt: skip
                note = f"hop batch size mean {mean_batch:.2f}, max {max(hop_batches, default=0)}"
                if max_batch_size > 1:
                    note += f"; 'same output' = every output within {BATCHED_TOLERANCE:g} of single (batched)"
                outcomes.append(Outcome(system, level, measurement, plan.worker_threads, note=note))
    finally:
        codes = await mesh.stop()
        progress(f"{system}: stopped (exit codes {codes})")
    return outcomes, batch_stats


def batching_targets(rows: list[BenchRow], plan: BenchPlan) -> list[dict[str, object]]:
    """The issue's targets, as ratios: per batched size, throughput at the highest level / single batch-1
    (target >= 2.0) and p50 at one client / unbatched mesh p50 at one client (target <= 1.05)."""
    def find(system: str, level: int) -> BenchRow | None:
        return next((r for r in rows if r.system == system and r.concurrency == level and r.error is None), None)

    top = max(plan.concurrency)
    unbatched_1 = find(batched_system(1), 1)
    targets: list[dict[str, object]] = []
    for size in plan.batch_sizes:
        if size == 1:
            continue
        at_top, at_1 = find(batched_system(size), top), find(batched_system(size), 1)
        unbatched_top = find(batched_system(1), top)
        entry: dict[str, object] = {"max_batch_size": size, "clients": top}
        entry["throughput_vs_single_batch1"] = at_top.throughput_ratio if at_top else None
        entry["throughput_vs_unbatched_mesh"] = (
            at_top.throughput_rps / unbatched_top.throughput_rps
            if at_top and unbatched_top and at_top.throughput_rps and unbatched_top.throughput_rps else None
        )
        entry["p50_1_client_vs_unbatched"] = (
            at_1.p50_ms / unbatched_1.p50_ms if at_1 and unbatched_1 and at_1.p50_ms and unbatched_1.p50_ms else None
        )
        entry["throughput_target_met"] = bool(entry["throughput_vs_single_batch1"] and entry["throughput_vs_single_batch1"] >= 2.0)  # type: ignore[operator]
        entry["p50_target_met"] = bool(entry["p50_1_client_vs_unbatched"] and entry["p50_1_client_vs_unbatched"] <= 1.05)  # type: ignore[operator]
        targets.append(entry)
    return targets


def _format_targets(targets: list[dict[str, object]]) -> str:
    def ratio_text(value: object) -> str:
        return f"{value:.2f}x" if isinstance(value, float) else "-"

    lines = []
    for t in targets:
        lines.append(
            f"batch<={t['max_batch_size']}: {t['clients']} clients {ratio_text(t['throughput_vs_single_batch1'])} the single "
            f"process's batch-1 throughput (target >= 2.0x: {'met' if t['throughput_target_met'] else 'MISSED'}), "
            f"{ratio_text(t['throughput_vs_unbatched_mesh'])} the unbatched mesh; p50 at 1 client "
            f"{ratio_text(t['p50_1_client_vs_unbatched'])} the unbatched mesh's (target <= 1.05x: "
            f"{'met' if t['p50_target_met'] else 'MISSED'})"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def child_environment(extra: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """Adds ``extra`` to this process's environment while the run lasts, so the children (mesh processes
    via LocalMesh, rpc processes via spawn) inherit it; restores the previous values afterwards."""
    saved = {key: os.environ.get(key) for key, _ in extra}
    os.environ.update(dict(extra))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _settings(plan: BenchPlan) -> dict[str, object]:
    return {
        "command": "shardmesh " + " ".join(sys.argv[1:]) if sys.argv else "",
        "quick": plan.quick,
        "concurrency": list(plan.concurrency),
        "worker_threads": plan.worker_threads,
        "child_env": dict(plan.child_env),
        "single_thread_candidates": list(plan.single_threads),
        "torch_rpc_variants": {s: RPC_VARIANTS[s].describe() + ", TP_SOCKET_IFNAME=lo" for s in plan.rpc_systems},
        "workloads": [dataclasses.asdict(w) for w in plan.workloads],
        "batching_max_batch_sizes": list(plan.batch_sizes),
        "batching_max_queue_delay_us": plan.max_queue_delay_us,
        "batching_router_coalesce": plan.coalesce,
        "rounds": plan.rounds,
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Runs the suite; exit 1 if a system failed for any reason other than relay not being available yet."""
    plan = build_plan(
        quick=args.quick, requests=args.requests, concurrency=args.concurrency,
        cpu_count=os.cpu_count() or 1, environ=environ, batching=getattr(args, "batching", None),
        rounds=getattr(args, "rounds", 0),
    )  # fmt: skip
    progress = progress_printer()
    started_at = _now()
    machine = describe_machine()
    progress(f"bench infer: {len(plan.workloads)} workload(s), concurrency {plan.concurrency}, "
             f"worker threads {plan.worker_threads}, child env {dict(plan.child_env)}, load average {machine['load_average_at_start']}")  # fmt: skip
    rows: list[BenchRow] = []
    with child_environment(plan.child_env):
        for workload in plan.workloads:
            rows += run_workload(workload, plan, progress)
    machine["load_average_at_end"] = load_average()
    print(markdown_table(rows), flush=True)
    targets = batching_targets(rows, plan) if plan.batch_sizes else []
    if targets:
        print("\n" + _format_targets(targets), flush=True)
    if args.json_path:
        document = results_document(
            rows, suite="infer", machine=machine, settings=_settings(plan), started_at=started_at, finished_at=_now()
        )
        if targets:
            document["batching_targets"] = targets
        write_json(args.json_path, document)
        progress(f"wrote {args.json_path}")
    if args.plot:
        plot(rows, args.plot)
        progress(f"wrote {args.plot}")
    unexpected = [r for r in rows if r.error and not r.error.startswith(RELAY_UNAVAILABLE)]
    return 1 if unexpected else 0
