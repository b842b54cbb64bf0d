"""Observability of what the first metrics and logs missed, through a real mesh (a router and two tiny-llama
workers on loopback, --metrics-listen on each, JSON logs): refusals counted in shardmesh_requests_total,
generation steps and replays in the workers' batch-size histogram, request ids on the unary Forward's log lines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from services.client import RouterClient, build_generate_request
from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.wire import codec
from tests.integration.test_metrics import _free_port, scrape
from tests.procs import Proc, retry_until, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MODEL = "tiny-llama"  # Infer and Generate (sessions), and small
MAX_INFLIGHT = 2
PROMPT = [1, 5, 77, 300, 12, 9]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Mesh:
    router: str
    router_metrics: str
    workers: dict[str, tuple[str, str]]  # worker id -> (gRPC address, metrics address)
    procs: dict[str, Proc]


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    procs: dict[str, Proc] = {}
    workers: dict[str, tuple[str, str]] = {}
    try:
        for worker_id, layers in (("w0", "0:3"), ("w1", "3:6")):
            metrics = f"127.0.0.1:{_free_port()}"
            procs[worker_id], address = start_worker(
                MODEL, layers, "--worker-id", worker_id, "--metrics-listen", metrics,
                "--log-format", "json", "--log-level", "info", "--threads", "1",
            )
            workers[worker_id] = (address, metrics)
        for address, _ in workers.values():
            wait_serving(address)
        router_metrics = f"127.0.0.1:{_free_port()}"
        procs["router"], router = start_router(
            [address for address, _ in workers.values()], "--mode", "direct", "--metrics-listen", router_metrics,
            "--max-inflight", str(MAX_INFLIGHT),
        )
        wait_serving(router)
        yield Mesh(router, router_metrics, workers, procs)
    finally:
        for proc in procs.values():
            proc.stop()


def get(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over samples whose labels include ``labels``; 0 when there is none yet."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return get(after, name, **labels) - get(before, name, **labels)


def _idle(mesh: Mesh) -> None:
    """No generation session is open on any worker (earlier tests' sessions are closed)."""
    for worker_id, (_, metrics) in mesh.workers.items():
        assert get(scrape(metrics), "shardmesh_sessions") == 0, worker_id


# ---------------------------------------------------------------- generation steps in the batch-size histogram


def test_generation_steps_show_in_the_worker_batch_size(mesh: Mesh) -> None:
    """A lone generation: each worker ran its prompt as one prefill pass of 1 and each later token as one
    decode pass of 1 (the session was alone), and no stateless forward; the token count comes from the router."""
    with RouterClient(mesh.router) as client:
        retry_until(lambda: client.infer(tokens=[5, 6, 7], timeout_s=60))  # the route is complete
        retry_until(lambda: _idle(mesh), timeout_s=30)
        before = {w: scrape(m) for w, (_, m) in mesh.workers.items()}
        result = client.generate(tokens=PROMPT, max_new_tokens=12)
    steps = len(result.token_ids)
    assert steps >= 2, result
    for worker_id, (_, metrics) in mesh.workers.items():
        after = scrape(metrics)
        d = lambda name, **labels: delta(before[worker_id], after, name, **labels)  # noqa: E731
        assert d("shardmesh_worker_batch_size_count", kind="prefill") == 1, worker_id
        assert d("shardmesh_worker_batch_size_sum", kind="prefill") == 1, worker_id
        assert d("shardmesh_worker_batch_size_count", kind="decode") == steps - 1, worker_id
        assert d("shardmesh_worker_batch_size_sum", kind="decode") == steps - 1, worker_id
        assert d("shardmesh_worker_batch_size_count", kind="stateless") == 0, worker_id


def test_concurrent_sessions_decode_in_shared_passes(mesh: Mesh) -> None:
    """Two sessions at once (--max-inflight 2): every decode step is in the histogram's sum exactly once
    (sum = steps), and the passes are no more than the steps (steps that met in the queue shared a pass)."""
    sessions = MAX_INFLIGHT

    async def run() -> list[int]:
        async with grpc.aio.insecure_channel(mesh.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)

            async def one(i: int) -> int:
                request = build_generate_request(tokens=[*PROMPT, i], max_new_tokens=10)
                return sum([event.HasField("token") async for event in stub.Generate(request, timeout=120)])

            return list(await asyncio.gather(*(one(i) for i in range(sessions))))

    retry_until(lambda: _idle(mesh), timeout_s=30)
    before = {w: scrape(m) for w, (_, m) in mesh.workers.items()}
    decode_steps = sum(asyncio.run(run())) - sessions  # each session's first token came from its prefill
    for worker_id, (_, metrics) in mesh.workers.items():
        after = scrape(metrics)
        d = lambda name, **labels: delta(before[worker_id], after, name, **labels)  # noqa: E731
        assert d("shardmesh_worker_batch_size_sum", kind="decode") == decode_steps, worker_id
        assert 0 < d("shardmesh_worker_batch_size_count", kind="decode") <= decode_steps, worker_id
        assert d("shardmesh_worker_batch_size_sum", kind="prefill") == sessions, worker_id


# ---------------------------------------------------------------- a unary replay: batch sizes and tagged logs


def test_unary_replay_is_counted_per_step_and_its_log_lines_carry_the_request_id(mesh: Mesh) -> None:
    """A replay sent to w0 as one unary Forward (batching on) runs its 3 steps as one chunk: one forward of
    the 6 tokens, counted as one prefill pass and no decode pass; its log line ("replayed 3 steps") carries the
    request's id and the trace id of its traceparent."""
    address, metrics = mesh.workers["w0"]
    request_id = "obs-replay@0"
    steps = [[1, 5, 77, 300], [12], [9]]
    request = worker_pb2.ForwardRequest(
        request_id=request_id, session_id="obs-replay", position=0, session_ttl_s=60,
        input=codec.encode(torch.tensor([[t for s in steps for t in s]])),
        traceparent=f"00-{TRACE_ID}-00f067aa0ba902b7-01",
    )
    request.replay_step_lengths.extend(len(s) for s in steps)
    before = scrape(metrics)
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        reply = stub.Forward(request, timeout=60)
        assert codec.decode(reply.output).shape[1] == 4 + 1 + 1  # every step's hidden states (a first stage)
        assert stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="obs-replay"), timeout=10).existed
    after = scrape(metrics)
    assert delta(before, after, "shardmesh_worker_batch_size_count", kind="prefill") == 1
    assert delta(before, after, "shardmesh_worker_batch_size_sum", kind="prefill") == 1
    assert delta(before, after, "shardmesh_worker_batch_size_count", kind="decode") == 0

    def replay_lines() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in list(mesh.procs["w0"].stderr) if line.strip()]
        found = [e for e in lines if "replayed 3 steps" in str(e["msg"])]
        assert found, "the worker logged no replay line"
        return found

    for entry in retry_until(replay_lines, timeout_s=10):
        assert entry.get("request_id") == request_id, entry
        assert entry.get("trace_id") == TRACE_ID, entry


