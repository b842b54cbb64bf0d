"""Issue 14 storm target: a storm of InferStream requests with 1-50 ms timeouts mixed with normal ones.

Real router and four real workers (tiny-llama-wide, two replicas per stage, shared memory on), one
multiplexed ``InferStream`` carrying direct and relay requests, small (8 tokens: inline bytes) and large
(512 tokens: 1 MiB activations and logits, which travel through ``/dev/shm``). Checked: no normal request
fails and each answers the single-process model's logits bit for bit; short requests really ran out of
time (the fault happened) and failed only with DEADLINE_EXCEEDED; no replica was ejected; the mesh's
shared-memory segments are back to the baseline; the router's and workers' RSS plateau (VmRSS sampled at
20 %, 60 % and 100 % of the storm).

``SHARDMESH_STORM_REQUESTS`` sets the count (default 300: about half a minute on the 2-core test box; the
issue's run is 5000, recorded in docs/chaos.md). ``SHARDMESH_STORM_JSON=FILE`` writes the measurements.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import torch

from services.client import RouterClient, build_request
from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc
from services.models.registry import resolve_model
from services.wire import codec, shm
from tests.integration.test_shm_leaks import segments_of
from tests.procs import Proc, start_router, start_worker, wait_serving

MODEL = "tiny-llama-wide"  # 8 layers, hidden 512, vocab 512
REQUESTS = int(os.environ.get("SHARDMESH_STORM_REQUESTS", "300"))

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1200 + REQUESTS // 2),  # start-up and stop of 5 processes on a loaded box, then the storm
    pytest.mark.skipif(not shm.shm_available(), reason="no shared memory here"),
]

WINDOW = 8  # requests in flight on the stream: the normal ones among them queue at the workers
LARGE_SHARE = 0.05  # a 512-token forward of a stage is ~12 GFLOP: more would overload 2 cores, not test the storm
SMALL = [1, 17, 302, 44, 9, 120, 77, 5]
LARGE_LEN = 512  # [1, 512] x hidden 512 x fp32 = 1 MiB: the shared-memory threshold (placement.SHM_MIN_BYTES)
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
# Plateau: between 60 % and 100 % of the storm a process may grow by at most this much (allocator noise,
# gRPC buffers). A per-request leak of one 1 MiB activation over the last 40 % of even the CI-sized storm
# (about 30 large requests) exceeds it.
PLATEAU_SLACK_BYTES = 24 << 20
PLATEAU_SLACK_SHARE = 0.05


@dataclass
class Mesh:
    procs: dict[str, Proc]
    router: str

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}


@dataclass
class StormResult:
    plan: list[tuple[str, int, str, bool]]  # request id, timeout_ms (0 = normal), mode, large
    replies: dict[str, router_pb2.InferResponse]
    rss: dict[str, list[int]] = field(default_factory=dict)  # process -> VmRSS bytes at each sample
    samples_at: list[int] = field(default_factory=list)  # replies received when sampled
    seconds: float = 0.0


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _all_entries() -> int:
    return sum(1 for _ in os.scandir(shm.SHM_DIR))


def _ejected(router: str) -> list[str]:
    with RouterClient(router) as client:
        return sorted(w.worker_id for w in client.topology().workers if not w.healthy)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """Two replicas per stage, router defaults (ejection after 5 failures in a row, no hedging) except the hop
    timeout and the default request deadline: a queued 512-token hop on the shared 2-core test box (load 10+) can
    exceed them without any fault. The short client deadlines this storm is about do not depend on them."""
    layout = {"w0a": "0:4", "w0b": "0:4", "w1a": "4:8", "w1b": "4:8"}
    procs: dict[str, Proc] = {}
    addresses: dict[str, str] = {}
    try:
        for name, layers in layout.items():
            procs[name], addresses[name] = start_worker(MODEL, layers, "--worker-id", name, "--threads", "1")
        router, router_address = start_router(list(addresses.values()), "--hop-timeout-ms", "60000", "--request-timeout-s", "120")
        procs["router"] = router
        for address in [*addresses.values(), router_address]:
            wait_serving(address)
        yield Mesh(procs, router_address)
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def large_tokens() -> list[int]:
    g = torch.Generator().manual_seed(14)
    return [int(t) for t in torch.randint(3, 512, (LARGE_LEN,), generator=g)]


@pytest.fixture(scope="module")
def reference(large_tokens: list[int]) -> dict[bool, torch.Tensor]:
    """Single-process logits (transformers), with the workers' thread count: fp32 sums depend on it."""
    from transformers import LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llama = LlamaForCausalLM.from_pretrained(str(resolve_model(MODEL).model_dir), torch_dtype=torch.float32).eval()
        with torch.inference_mode():
            return {large: llama(input_ids=torch.tensor([large_tokens if large else SMALL])).logits for large in (False, True)}
    finally:
        torch.set_num_threads(threads)


def _make_plan(count: int) -> list[tuple[str, int, str, bool]]:
    """Half normal, half with a 1-50 ms timeout; ``LARGE_SHARE`` large; direct and relay alternate."""
    rng = random.Random(5000)
    plan = []
    for i in range(count):
        timeout_ms = rng.randint(1, 50) if rng.random() < 0.5 else 0
        plan.append((f"s{i}", timeout_ms, "relay" if i % 2 else "direct", rng.random() < LARGE_SHARE))
    return plan


