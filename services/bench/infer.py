"""The ``infer`` suite: every system on the same inputs, one system at a time, on the same machine.

Order per workload: single process (one child, nothing else running), then the mesh (direct and
relay), then the torch.distributed.rpc peer; each system's processes are stopped before the next one
starts, so systems never compete for the cores.
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

from services.bench.machine import describe_machine, load_average
from services.bench.mesh import RELAY_UNAVAILABLE, run_mesh
from services.bench.records import (
    SYSTEM_MESH_DIRECT,
    SYSTEM_MESH_RELAY,
    SYSTEM_SINGLE,
    BenchRow,
    Outcome,
    WireSizes,
)
from services.bench.report import markdown_table, plot, results_document, write_json
from services.bench.single import run_single
from services.bench.stats import summarise
from services.bench.tdrpc import RPC_VARIANTS, run_torch_rpc
from services.bench.workloads import BenchPlan, Workload, build_plan
from services.models.registry import resolve_model

Progress = Callable[[str], None]
FLOAT32_BYTES = 4
SINGLE_AT_LEVEL_NOTE = (
    "single process: requests back to back at batch 1 (its best batch-1 setting); the same run as concurrency 1"
)


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


def run_workload(workload: Workload, plan: BenchPlan, progress: Progress) -> list[BenchRow]:
    source = resolve_model(workload.model)
    ids, mask = make_inputs(workload, source.vocab_size)

    def say(message: str) -> None:
        progress(f"{workload.label}: {message}")

    say(f"single process, {workload.requests} requests back to back")
    single, reference, single_threads = run_single(workload, ids, mask, plan.single_threads, plan.start_timeout_s, say)
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
    try:
        outcomes += asyncio.run(run_mesh(workload, plan, ids, mask, reference, sizes, say))
    except Exception as exc:  # noqa: BLE001 - one system failing must not lose the others' numbers
        say(f"mesh failed: {exc}")
        outcomes += _failed((SYSTEM_MESH_DIRECT, SYSTEM_MESH_RELAY), plan, exc, plan.worker_threads)
    for system in plan.rpc_systems:
        try:
            outcomes += run_torch_rpc(workload, plan, ids, mask, reference, say, RPC_VARIANTS[system])
        except Exception as exc:  # noqa: BLE001
            say(f"{system} failed: {exc}")
            outcomes += _failed((system,), plan, exc, plan.worker_threads)
    return [summarise(outcome, single, workload, sizes) for outcome in outcomes]


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
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Runs the suite; exit 1 if a system failed for any reason other than relay not being available yet."""
    plan = build_plan(
        quick=args.quick, requests=args.requests, concurrency=args.concurrency,
        cpu_count=os.cpu_count() or 1, environ=environ,
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
    if args.json_path:
        document = results_document(
            rows, suite="infer", machine=machine, settings=_settings(plan), started_at=started_at, finished_at=_now()
        )
        write_json(args.json_path, document)
        progress(f"wrote {args.json_path}")
    if args.plot:
        plot(rows, args.plot)
        progress(f"wrote {args.plot}")
    unexpected = [r for r in rows if r.error and not r.error.startswith(RELAY_UNAVAILABLE)]
    return 1 if unexpected else 0
