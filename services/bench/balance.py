"""``shardmesh bench balance``: the --balancer policies side by side on one heterogeneous mesh.

One minilm mesh: stage 0:3 has two replicas, ``fast`` and ``slow``; stage 3:6 has one (``tail``).
``slow`` sits behind the chaos fault proxy (services/chaos/proxy.py), which holds every byte sent to it
back by ``SLOW_MS`` (a replica on a slow link or a slower machine, as the router sees it). The workers
run once for the whole suite; one router per policy (``--balancer POLICY``) runs over the same workers,
and the measurement interleaves them: ``ROUNDS`` rounds, each giving every policy (in a rotating order)
its share of the requests at every concurrency level, closed-loop clients, the same token ids. The table
gives p50, p99, throughput and the share of requests the slow replica served.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import torch

from services.bench.load import closed_loop_async
from services.bench.machine import describe_machine, load_average
from services.bench.records import RequestSample
from services.bench.report import write_json
from services.bench.stats import percentile, throughput_rps
from services.bench.workloads import parse_concurrency
from services.chaos.proxy import FaultProxy, Rule
from services.client import AsyncRouterClient
from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.layers import LayerSpan
from services.localmesh.launcher import Child, LocalMesh, router_argv
from services.localmesh.spec import MeshSpec, WorkerSpec
from services.models.registry import resolve_model

POLICIES = ("round_robin", "least_connections", "least_response_time", "p2c", "weighted")
MODEL = "minilm"
SEQ_LEN = 14  # the short texts
SLOW_MS = 100.0  # about one loaded hop of minilm 0:3 here; unloaded the hop is ~5 ms
ROUNDS = 4
REQUESTS = 200
QUICK_REQUESTS = 24
WARMUP = 8
START_TIMEOUT_S = 240.0
REQUEST_TIMEOUT_S = 30.0
FAST, SLOW, TAIL = "fast", "slow", "tail"


@dataclass(frozen=True)
class PolicyRow:
    """One policy at one concurrency level."""

    policy: str
    concurrency: int
    requests: int
    failures: int
    p50_ms: float | None
    p99_ms: float | None
    throughput_rps: float | None
    slow_share: float | None  # share of requests whose stage-0 hop went to the slow replica
    same_output: bool | None  # every output bit-identical to the first policy's first output


def summarise(
    policy: str, concurrency: int, latencies_ms: Sequence[float], first_hops: Sequence[str], wall_s: float,
    failures: int, same_output: bool | None,
) -> PolicyRow:  # fmt: skip
    """Pure: the row for one measured run (``first_hops``: the stage-0 worker of each request)."""
    return PolicyRow(
        policy=policy,
        concurrency=concurrency,
        requests=len(latencies_ms),
        failures=failures,
        p50_ms=percentile(latencies_ms, 50) if latencies_ms else None,
        p99_ms=percentile(latencies_ms, 99) if latencies_ms else None,
        throughput_rps=throughput_rps(len(latencies_ms), wall_s),
        slow_share=sum(h == SLOW for h in first_hops) / len(first_hops) if first_hops else None,
        same_output=same_output,
    )


def table(rows: Sequence[PolicyRow]) -> str:
    """Markdown table, one line per policy and concurrency level."""

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| policy | clients | requests | failed | p50 ms | p99 ms | throughput req/s | to slow replica | outputs identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        share = "-" if r.slow_share is None else f"{100 * r.slow_share:.0f} %"
        same = "-" if r.same_output is None else ("yes" if r.same_output else "NO")
        lines.append(
            f"| {r.policy} | {r.concurrency} | {r.requests} | {r.failures} | {num(r.p50_ms)} | {num(r.p99_ms)} | "
            f"{num(r.throughput_rps)} | {share} | {same} |"
        )
    return "\n".join(lines)


_clock = {"started": 0.0}


def _say(message: str) -> None:
    print(f"[{time.monotonic() - _clock['started']:6.1f}s] {message}", file=sys.stderr, flush=True)


def _spec(threads: int) -> MeshSpec:
    return MeshSpec(
        model=MODEL,
        router_listen="127.0.0.1:0",
        workers=(
            WorkerSpec(FAST, LayerSpan(0, 3), "127.0.0.1:0"),
            WorkerSpec(SLOW, LayerSpan(0, 3), "127.0.0.1:0"),
            WorkerSpec(TAIL, LayerSpan(3, 6), "127.0.0.1:0"),
        ),
        worker_args=("--threads", str(threads), "--log-level", "warning"),
        router_args=("--request-timeout-s", str(REQUEST_TIMEOUT_S), "--log-level", "warning"),
    )


@dataclass
class _Tally:
    """What one policy at one level measured, summed over the rounds."""

    latencies_ms: list[float]
    first_hops: list[str]
    wall_s: float = 0.0
    failures: int = 0


class _PolicyRouter:
    """One router (``--balancer POLICY``) over the shared workers, and a client to it."""

    def __init__(self, policy: str, spec: MeshSpec, addresses: list[str]) -> None:
        self.policy = policy
        self.child = Child(f"router-{policy}", router_argv(spec, addresses, ("--balancer", policy)))
        self.client: AsyncRouterClient | None = None

    async def start(self) -> None:
        await self.child.spawn(False)
        await self.child.wait_listening(START_TIMEOUT_S)
        await self.child.wait_serving(START_TIMEOUT_S)
        self.client = AsyncRouterClient(self.child.address)
        await self.client.wait_ready(START_TIMEOUT_S)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        await self.child.stop()

    async def measure(
        self, level: int, requests: int, ids: torch.Tensor, reference: list[torch.Tensor], tally: _Tally
    ) -> bool:
        """Closed loop of ``requests`` at ``level`` clients into ``tally``; False if an output differed."""
        assert self.client is not None
        client, same = self.client, [True]

        async def call(_: int) -> RequestSample:
            t0 = time.perf_counter()
            result = await client.infer(tensor=ids, timeout_s=REQUEST_TIMEOUT_S)
            latency_ms = 1000 * (time.perf_counter() - t0)
            tally.first_hops.append(result.route[0] if result.route else "")
            if not reference:
                reference.append(result.output)
            elif not torch.equal(result.output, reference[0]):
                same[0] = False
            return RequestSample(latency_ms)

        if requests < 0:  # warm-up: connections open, both replicas sampled
            for _ in range(-requests):
                await call(-1)
            tally.first_hops.clear()
            return same[0]
        measured = await closed_loop_async(
            call, requests=requests, concurrency=level, timeout_s=REQUEST_TIMEOUT_S * (requests / level + 1)
        )
        tally.latencies_ms += [s.latency_ms for s in measured.samples]
        tally.wall_s += measured.wall_s
        tally.failures += measured.failures
        return same[0]


async def _reported_speed(address: str) -> float:
    """Capacity.speed from the worker's Describe (0 = unknown)."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await worker_pb2_grpc.ShardWorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)
    return round(reply.capacity.speed, 3)