# ---------------------------------------------------------------- refusals in shardmesh_requests_total


def _requests(samples: Samples, rpc: str, code: str | None = None) -> float:
    labels = {"component": "router", "rpc": rpc} | ({"code": code} if code else {})
    return get(samples, "shardmesh_requests_total", **labels)


async def _hold(stub: router_pb2_grpc.RouterStub, i: int, started: asyncio.Event) -> None:
    """A long generation that holds one --max-inflight slot until cancelled."""
    call = stub.Generate(build_generate_request(tokens=[*PROMPT, 40 + i], max_new_tokens=900), timeout=300)
    try:
        async for event in call:
            if event.HasField("token"):
                started.set()
            else:  # it finished: it no longer holds its slot, and the refusals below would not be certain
                raise AssertionError(f"holder {i} ended before it was cancelled: {event.summary.finish_reason}")
    finally:
        call.cancel()  # the router sees the client go away


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _generate_code(
    stub: router_pb2_grpc.RouterStub, request: router_pb2.GenerateRequest, after_s: float = 0.0
) -> grpc.StatusCode:
    await asyncio.sleep(after_s)
    try:
        async for _ in stub.Generate(request, timeout=120):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _router_saw_cancel(router_metrics: str, before: Samples) -> None:
    """Waits until the router ended the cancelled holder (counted it), then a little more: the gRPC server's
    stream admission (services/transport/admission.py, --max-inflight streams) releases its stream right after,
    so the next Generate races the flood in the router's own admission."""
    for _ in range(200):
        now = await asyncio.to_thread(scrape, router_metrics)
        if _requests(now, "Generate", "CANCELLED") > _requests(before, "Generate", "CANCELLED"):
            await asyncio.sleep(0.2)
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the router never counted the cancelled Generate")