async def _storm(mesh: Mesh, plan: list[tuple[str, int, str, bool]], large_tokens: list[int]) -> StormResult:
    pids = mesh.pids()
    marks = {max(1, round(len(plan) * share)) for share in (0.2, 0.6, 1.0)}
    result = StormResult(plan, {}, {name: [] for name in pids})
    started = time.monotonic()
    async with grpc.aio.insecure_channel(mesh.router, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        call = router_pb2_grpc.RouterStub(channel).InferStream()
        window = asyncio.Semaphore(WINDOW)

        async def read() -> None:
            while len(result.replies) < len(plan):
                reply = await call.read()
                assert reply is not grpc.aio.EOF, f"stream ended after {len(result.replies)} replies"
                assert reply.request_id not in result.replies, f"two replies for {reply.request_id}"
                result.replies[reply.request_id] = reply
                window.release()
                if len(result.replies) in marks:
                    result.samples_at.append(len(result.replies))
                    for name, pid in pids.items():
                        result.rss[name].append(_rss_bytes(pid))

        reader = asyncio.create_task(read())
        for request_id, timeout_ms, mode, large in plan:
            await window.acquire()
            request = build_request(tokens=large_tokens if large else SMALL, mode=mode, request_id=request_id)
            request.timeout_ms = timeout_ms
            await call.write(request)
        await asyncio.wait_for(reader, 60 + len(plan))
        await call.done_writing()
    result.seconds = time.monotonic() - started
    return result


def test_storm_of_short_timeouts_fails_no_normal_request_and_leaks_nothing(
    mesh: Mesh, large_tokens: list[int], reference: dict[bool, torch.Tensor]
) -> None:
    pids = mesh.pids()
    shm_pids = set(pids.values()) | {os.getpid()}
    # Warm-up (both sizes, both modes) so that the first RSS sample is not the allocator's first growth.
    kinds = [(mode, large) for mode in ("direct", "relay") for large in (False, True)] * 2
    warm = [(f"warm{i}", 0, mode, large) for i, (mode, large) in enumerate(kinds)]
    warm_result = asyncio.run(_storm(mesh, warm, large_tokens))
    assert not [r.error.message for r in warm_result.replies.values() if r.HasField("error")]
    baseline_segments = segments_of(shm_pids)
    baseline_entries = _all_entries()
    rss_before = {name: _rss_bytes(pid) for name, pid in pids.items()}

    result = asyncio.run(_storm(mesh, _make_plan(REQUESTS), large_tokens))

    deadline = time.monotonic() + 20
    while (left := segments_of(shm_pids)) != baseline_segments and time.monotonic() < deadline:
        time.sleep(0.2)
    codes = {"normal": Counter[str](), "short": Counter[str]()}
    wrong: list[str] = []
    failed_normal: dict[str, str] = {}
    large_over_shm = 0  # large answers whose second stage read its input from a segment
    max_queue_ms = max_compute_ms = 0.0
    for request_id, timeout_ms, _, large in result.plan:
        reply = result.replies[request_id]
        kind = "short" if timeout_ms else "normal"
        code = grpc.StatusCode.OK.name if not reply.HasField("error") else next(
            (c.name for c in grpc.StatusCode if c.value[0] == reply.error.code), str(reply.error.code))
        codes[kind][code] += 1
        if not reply.HasField("error") and not torch.equal(codec.decode(reply.output, max_bytes=1 << 30), reference[large]):
            wrong.append(request_id)
        if kind == "normal" and reply.HasField("error"):
            failed_normal[request_id] = f"{code}: {reply.error.message}"
        large_over_shm += large and any(h.input_transport == "shm" for h in reply.hops)
        max_queue_ms = max([max_queue_ms, *(h.queue_ms for h in reply.hops)])
        max_compute_ms = max([max_compute_ms, *(h.compute_ms for h in reply.hops)])
    report = {
        "requests": REQUESTS, "seconds": round(result.seconds, 1), "loadavg": os.getloadavg(),
        "normal": dict(codes["normal"]), "short": dict(codes["short"]), "wrong": len(wrong),
        "large": sum(large for *_, large in result.plan), "large_answered_over_shm": large_over_shm,
        "max_hop_queue_ms": round(max_queue_ms, 1), "max_hop_compute_ms": round(max_compute_ms, 1),
        "shm_segments_before": len(baseline_segments), "shm_segments_after": len(left),
        "shm_dir_entries_before": baseline_entries, "shm_dir_entries_after": _all_entries(),
        "rss_samples_at": result.samples_at,
        "rss_mib": {name: [round(b / 2**20, 1) for b in [rss_before[name], *series]] for name, series in result.rss.items()},
        "ejected": _ejected(mesh.router),
    }
    print("\nstorm:", json.dumps(report))
    if os.environ.get("SHARDMESH_STORM_JSON"):
        with open(os.environ["SHARDMESH_STORM_JSON"], "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)

    assert not failed_normal, f"{len(failed_normal)} normal requests failed, e.g. {list(failed_normal.items())[:3]}"
    assert not wrong, f"{len(wrong)} answers differ from the single-process model, e.g. {wrong[:3]}"
    assert set(codes["short"]) <= {"OK", "DEADLINE_EXCEEDED"}, codes["short"]
    short_total = sum(codes["short"].values())
    assert codes["short"]["DEADLINE_EXCEEDED"] >= short_total // 4, f"the fault barely happened: {codes['short']}"
    assert large_over_shm >= 1, "no large answer travelled through shared memory: the shm path was not exercised"
    assert report["ejected"] == [], f"a client's own deadline ejected {report['ejected']}"
    assert left == baseline_segments, f"{len(left)} segments left vs {len(baseline_segments)} before: {left[:5]}"
    for name, series in result.rss.items():
        at60, at100 = series[-2], series[-1]
        bound = max(PLATEAU_SLACK_BYTES, int(PLATEAU_SLACK_SHARE * at60))
        assert at100 - at60 <= bound, f"{name} RSS still growing: {report['rss_mib'][name]} MiB (before, 20/60/100 %)"
