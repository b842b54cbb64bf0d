"""Dynamic batching through real processes: concurrent requests share forwards on every stage (hop records
say so), in direct and relay mode, and still equal sentence-transformers within the documented bound; ``--max-batch-size 1`` is
bit-exact; a request cancelled while it waits in a batch leaves it without touching its batch-mates.

A long ``--max-queue-delay-us`` makes the batches deterministic on a loaded machine: requests sent
together are queued together whatever the scheduling of the test's own threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
import torch

from services.client import AsyncRouterClient
from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.models.registry import resolve_model
from services.wire import codec
from tests.procs import mesh_up, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

BOUND = 1e-5  # docs/architecture.md "Dynamic batching": minilm batched vs solo, measured <= 5.5e-6
DELAY_US = "400000"  # 0.4 s for batch-mates to arrive
TEXTS = [
    "Sharded inference must equal the single-process model.",
    "Short one.",
    "Routers send activations between shard workers.",
    "Batching shares one forward between requests.",
    "Consul tells the router where the workers are.",
    "A cancelled request must not hurt its batch-mates.",
]


@pytest.fixture(scope="module")
def sentence_model():  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")


async def _infer_all(router: str, texts: list[str], mode: str | None = None) -> list[object]:
    async with AsyncRouterClient(router) as client:
        await client.wait_ready(120)
        return list(await asyncio.gather(*(client.infer(text=t, timeout_s=120, mode=mode) for t in texts)))


def test_concurrent_requests_are_batched_on_every_stage_within_the_bound(sentence_model) -> None:  # type: ignore[no-untyped-def]
    split = ["0:2", "2:4", "4:6"]
    config = {
        "model": "minilm",
        "workers": [{"layers": s} for s in split],
        "worker_args": ["--max-batch-size", "8", "--max-queue-delay-us", DELAY_US],
    }
    with mesh_up(config) as mesh:
        by_mode = {mode: asyncio.run(_infer_all(mesh.router, TEXTS, mode)) for mode in ("direct", "relay")}
    for mode, results in by_mode.items():
        for text, result in zip(TEXTS, results, strict=True):
            expected = sentence_model.encode(text, convert_to_tensor=True)
            got = result.output.reshape(expected.shape)  # type: ignore[attr-defined]
            assert (got - expected).abs().max().item() <= BOUND, (mode, text)
            assert [h.layers.start for h in result.hops] == [0, 2, 4]  # type: ignore[attr-defined]
        # Every stage ran requests together (in relay mode each member is relayed on its own afterwards).
        for stage in range(3):
            sizes = [r.hops[stage].batch_size for r in results]  # type: ignore[attr-defined]
            assert max(sizes) > 1, f"{mode}: stage {stage} never batched: {sizes}"
            assert all(1 <= s <= 8 for s in sizes) and sum(sizes) >= len(TEXTS), sizes


def test_max_batch_size_1_is_bit_exact_under_concurrency(sentence_model) -> None:  # type: ignore[no-untyped-def]
    config = {
        "model": "minilm",
        "workers": [{"layers": "0:3"}, {"layers": "3:6"}],
        "worker_args": ["--max-batch-size", "1", "--max-queue-delay-us", DELAY_US],
    }
    with mesh_up(config) as mesh:
        results = asyncio.run(_infer_all(mesh.router, TEXTS))
    for text, result in zip(TEXTS, results, strict=True):
        expected = sentence_model.encode(text, convert_to_tensor=True)
        assert torch.equal(result.output.reshape(expected.shape), expected), text  # type: ignore[attr-defined]
        assert [h.batch_size for h in result.hops] == [1, 1]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def batching_worker() -> Iterator[str]:
    proc, address = start_worker("minilm", "0:6", "--max-batch-size", "8", "--max-queue-delay-us", DELAY_US)
    try:
        wait_serving(address)
        yield address
    finally:
        proc.stop()


async def test_a_request_cancelled_in_a_batch_leaves_it_and_the_others_are_served(
    batching_worker: str, sentence_model  # type: ignore[no-untyped-def]
) -> None:
    from services.models.registry import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("minilm"))
    texts = TEXTS[:4]
    async with grpc.aio.insecure_channel(batching_worker) as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        calls = []
        for text in texts:
            ids, mask = tokenizer.encode(text)
            request = worker_pb2.ForwardRequest(
                request_id=f"r-{len(calls)}",
                input=codec.encode(torch.tensor([ids])),
                attention_mask=codec.encode(torch.tensor([mask])),
            )
            calls.append(stub.Forward(request, timeout=120))
        await asyncio.sleep(0.1)  # all four are queued, waiting for batch-mates
        calls[1].cancel()
        replies = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(replies[1], asyncio.CancelledError) or (
        isinstance(replies[1], grpc.aio.AioRpcError) and replies[1].code() == grpc.StatusCode.CANCELLED
    ), replies[1]
    for i in (0, 2, 3):
        reply = replies[i]
        assert isinstance(reply, worker_pb2.ForwardResponse), reply
        assert reply.hops[-1].batch_size == 3, [h.batch_size for h in reply.hops]
        expected = sentence_model.encode(texts[i], convert_to_tensor=True)
        got = codec.decode(reply.output).reshape(expected.shape)
        assert (got - expected).abs().max().item() <= BOUND, texts[i]