async def _run(levels: Sequence[int], requests: int, threads: int, slow_ms: float) -> list[PolicyRow]:
    """Every policy's router runs at once; the rounds interleave policies (in a rotating order), so load
    from outside the bench that drifts during the run falls on every policy alike."""
    spec = _spec(threads)
    mesh = LocalMesh(spec)
    proxy: FaultProxy | None = None
    routers: list[_PolicyRouter] = []
    try:
        started = await asyncio.gather(*(mesh.start_worker(w, START_TIMEOUT_S) for w in spec.workers))
        fast, slow, tail = (c.address for c in started)
        host, port = slow.rsplit(":", 1)
        proxy = FaultProxy((host, int(port)))
        slowed = await proxy.start()
        proxy.add(Rule("delay", direction="to", delay_ms=slow_ms))
        speeds = {name: await _reported_speed(address) for name, address in ((FAST, fast), (SLOW, slow))}
        _say(f"workers up: fast {fast}, slow {slow} behind {slowed} (+{slow_ms:g} ms), tail {tail}; "
             f"speeds they report (weighted uses them): {speeds}")  # fmt: skip
        routers = [_PolicyRouter(policy, spec, [fast, slowed, tail]) for policy in POLICIES]
        await asyncio.gather(*(r.start() for r in routers))
        ids = torch.randint(3, resolve_model(MODEL).vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(9))
        reference: list[torch.Tensor] = []
        tallies = {(r.policy, level): _Tally([], []) for r in routers for level in levels}
        same = {r.policy: True for r in routers}
        for r in routers:
            same[r.policy] &= await r.measure(1, -WARMUP, ids, reference, _Tally([], []))
        per_round = max(1, requests // ROUNDS)
        for round_index in range(ROUNDS):
            order = routers[round_index % len(routers):] + routers[: round_index % len(routers)]
            for level in levels:
                for r in order:
                    same[r.policy] &= await r.measure(level, per_round, ids, reference, tallies[(r.policy, level)])
            _say(f"round {round_index + 1}/{ROUNDS} done, load average {load_average()}")
        return [
            summarise(r.policy, level, t.latencies_ms, t.first_hops, t.wall_s, t.failures, same[r.policy])
            for r in routers
            for level in levels
            for t in (tallies[(r.policy, level)],)
        ]
    finally:
        await asyncio.gather(*(r.stop() for r in routers), return_exceptions=True)
        if proxy is not None:
            await proxy.close()
        await mesh.stop()


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Runs every policy; exit 1 when a request failed or outputs differed between policies."""
    levels = parse_concurrency(args.concurrency)
    requests = args.requests or (QUICK_REQUESTS if args.quick else REQUESTS)
    threads = 1
    _clock["started"] = time.monotonic()
    machine = describe_machine()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    _say(f"bench balance: {MODEL} 0:3 x2 (one +{SLOW_MS:g} ms) + 3:6, {SEQ_LEN} tokens, {requests} requests per "
         f"policy and level {levels}, worker threads {threads}, load average {machine['load_average_at_start']}")  # fmt: skip
    rows = asyncio.run(_run(levels, requests, threads, SLOW_MS))
    machine["load_average_at_end"] = load_average()
    print(table(rows), flush=True)
    print(f"load average at start {machine['load_average_at_start']}, at end {machine['load_average_at_end']}", flush=True)
    if args.json_path:
        document: dict[str, Any] = {
            "suite": "balance",
            "machine": machine,
            "settings": {"model": MODEL, "seq_len": SEQ_LEN, "slow_ms": SLOW_MS, "requests": requests,
                         "concurrency": list(levels), "worker_threads": threads, "warmup": WARMUP},
            "started_at": started_at,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "results": [asdict(r) for r in rows],
        }  # fmt: skip
        write_json(args.json_path, document)
    return 1 if any(r.failures or r.same_output is False for r in rows) else 0
