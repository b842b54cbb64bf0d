"""``shardmesh bench schedule``: the router's scheduling policies under saturation (docs/scheduling.md).

Two measurements, each side by side in one run on one set of workers (every router runs with the
same ``--max-concurrency``, so requests queue in the router and the policy decides the order):

* priority: closed-loop high-priority clients alone, then with twice as many low-priority clients
  (a 2:1 low:high mix at saturation), under ``--schedule priority`` and ``--schedule fcfs``. Target:
  high-priority p99 in the mix at most 1.5x its p99 alone.
* mlfq: long generations (closed loop) and short Infer requests mixed, under ``--schedule mlfq`` and
  ``--schedule fcfs``. Target: the short requests' p50 at least 3x lower with mlfq.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from services.bench.machine import describe_machine, load_average
from services.bench.stats import percentile
from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc
from services.localmesh.launcher import Child, LocalMesh, router_argv
from services.localmesh.spec import parse_spec
from services.net import open_channel

HIGH, LOW = 1, 3
SHORT_TEXTS = ("a short sentence to embed", "routers schedule requests", "the mesh uses its capacity")
PRIORITY_TARGET = 1.5
MLFQ_TARGET = 3.0
START_TIMEOUT_S = 600.0


@contextlib.asynccontextmanager
async def _routers(mesh: dict[str, Any], schedule: str, concurrency: int) -> AsyncIterator[dict[str, str]]:
    """A mesh with a ``--schedule SCHEDULE`` router and an ``fcfs`` one over the same workers, both with the same
    ``--max-concurrency``; yields {policy: router address}."""
    flags = ["--max-concurrency", str(concurrency)]
    async with LocalMesh(parse_spec({**mesh, "router_args": ["--schedule", schedule, *flags]})) as local:
        key = ("--mesh-key-file", str(local.mesh_key_path)) if local.mesh_key_path else ()
        workers = [w.address for w in local.workers]
        fcfs = Child("router-fcfs", router_argv(local.spec, workers, (*key, "--schedule", "fcfs", *flags)))
        await fcfs.spawn(False)
        try:
            await fcfs.wait_listening(START_TIMEOUT_S)
            await fcfs.wait_serving(START_TIMEOUT_S)
            yield {schedule: local.router_address, "fcfs": fcfs.address}
        finally:
            await fcfs.stop()


async def _closed_loop(
    duration_s: float, clients: Sequence[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]
) -> dict[str, list[float]]:
    """Each client sends its next request when the last one ended, for ``duration_s``; latency per tag (s)."""
    stop = time.monotonic() + duration_s
    latencies: dict[str, list[float]] = {tag: [] for tag, _ in clients}

    async def client(tag: str, call: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            await call()
            latencies[tag].append(time.monotonic() - t0)

    await asyncio.gather(*(client(tag, call) for tag, call in clients))
    return latencies


def _summary(values: list[float]) -> dict[str, float | int]:
    return {"n": len(values), "p50_ms": 1000 * percentile(values, 50), "p99_ms": 1000 * percentile(values, 99)}


async def _priority(model: str, concurrency: int, high_clients: int, phase_s: float) -> dict[str, Any]:
    mesh = {"model": model, "workers": [{"layers": "0:2"}, {"layers": "2:4"}, {"layers": "4:6"}]}
    rows: dict[str, Any] = {}
    async with _routers(mesh, "priority", concurrency) as routers:
        for label, address in routers.items():
            async with open_channel(address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)

                def call(priority: int, i: int) -> Callable[[], Coroutine[Any, Any, None]]:
                    async def one() -> None:
                        text = SHORT_TEXTS[i % len(SHORT_TEXTS)]
                        await stub.Infer(router_pb2.InferRequest(text=text, priority=priority), timeout=120)
                    return one

                await _closed_loop(2.0, [("warm", call(HIGH, i)) for i in range(concurrency)])
                highs = [("high", call(HIGH, i)) for i in range(high_clients)]
                lows = [("low", call(LOW, i)) for i in range(2 * high_clients)]
                alone_load = load_average()
                alone = await _closed_loop(phase_s, highs)
                mix_load = load_average()
                mixed = await _closed_loop(phase_s, highs + lows)
            rows[label] = {
                "high_alone": _summary(alone["high"]), "high_mixed": _summary(mixed["high"]),
                "low_mixed": _summary(mixed["low"]),
                "mixed_throughput_rps": (len(mixed["high"]) + len(mixed["low"])) / phase_s,
                "load_average": {"alone": alone_load, "mixed": mix_load},
            }
            rows[label]["high_p99_ratio"] = rows[label]["high_mixed"]["p99_ms"] / rows[label]["high_alone"]["p99_ms"]
    return rows


async def _mlfq(model: str, concurrency: int, sessions: int, gen_tokens: int, phase_s: float) -> dict[str, Any]:
    mesh = {"model": model, "workers": [{"layers": "0:3"}, {"layers": "3:6"}]}
    prompt = router_pb2.TokenIds(ids=[1, 5, 77, 300, 12, 9])
    rows: dict[str, Any] = {}
    async with _routers(mesh, "mlfq", concurrency) as routers:
        for label, address in routers.items():
            async with open_channel(address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)

                async def short() -> None:
                    await stub.Infer(router_pb2.InferRequest(tokens=router_pb2.TokenIds(ids=[1, 5, 77])), timeout=300)

                async def long() -> None:
                    request = router_pb2.GenerateRequest(tokens=prompt, max_new_tokens=gen_tokens)
                    async for _ in stub.Generate(request, timeout=600):
                        pass

                await _closed_loop(1.0, [("warm", short)])
                load = load_average()
                result = await _closed_loop(phase_s, [("long", long)] * sessions + [("short", short)] * concurrency)
            rows[label] = {
                "short": _summary(result["short"]), "long": _summary(result["long"]),
                "tokens_per_s": len(result["long"]) * gen_tokens / phase_s, "load_average": load,
            }
    rows["short_p50_ratio_fcfs_over_mlfq"] = rows["fcfs"]["short"]["p50_ms"] / rows["mlfq"]["short"]["p50_ms"]
    return rows


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    phase_s = 5.0 if args.quick else 20.0
    settings = {
        "priority": {"model": "minilm", "concurrency": 2, "high_clients": 2, "phase_s": phase_s},
        "mlfq": {"model": "tiny-llama", "concurrency": 2, "sessions": 2, "gen_tokens": 32 if args.quick else 128,
                 "phase_s": phase_s},
    }
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    p = settings["priority"]
    print(f"schedule bench: priority, {p['model']}, 3 stages, --max-concurrency {p['concurrency']}, "
          f"{p['high_clients']} high + {2 * p['high_clients']} low clients, {phase_s:.0f} s per phase", flush=True)
    priority = asyncio.run(_priority(p["model"], p["concurrency"], p["high_clients"], phase_s))
    for label in ("priority", "fcfs"):
        row = priority[label]
        print(f"  {label:8s} high alone p99 {row['high_alone']['p99_ms']:7.1f} ms  mixed p99 "
              f"{row['high_mixed']['p99_ms']:7.1f} ms  ratio {row['high_p99_ratio']:.2f}x (target <= {PRIORITY_TARGET}x)  "
              f"low mixed p99 {row['low_mixed']['p99_ms']:7.1f} ms  load {row['load_average']['mixed']}", flush=True)
    m = settings["mlfq"]
    print(f"schedule bench: mlfq, {m['model']}, 2 stages, --max-concurrency {m['concurrency']}, {m['sessions']} "
          f"generations of {m['gen_tokens']} tokens + {m['concurrency']} short-Infer clients", flush=True)
    mlfq = asyncio.run(_mlfq(m["model"], m["concurrency"], m["sessions"], m["gen_tokens"], phase_s))
    for label in ("mlfq", "fcfs"):
        row = mlfq[label]
        print(f"  {label:8s} short p50 {row['short']['p50_ms']:7.1f} ms p99 {row['short']['p99_ms']:7.1f} ms  "
              f"generation {row['tokens_per_s']:6.1f} tok/s  load {row['load_average']}", flush=True)
    print(f"  short p50 fcfs / mlfq {mlfq['short_p50_ratio_fcfs_over_mlfq']:.1f}x (target >= {MLFQ_TARGET}x)", flush=True)
    document = {
        "suite": "schedule",
        "priority": priority,
        "mlfq": mlfq,
        "targets": {
            "high_p99_ratio_max": PRIORITY_TARGET, "high_p99_ratio": priority["priority"]["high_p99_ratio"],
            "short_p50_ratio_min": MLFQ_TARGET, "short_p50_ratio": mlfq["short_p50_ratio_fcfs_over_mlfq"],
        },
        "settings": settings,
        "machine": describe_machine(),
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(document, indent=2) + "\n")
    met = document["targets"]
    ok = met["high_p99_ratio"] <= PRIORITY_TARGET and met["short_p50_ratio"] >= MLFQ_TARGET
    print(f"targets {'met' if ok else 'MISSED'}", flush=True)
    return 0
