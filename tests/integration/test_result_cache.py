"""The router's Infer result cache (--cache-mb) through real router and worker processes: a repeated input is
answered from the cache with the identical output bytes (in either mode), a new text is a miss, and the byte
budget evicts the least recently used entry. Outputs are checked against sentence-transformers."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
import torch

from services.client import AsyncRouterClient, build_request
from services.gen.shardmesh.v1 import router_pb2
from services.models.registry import resolve_model
from services.wire import codec
from tests.procs import mesh_up

pytestmark = [pytest.mark.integration]

TEXTS = {
    "a": "The router answers a repeated request from its cache.",
    "b": "A different text is computed by the workers.",
    "c": "A third text pushes the least recently used entry out.",
}
# minilm's output is one 384-float embedding (~1.5 KiB on the wire, ~1.75 KiB as an entry): two fit, three do not.
CACHE_MB = 0.004


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("shardmesh_result_cache"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_repeated_input_is_a_hit_with_identical_bytes_and_the_budget_holds() -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")
    port = _free_port()
    config = {
        "model": "minilm",
        "workers": [{"layers": "0:3"}, {"layers": "3:6"}],
        "router_args": ["--cache-mb", str(CACHE_MB), "--metrics-listen", f"127.0.0.1:{port}"],
    }
    hits = 'shardmesh_result_cache_lookups_total{result="hit"}'
    misses = 'shardmesh_result_cache_lookups_total{result="miss"}'

    async def ask(client: AsyncRouterClient, key: str, mode: str = "direct") -> router_pb2.InferResponse:
        return await client.infer_raw(build_request(text=TEXTS[key], mode=mode), timeout_s=60)

    async def scenario(router: str) -> None:
        async with AsyncRouterClient(router) as client:
            first = await ask(client, "a")
            assert len(first.route) == 2 and first.attempts == 1
            expected = reference.encode(TEXTS["a"], convert_to_tensor=True)
            assert torch.equal(codec.decode(first.output).reshape(expected.shape), expected)
            assert (_metrics(port)[hits], _metrics(port)[misses]) == (0, 1)

            again = await ask(client, "a")
            assert again.output.SerializeToString() == first.output.SerializeToString()
            assert list(again.route) == [] and list(again.hops) == [] and again.attempts == 0  # served by the cache
            assert (_metrics(port)[hits], _metrics(port)[misses]) == (1, 1)

            other = await ask(client, "b")
            assert len(other.route) == 2 and other.attempts == 1
            assert not torch.equal(codec.decode(other.output), codec.decode(first.output))
            assert (_metrics(port)[hits], _metrics(port)[misses]) == (1, 2)

            relayed = await ask(client, "a", mode="relay")  # same weights, same ids: the mode does not matter
            assert list(relayed.route) == [] and relayed.output.SerializeToString() == first.output.SerializeToString()
            assert _metrics(port)[hits] == 2

            await ask(client, "c")  # a was used last, so b (least recently used) is evicted
            m = _metrics(port)
            assert m["shardmesh_result_cache_entries"] == 2 and m["shardmesh_result_cache_evictions_total"] == 1
            assert 0 < m["shardmesh_result_cache_bytes"] <= CACHE_MB * 2**20
            assert len((await ask(client, "b")).route) == 2  # evicted: computed again
            assert list((await ask(client, "c")).route) == []  # still cached
            assert _metrics(port)[misses] == 4 and _metrics(port)[hits] == 3

    with mesh_up(config) as mesh:
        asyncio.run(scenario(mesh.router))
