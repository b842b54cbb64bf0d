"""Router scheduling through real processes: priority order at saturation, queue limits, deadline-aware
admission, mlfq letting a short Infer pass long generations, weighted fair shares, metadata priority.

Each router runs with ``--max-concurrency 1`` so the queue is observable: with one slot, the order in
which requests finish is the order the scheduler dispatched them.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc
from services.models.registry import resolve_model
from tests.procs import Proc, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)  # ~110 tokens: tens of ms per request
SHORT_TEXT = "a short sentence"


def _stop(procs: list[Proc]) -> None:
    for proc in reversed(procs):
        proc.stop()


@pytest.fixture(scope="module")
def minilm_workers() -> Iterator[list[str]]:
    procs: list[Proc] = []
    try:
        addresses = []
        for layers in ("0:3", "3:6"):
            proc, address = start_worker("minilm", layers)
            procs.append(proc)
            addresses.append(address)
        for address in addresses:
            wait_serving(address)
        yield addresses
    finally:
        _stop(procs)


@pytest.fixture
def router(minilm_workers: list[str]) -> Iterator:  # type: ignore[type-arg]
    started: list[Proc] = []

    def start(*flags: str) -> str:
        proc, address = start_router(minilm_workers, "--max-concurrency", "1", *flags)
        started.append(proc)
        wait_serving(address)
        return address

    try:
        yield start
    finally:
        _stop(started)


async def _infer(stub, text: str, priority: int = 0, metadata=(), timeout: float = 60.0):  # type: ignore[no-untyped-def]
    return await stub.Infer(router_pb2.InferRequest(text=text, priority=priority), timeout=timeout, metadata=metadata)


async def _warm(stub, n: int = 6) -> float:  # type: ignore[no-untyped-def]
    """Median client latency of ``n`` sequential requests (also warms the router's service estimate)."""
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        await _infer(stub, LONG_TEXT)
        times.append(time.monotonic() - t0)
    return statistics.median(times)


async def _lows_passed_by_highs(address: str) -> int:
    """Sends 10 priority-3 requests, then (while they queue) 4 priority-1 requests, 2 by field and 2 by
    metadata; returns how many low requests finished after the highs were sent but before the last high."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        latency = await _warm(stub, 3)
        done: list[tuple[str, float]] = []

        async def one(tag: str, **kw: object) -> None:
            await _infer(stub, LONG_TEXT, **kw)  # type: ignore[arg-type]
            done.append((tag, time.monotonic()))

        lows = [asyncio.create_task(one("low", priority=3)) for _ in range(10)]
        await asyncio.sleep(max(0.05, 1.5 * latency))  # the lows are queued, one runs
        sent = time.monotonic()
        highs = [asyncio.create_task(one("high", priority=1)) for _ in range(2)]
        highs += [asyncio.create_task(one("high", metadata=(("x-shardmesh-priority", "1"),))) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*lows, *highs), 120)
    last_high = max(t for tag, t in done if tag == "high")
    return sum(1 for tag, t in done if tag == "low" and sent < t < last_high)


async def test_priority_orders_the_queue_at_saturation_field_and_metadata(router) -> None:  # type: ignore[no-untyped-def]
    passed = await _lows_passed_by_highs(router("--schedule", "priority"))
    assert passed <= 2, f"{passed} low-priority requests finished before the high-priority ones"  # the one running
    # Control: the same load first-come-first-served lets the queued lows finish first.
    assert await _lows_passed_by_highs(router("--schedule", "fcfs")) >= 5


async def test_full_queue_and_bad_priority_are_refused_clearly(router) -> None:  # type: ignore[no-untyped-def]
    address = router("--schedule", "priority", "--queue-size", "3")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await _warm(stub, 2)
        results = await asyncio.gather(*(_infer(stub, LONG_TEXT, priority=3) for _ in range(16)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert refused and len(refused) <= 12, results
        for err in refused:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "queue priority-3 is full" in err.details() and "--queue-size 3" in err.details(), err.details()
        for bad, needle in (((("x-shardmesh-priority", "urgent"),), "not an integer"), ((), "out of range")):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _infer(stub, SHORT_TEXT, priority=0 if bad else 9, metadata=bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()


async def test_unreachable_deadline_is_refused_at_once(router) -> None:  # type: ignore[no-untyped-def]
    address = router("--schedule", "priority")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        latency = await _warm(stub, 8)
        backlog = [asyncio.create_task(_infer(stub, LONG_TEXT, priority=3)) for _ in range(8)]
        await asyncio.sleep(max(0.05, latency / 2))
        budget = 4 * latency  # 8 queued ahead on one slot need about 9 x latency
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _infer(stub, LONG_TEXT, priority=3, timeout=budget)
        elapsed = time.monotonic() - t0
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "refused at admission" in info.value.details(), info.value.details()
        assert elapsed < budget / 2, (elapsed, budget)
        # The same deadline at priority 1 passes the queue: admitted and served in time.
        await _infer(stub, LONG_TEXT, priority=1, timeout=budget)
        await asyncio.wait_for(asyncio.gather(*backlog), 120)


async def test_fair_shares_follow_tenant_weights(router) -> None:  # type: ignore[no-untyped-def]
    address = router("--schedule", "fair", "--tenant-weights", "a=3,b=1")
    finished: list[str] = []
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await _warm(stub, 2)

        async def client(tenant: str) -> None:
            while not stop.is_set():
                await _infer(stub, SHORT_TEXT, metadata=(("x-shardmesh-tenant", tenant),))
                finished.append(tenant)
                if len(finished) >= 60:
                    stop.set()

        await asyncio.wait_for(asyncio.gather(*(client(t) for t in ["a"] * 6 + ["b"] * 6)), 180)
    window = finished[8:56]  # both tenants backlogged throughout (6 closed-loop clients each, one slot)
    ratio = window.count("a") / max(1, window.count("b"))
    assert 2.0 <= ratio <= 4.5, (ratio, window)


# --- mlfq: long generations and a short Infer on tiny-llama -----------------------------------------------------

GEN_TOKENS = 120
PROMPT = [1, 5, 77, 300, 12, 9]


def _reference(prompt: list[int], max_new_tokens: int) -> list[int]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(resolve_model("tiny-llama").model_dir), torch_dtype=torch.float32)
    with torch.inference_mode():
        out = model.eval().generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


async def _short_infer_during_generations(address: str) -> tuple[float, float, float, list[list[int]]]:
    """Two long generations, then a short Infer once both stream tokens; returns (infer latency, infer
    end - first generation end, generation duration, the generations' token ids)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await stub.Infer(router_pb2.InferRequest(tokens=router_pb2.TokenIds(ids=PROMPT)), timeout=60)
        streaming = [asyncio.Event(), asyncio.Event()]
        ends: list[float] = []

        async def generation(i: int) -> list[int]:
            request = router_pb2.GenerateRequest(tokens=router_pb2.TokenIds(ids=PROMPT), max_new_tokens=GEN_TOKENS)
            ids: list[int] = []
            async for event in stub.Generate(request, timeout=300):
                if event.WhichOneof("event") == "token":
                    ids.append(event.token.token_id)
                    if len(ids) == 2:
                        streaming[i].set()
            ends.append(time.monotonic())
            return ids

        t_start = time.monotonic()
        gens = [asyncio.create_task(generation(i)) for i in range(2)]
        # fcfs runs the sessions one after the other: the second streams only after the first ends
        await asyncio.wait_for(streaming[0].wait(), 120)
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await stub.Infer(router_pb2.InferRequest(tokens=router_pb2.TokenIds(ids=[1, 5, 77])), timeout=300)
        t1 = time.monotonic()
        outputs = await asyncio.wait_for(asyncio.gather(*gens), 300)
    return t1 - t0, t1 - min(ends), min(ends) - t_start, outputs


async def test_mlfq_lets_a_short_infer_pass_long_generations() -> None:
    procs: list[Proc] = []
    try:
        workers = []
        for layers in ("0:3", "3:6"):
            proc, address = start_worker("tiny-llama", layers)
            procs.append(proc)
            workers.append(address)
        routers = {}
        for schedule in ("mlfq", "fcfs"):
            proc, address = start_router(
                workers, "--schedule", schedule, "--max-concurrency", "1", "--mlfq-quantum", "4"
            )
            procs.append(proc)
            routers[schedule] = address
        for address in [*workers, *routers.values()]:
            wait_serving(address)
        mlfq_latency, mlfq_vs_end, gen_s, mlfq_tokens = await _short_infer_during_generations(routers["mlfq"])
        fcfs_latency, fcfs_vs_end, _, fcfs_tokens = await _short_infer_during_generations(routers["fcfs"])
    finally:
        _stop(procs)
    expected = _reference(PROMPT, GEN_TOKENS)
    assert mlfq_tokens == [expected, expected] and fcfs_tokens == [expected, expected]  # step scheduling changes no token
    assert mlfq_vs_end < 0, "mlfq: the short Infer should finish while the generations still run"
    assert mlfq_latency < 0.25 * gen_s, (mlfq_latency, gen_s)
    assert fcfs_vs_end > 0, "fcfs: the short Infer waits for a whole generation"
    assert fcfs_latency > 3 * mlfq_latency, (fcfs_latency, mlfq_latency)