def test_refusals_are_counted_once_per_request(mesh: Mesh) -> None:
    """Two generations hold both --max-inflight slots: Infers beyond them are RESOURCE_EXHAUSTED and counted
    with that code; then a flood of concurrent Infers and a Generate beside one holder (whatever the timing,
    the counts equal what the clients saw); bad input is counted as INVALID_ARGUMENT; the cancelled holders as
    CANCELLED. Every request is counted exactly once."""
    infer = router_pb2.InferRequest(tokens=router_pb2.TokenIds(ids=[5, 6, 7]))
    big = router_pb2.InferRequest(tensor=codec.encode(torch.randint(0, 512, (8, 256), generator=torch.Generator().manual_seed(1))))

    async def run() -> dict[str, list[grpc.StatusCode]]:
        seen: dict[str, list[grpc.StatusCode]] = {"Infer": [], "Generate": []}
        # The big Infer's logits are over gRPC's default 4 MiB: a client refusing them would see RESOURCE_EXHAUSTED too.
        async with grpc.aio.insecure_channel(mesh.router, options=[("grpc.max_receive_message_length", -1)]) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            # 1. Both slots held: every Infer is refused by the router's --max-inflight.
            started = [asyncio.Event() for _ in range(MAX_INFLIGHT)]
            holders = [asyncio.create_task(_hold(stub, i, started[i])) for i in range(MAX_INFLIGHT)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 120)
            refused = await asyncio.gather(*(_code(stub.Infer(infer, timeout=60)) for _ in range(3)))
            assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3, refused
            seen["Infer"] += refused
            # A third Generate finds both stream slots taken: the gRPC server's stream admission refuses it
            # before any handler runs (services/transport/admission.py), and it is still counted.
            third = await _generate_code(stub, build_generate_request(tokens=PROMPT, max_new_tokens=4))
            assert third == grpc.StatusCode.RESOURCE_EXHAUSTED, third
            seen["Generate"].append(third)
            # 2. One holder left: a flood of slow Infers and a Generate race for the other slot.
            holders[1].cancel()
            await asyncio.gather(holders[1], return_exceptions=True)
            seen["Generate"].append(grpc.StatusCode.CANCELLED)
            await _router_saw_cancel(mesh.router_metrics, before)
            flood = [_code(stub.Infer(big, timeout=120)) for _ in range(6)]
            late = _generate_code(stub, build_generate_request(tokens=PROMPT, max_new_tokens=4), after_s=0.05)
            *codes, generate_code = await asyncio.gather(*flood, late)
            seen["Infer"] += codes
            seen["Generate"].append(generate_code)
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes  # 6 at once, 1 slot
            holders[0].cancel()
            await asyncio.gather(holders[0], return_exceptions=True)
            seen["Generate"].append(grpc.StatusCode.CANCELLED)
            # 3. Bad input, refused before any work.
            seen["Infer"].append(await _code(stub.Infer(router_pb2.InferRequest(tokens=infer.tokens, mode=99), timeout=30)))
            seen["Generate"].append(await _generate_code(stub, router_pb2.GenerateRequest(text="   ", max_new_tokens=4)))
            assert seen["Infer"][-1] == seen["Generate"][-1] == grpc.StatusCode.INVALID_ARGUMENT
        return seen

    with RouterClient(mesh.router) as client:
        retry_until(lambda: client.infer(tokens=[5, 6, 7], timeout_s=60))
    before = scrape(mesh.router_metrics)
    seen = asyncio.run(run())

    def counted() -> Samples:
        after = scrape(mesh.router_metrics)
        for rpc, codes in seen.items():
            assert _requests(after, rpc) - _requests(before, rpc) == len(codes), (rpc, codes)  # once each
            for code in set(codes):
                expected = codes.count(code)
                assert _requests(after, rpc, code.name) - _requests(before, rpc, code.name) == expected, (rpc, code)
        return after

    retry_until(counted, timeout_s=15)  # a cancelled Generate is counted when the router sees the cancel
    retry_until(lambda: _idle(mesh), timeout_s=30)
