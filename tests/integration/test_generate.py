"""Sharded generation through real worker processes: tokens identical to transformers' ``generate``,
failover mid-generation, and session resources freed on every worker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
import pytest
import torch

from services.client import AsyncRouterClient, RouterClient, build_generate_request
from services.errors import ResourceExhausted
from services.gen.shardmesh.v1 import router_pb2, worker_pb2, worker_pb2_grpc
from services.models.registry import resolve_model
from services.wire import codec
from tests.fault_worker import start_fault_worker
from tests.procs import UpMesh, describe_all, mesh_up, start_router, start_worker, wait_serving, worker_channel

pytestmark = [pytest.mark.integration]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def _reference(model_name: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from transformers import LlamaForCausalLM

    model = _models.setdefault(
        model_name,
        LlamaForCausalLM.from_pretrained(str(resolve_model(model_name).model_dir), torch_dtype=torch.float32).eval(),
    )
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


_models: dict[str, object] = {}


def _sessions(mesh: UpMesh) -> dict[str, int]:
    return {name: reply.capacity.sessions for name, reply in describe_all(mesh).items()}  # type: ignore[attr-defined]


def _until(probe, accept, timeout_s: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if accept(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.mark.parametrize("split", [["0:6"], ["0:1", "1:5", "5:6"], ["0:2", "2:4", "4:6"]], ids=",".join)
def test_tiny_llama_greedy_equals_transformers_generate(split: list[str]) -> None:
    prompts = [[1, 5, 77, 300, 12, 9], [1, 400, 3], list(range(1, 40))]
    config = {"model": "tiny-llama", "workers": [{"layers": s} for s in split], "worker_args": ["--no-batching"]}
    with mesh_up(config) as mesh, RouterClient(mesh.router) as client:
        for mode in ("direct", "relay"):
            for prompt in prompts:
                result = client.generate(tokens=prompt, max_new_tokens=16, mode=mode)
                assert list(result.token_ids) == _reference("tiny-llama", prompt, 16), (mode, prompt)
                assert len(result.route) == len(split)
        assert _until(lambda: _sessions(mesh), lambda c: not any(c.values())) == {w: 0 for w in mesh.workers}


@pytest.fixture(scope="module")
def smollm2_mesh() -> Iterator[UpMesh]:
    config = {
        "model": "smollm2",
        "workers": [{"layers": "0:10"}, {"layers": "10:20", "replicas": 2}, {"layers": "20:30"}],
        "router_args": ["--hop-timeout-ms", "20000"],
    }
    with mesh_up(config, timeout_s=600) as mesh:
        yield mesh


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smollm2_mesh: UpMesh) -> None:
    tokenizer = _tokenizer()
    with RouterClient(smollm2_mesh.router) as client:
        for prompt in PROMPTS[:2]:
            ids = tokenizer(prompt)["input_ids"]
            expected = _reference("smollm2", ids, 12)
            result = client.generate(text=prompt, max_new_tokens=12)
            assert list(result.token_ids) == expected, prompt
            assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
            assert result.ttft_ms > 0 and result.tokens_per_s > 0


def _tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model("smollm2").model_dir))


async def _stream_with_fault(
    mesh: UpMesh, request: router_pb2.GenerateRequest, after_tokens: int, fault: Callable[[int], Awaitable[None]]
) -> tuple[str, list[int], router_pb2.GenerateSummary | None]:
    """Streams a generation; after ``after_tokens`` tokens, applies ``fault`` to the pid of the stage-1 replica
    (w1r0 or w1r1) that holds the session. Returns that replica's name, the tokens and the summary."""
    victim = ""
    tokens: list[int] = []
    async with AsyncRouterClient(mesh.router) as client:
        async for event in client.generate_stream(request, 300):
            if event.HasField("summary"):
                return victim, tokens, event.summary
            tokens.append(event.token.token_id)
            if len(tokens) == after_tokens:
                counts = await asyncio.to_thread(_sessions, mesh)
                victim = next(name for name in ("w1r0", "w1r1") if counts[name] == 1)
                await fault(int(mesh.workers[victim]["pid"]))
    return victim, tokens, None


