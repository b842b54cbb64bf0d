"""Automatic prefix caching and batched prefills: block digests, exact-id hits, LRU eviction within the
session budget, prefill grouping, and (tiny-llama, three stages) outputs equal to solo prefills."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.errors import ResourceExhausted
from services.layers import LayerSpan
from services.models.base import ModelSource
from services.models.generation import SamplingParams, generate_reference
from services.models.kv_cache import SessionCache, SessionCacheStore, kv_bytes_per_token
from services.models.llama import LlamaStage
from services.models.prefix_cache import PrefixBlock, PrefixCache, block_digests, make_blocks
from services.models.registry import load_stage, resolve_model
from shard_worker.engine import StageEngine
from shard_worker.sessions import PREFILL_PAD_TOKENS, SessionService, prefill_groups

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 2, 2, 8, 4
PER_TOKEN = kv_bytes_per_token(LAYERS, KV_HEADS, HEAD_DIM, torch.float32)


def filled(session_id: str, tokens: int) -> SessionCache:
    session = SessionCache(session_id)
    for layer in range(LAYERS):
        kv = torch.randn(1, KV_HEADS, tokens, HEAD_DIM)
        session.cache.update(kv, kv.clone(), layer)
    session.advance(tokens)
    return session


def cache_prompt(store: SessionCacheStore, ids: list[int]) -> int:
    x = torch.tensor([ids])
    digests, _ = store.prefix_match(x)
    return store.prefix_insert(x, digests, filled("p", len(ids)), None)


# --- pure logic -------------------------------------------------------------------------------------


def test_digests_are_chained_over_full_blocks_only() -> None:
    a = block_digests(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]]), BLOCK)
    b = block_digests(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), BLOCK)
    c = block_digests(torch.tensor([[9, 2, 3, 4, 5, 6, 7, 8]]), BLOCK)
    assert len(a) == 2 and a == b  # the partial ninth token names no block
    assert c[0] != a[0] and c[1] != a[1]  # block 2 is named by everything before it too
    hidden = torch.randn(1, 8, 3)
    assert block_digests(hidden, BLOCK) == block_digests(hidden.clone(), BLOCK)
    assert block_digests(hidden.to(torch.float16), BLOCK) != block_digests(hidden, BLOCK)


def test_a_hit_needs_the_very_same_token_ids_not_only_the_digest() -> None:
    cache = PrefixCache(BLOCK)
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    digests = block_digests(x, BLOCK)
    for block in make_blocks(x, digests, [0, 1], filled("a", 8).layer_kv(), None, BLOCK):
        cache.insert(block)
    assert len(cache.match(x, digests)) == 2
    # A forged collision: other ids presented under the cached digests reuse nothing.
    other = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 9]])
    assert len(cache.match(other, digests)) == 1
    assert cache.match(torch.tensor([[0, 2, 3, 4]]), digests[:1]) == []


def test_blocks_are_evicted_least_recently_used_first() -> None:
    cache = PrefixCache(BLOCK)
    blocks = []
    for first in (10, 20, 30):
        x = torch.tensor([[first, 1, 2, 3]])
        d = block_digests(x, BLOCK)
        blocks.append((x, d))
        cache.insert(make_blocks(x, d, [0], filled("s", 4).layer_kv(), None, BLOCK)[0])
    one = cache.nbytes // 3
    cache.match(*blocks[0])  # touched: now the most recent
    assert cache.evict(one) == one
    assert [len(cache.match(x, d)) for x, d in blocks] == [1, 0, 1]
    assert cache.evictions == 1 and cache.nbytes == 2 * one


def test_cached_prefixes_count_in_the_budget_and_go_before_a_session_is_refused() -> None:
    store = SessionCacheStore(budget_bytes=40 * PER_TOKEN, bytes_per_token=PER_TOKEN, prefix=PrefixCache(BLOCK))
    assert cache_prompt(store, list(range(16))) == 4
    assert store.prefix_bytes >= 16 * PER_TOKEN and store.bytes_used == store.prefix_bytes
    # A session that needs the room gets it: the cached blocks are evicted, not the session refused.
    store.open("s", ttl_s=60, now=0, reserve_tokens=30)
    session = store.prepare_step("s", 0, 30, now=0)
    for layer in range(LAYERS):
        kv = torch.zeros(1, KV_HEADS, 30, HEAD_DIM)
        session.cache.update(kv, kv.clone(), layer)
    session.advance(30)
    assert store.prefix_bytes < 16 * PER_TOKEN
    assert store.bytes_used <= store.budget_bytes
    # Live sessions fill the budget: a prefill caches nothing rather than squeeze them.
    assert cache_prompt(store, list(range(100, 132))) == 0
    # And beyond what sessions alone hold, the refusal is the usual one.
    with pytest.raises(ResourceExhausted, match="cache budget"):
        store.prepare_step("s", 30, 11, now=0)


def test_prefill_groups_bound_padding_rows_and_tokens() -> None:
    lengths = [10, 200, 12, 40, 41, 205, 500, 11]
    groups = prefill_groups(lengths, max_rows=3, max_tokens=4096)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        rows = [lengths[i] for i in group]
        assert max(rows) - min(rows) <= max(PREFILL_PAD_TOKENS, min(rows) // 4)
        assert len(rows) <= 3 and len(rows) * max(rows) <= 4096
    assert [sorted(lengths[i] for i in g) for g in groups] == [[10, 11, 12], [40, 41], [200, 205], [500]]
    assert prefill_groups([3000, 3000], max_rows=8, max_tokens=4096) == [[0], [1]]


# --- on a real stage ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> list[LlamaStage]:
    source: ModelSource = resolve_model("tiny-llama", cache_dir=tmp_path_factory.mktemp("cache"))
    spans = ("0:2", "2:4", "4:6")
    loaded = [load_stage(source, LayerSpan.parse(s)) for s in spans]
    assert all(isinstance(s, LlamaStage) for s in loaded)
    return loaded  # type: ignore[return-value]


def solo(stages: list[LlamaStage], ids: list[int]) -> tuple[torch.Tensor, list[SessionCache]]:
    caches = [SessionCache(f"solo-{i}") for i in range(len(stages))]
    x = torch.tensor([ids])
    for stage, cache in zip(stages, caches, strict=True):
        x = stage.step(x, session_cache=cache, position=0)
    return x, caches


def test_a_batched_prefill_equals_solo_prefills_and_fills_each_cache(stages: list[LlamaStage]) -> None:
    prompts = [[1, 5, 77, 300, 12, 9], [1, 400, 3], list(range(1, 40)), [7] * 20]
    xs = [torch.tensor([p]) for p in prompts]
    caches = [[SessionCache(f"b{j}-{k}") for k in range(len(stages))] for j in range(len(prompts))]
    for k, stage in enumerate(stages):
        xs = stage.prefill_batch([(x, caches[j][k]) for j, x in enumerate(xs)])
    for j, prompt in enumerate(prompts):
        expected, solo_caches = solo(stages, prompt)
        assert xs[j].shape == expected.shape == (1, 1, stages[-1].config.vocab_size)
        torch.testing.assert_close(xs[j], expected, rtol=0, atol=1e-4)
        for mine, theirs in zip(caches[j], solo_caches, strict=True):
            assert mine.position == len(prompt)
            for (k1, v1), (k2, v2) in zip(mine.layer_kv(), theirs.layer_kv(), strict=True):
                assert k1.shape == k2.shape
                torch.testing.assert_close(k1, k2, rtol=0, atol=1e-4)
                torch.testing.assert_close(v1, v2, rtol=0, atol=1e-4)


async def test_sessions_reuse_a_shared_prefix_and_batch_their_prefills(stages: list[LlamaStage]) -> None:
    engines = [StageEngine(stage, f"w{i}", 8) for i, stage in enumerate(stages)]
    services = [SessionService(s, e, budget_bytes=64 << 20, default_ttl_s=60) for s, e in zip(stages, engines, strict=True)]
    shared = list(range(3, 3 + 40))  # 2 full blocks of 16 and 8 more tokens
    prompts = [shared + [500, 501, 502], shared + [7, 8], [9, 10, 11, 12, 13]]
    params = SamplingParams()

    async def generate(ids: list[int], sid: str, steps: int) -> list[int]:
        x, position, tokens = torch.tensor([ids]), 0, []
        for _ in range(steps):
            length = int(x.shape[1])
            for service in services:
                x = await service.step(sid, position, 60, x, None)
            tokens.append(int(x.reshape(-1).argmax()))
            position += length
            x = torch.tensor([[tokens[-1]]])
        return tokens

    try:
        first = await generate(prompts[0], "a", 6)
        assert first == generate_reference(stages, prompts[0], 6, params)
        assert all(s.store.prefix is not None and len(s.store.prefix) == 2 for s in services)
        # Every stage reuses the 32 shared positions (later stages by the bytes they receive) and still
        # generates what one process does.
        second = await generate(prompts[1], "b", 6)
        assert second == generate_reference(stages, prompts[1], 6, params)
        assert [s.prefix_tokens_reused for s in services] == [32, 32, 32]
        # Prefills that arrive together run as one forward pass (prompts that share no cached block).
        fresh = [[100 + i, 5, 6, 7, 8, 9 + i] for i in range(4)] + [[200, 201, 202]]
        together = await asyncio.gather(*(generate(p, f"c{i}", 3) for i, p in enumerate(fresh)))
        assert together == [generate_reference(stages, p, 3, params) for p in fresh]
        assert all(s.prefill_batches >= 1 for s in services)
        assert services[0].store.bytes_used >= services[0].store.prefix_bytes > 0
    finally:
        for engine in engines:
            engine.close()


async def test_no_batching_means_no_prefix_cache_and_solo_prefills(stages: list[LlamaStage]) -> None:
    engine = StageEngine(stages[0], "w0", 8)
    service = SessionService(stages[0], engine, budget_bytes=64 << 20, default_ttl_s=60, batching=False)
    try:
        ids = torch.tensor([list(range(3, 40))])
        for sid in ("a", "b"):
            out = await service.step(sid, 0, 60, ids, None)
            assert torch.equal(out, solo(stages[:1], ids[0].tolist())[0])  # bit for bit
        assert service.store.prefix is None and service.prefix_tokens_reused == 0
    finally:
        engine.close()


def test_prefix_block_equality_is_by_identity_of_content() -> None:
    block = PrefixBlock(b"d", (1, 2), [(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))], None)
    assert block.nbytes == 2 * 16 + 16