@pytest.mark.slow
async def test_killing_a_worker_mid_generation_keeps_the_tokens(smollm2_mesh: UpMesh) -> None:
    tokenizer = _tokenizer()
    prompt = PROMPTS[2]
    expected = _reference("smollm2", tokenizer(prompt)["input_ids"], 24)

    async def kill(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    request = build_generate_request(text=prompt, max_new_tokens=24)
    victim, tokens, summary = await _stream_with_fault(smollm2_mesh, request, 6, kill)
    assert victim and summary is not None
    assert summary.failovers >= 1 and victim not in summary.route
    assert tokens == expected and list(summary.token_ids) == expected


@pytest.mark.slow
async def test_concurrent_sessions_batch_and_match_sequential(smollm2_mesh: UpMesh) -> None:
    tokenizer = _tokenizer()
    prompts = [f"{p} ({i})" for i, p in enumerate(PROMPTS * 3)][:8]
    async with AsyncRouterClient(smollm2_mesh.router) as client:
        sequential = [(await client.generate(text=p, max_new_tokens=8)).token_ids for p in prompts]
        concurrent = await asyncio.gather(*(client.generate(text=p, max_new_tokens=8) for p in prompts))
    assert [r.token_ids for r in concurrent] == sequential
    assert all(len(t) == 8 for t in sequential)
    del tokenizer


def test_session_resources_are_freed() -> None:
    config = {
        "model": "tiny-llama",
        "workers": [{"layers": "0:3"}, {"layers": "3:6", "args": ["--session-ttl-s", "1", "--cache-budget-mb", "1"]}],
    }
    hidden_size = resolve_model("tiny-llama").hidden_size
    with mesh_up(config) as mesh, RouterClient(mesh.router) as client, worker_channel(mesh, "w1") as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)

        def open_session(session_id: str, tokens: int, position: int = 0, ttl_s: int = 0) -> None:
            hidden = codec.encode(torch.zeros(1, tokens, hidden_size))
            request = worker_pb2.ForwardRequest(
                request_id=session_id, input=hidden, session_id=session_id, position=position, session_ttl_s=ttl_s
            )
            stub.Forward(request, timeout=10)

        # Budget: one session of 900 tokens fits in 1 MiB of cache on layers 3:6; a second does not, and the
        # caller gets RESOURCE_EXHAUSTED with the numbers. The big session asks for its own long TTL: with the
        # worker's 1 s default it could expire before a slow machine's generation reaches w1 (CI saw that).
        open_session("big", 900, ttl_s=120)
        with pytest.raises(ResourceExhausted, match=r"cache budget 1(\.0)? MiB full: 1 sessions use"):
            client.generate(tokens=[1] * 900, max_new_tokens=2)
        assert stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="big"), timeout=5).existed
        assert _until(lambda: _sessions(mesh), lambda c: not any(c.values())) == {"w0": 0, "w1": 0}

        # TTL: an abandoned session expires on the worker.
        open_session("abandoned", 4)
        assert _sessions(mesh)["w1"] == 1
        # A step at the wrong position is refused with both numbers (no silent off-by-one).
        with pytest.raises(grpc.RpcError) as info:
            open_session("abandoned", 1, position=7)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "position 7" in info.value.details() and "holds 4 tokens" in info.value.details()
        assert _until(lambda: _sessions(mesh), lambda c: c["w1"] == 0, 10)["w1"] == 0

    # Client disconnect: a cancelled generation frees its session on every worker.
    with mesh_up({"model": "tiny-llama", "workers": [{"layers": "0:3"}, {"layers": "3:6"}]}) as mesh:

        async def start_and_cancel() -> None:
            async with AsyncRouterClient(mesh.router) as client:
                stream = client.generate_stream(build_generate_request(tokens=[1, 2, 3], max_new_tokens=2000), 60)
                seen = 0
                async for _ in stream:
                    seen += 1
                    if seen == 3:
                        counts = await asyncio.to_thread(_sessions, mesh)
                        assert counts == {"w0": 1, "w1": 1}
                        break
                await stream.aclose()

        asyncio.run(start_and_cancel())
        assert _until(lambda: _sessions(mesh), lambda c: not any(c.values())) == {"w0": 0, "w1": 0}


def _describe_sessions(addresses: dict[str, str]) -> dict[str, int]:
    replies = {}
    for name, address in addresses.items():
        with grpc.insecure_channel(address) as channel:
            reply = worker_pb2_grpc.ShardWorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=5)
            replies[name] = reply.capacity.sessions
    return replies


def test_lost_and_refused_sessions_are_replayed_and_closed() -> None:
    """Issue 14 defect 6: a worker that lost the session (NOT_FOUND, as after a restart at the same address)
    or refuses a step's position gets the bounded replay, and the stale session on that live worker is closed."""
    started = {
        "w0": start_worker("tiny-llama", "0:2", "--no-batching", "--threads", "1"),
        "w1": start_fault_worker("lose-session:4", "tiny-llama", "2:4", "--no-batching", "--threads", "1"),
        "w2": start_fault_worker("shift-position:10", "tiny-llama", "4:6", "--no-batching", "--threads", "1"),
    }
    addresses = {name: address for name, (_, address) in started.items()}
    try:
        for address in addresses.values():
            wait_serving(address)
        router, router_address = start_router(list(addresses.values()))
        wait_serving(router_address)
        prompt = [1, 5, 77, 300, 12, 9]
        with RouterClient(router_address) as client:
            result = client.generate(tokens=prompt, max_new_tokens=24)
        assert list(result.token_ids) == _reference("tiny-llama", prompt, 24)
        assert result.failovers == 2, "both injected faults must have hit the generation and been replayed"
        counts = _until(lambda: _describe_sessions(addresses), lambda c: not any(c.values()), 10)
        assert counts == {"w0": 0, "w1": 0, "w2": 0}, counts
        router.stop()
    finally:
        for proc, _ in started.values():
            proc.stop()


def test_failover_mid_generation_closes_the_old_session_on_the_live_worker() -> None:
    """A hop that timed out (hung, then alive again) still holds the old session: the router closes it."""
    config = {
        "model": "tiny-llama",
        "workers": [{"layers": "0:3"}, {"layers": "3:6", "replicas": 2}],
        "worker_args": ["--no-batching", "--threads", "1"],
        "router_args": ["--hop-timeout-ms", "500"],
    }
    prompt = [1, 400, 3, 18]
    expected = _reference("tiny-llama", prompt, 500)

    async def hang_then_resume(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(1.5)
        os.kill(pid, signal.SIGCONT)

    with mesh_up(config) as mesh:
        request = build_generate_request(tokens=prompt, max_new_tokens=500)
        victim, tokens, summary = asyncio.run(_stream_with_fault(mesh, request, 3, hang_then_resume))
        assert summary is not None and summary.failovers >= 1 and victim not in summary.route
        assert tokens == expected
        counts = _until(lambda: _sessions(mesh), lambda c: not any(c.values()), 10)
        assert counts == {w: 0 for w in mesh.workers}, counts
