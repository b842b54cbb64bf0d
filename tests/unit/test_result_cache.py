"""The router's Infer result cache (router/result_cache.py): keys, LRU order, byte budget, invalidation."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY

from router.result_cache import ENTRY_OVERHEAD_BYTES, KEY_BYTES, ResultCache, result_key

IDS = torch.tensor([[101, 7592, 2088, 102]])


def key(ids: torch.Tensor = IDS, mask: torch.Tensor | None = None, checksum: str = "c1") -> bytes:
    return result_key(checksum, ids, mask)


def test_key_depends_on_checksum_ids_shape_and_mask_but_not_id_dtype() -> None:
    base = key()
    assert len(base) == KEY_BYTES
    assert key() == base
    assert key(IDS.to(torch.int32)) == base  # the same ids sent as int32 are the same request
    assert key(checksum="c2") != base
    assert key(torch.tensor([[101, 7592, 2088, 103]])) != base
    assert key(IDS.reshape(2, 2)) != base  # same values, another batch shape
    assert key(mask=torch.ones_like(IDS)) != base  # a given mask is not assumed equal to none
    assert key(mask=torch.ones_like(IDS)) != key(mask=torch.tensor([[1, 1, 1, 0]]))


def test_hit_returns_the_stored_bytes_and_counts() -> None:
    cache = ResultCache(10_000)
    assert cache.get("c1", key()) is None
    assert cache.put("c1", key(), b"output-bytes")
    assert cache.get("c1", key()) == b"output-bytes"
    assert cache.get("c1", key(torch.tensor([[1, 2]]))) is None
    assert (cache.stats.hits, cache.stats.misses) == (1, 2)


def test_budget_counts_key_value_and_overhead_and_evicts_least_recently_used() -> None:
    value = b"x" * 1000
    entry = KEY_BYTES + len(value) + ENTRY_OVERHEAD_BYTES
    cache = ResultCache(2 * entry + entry // 2)  # room for two entries
    a, b, c = (key(torch.tensor([[i]])) for i in (1, 2, 3))
    assert cache.put("c1", a, value) and cache.put("c1", b, value)
    assert cache.used_bytes == 2 * entry
    assert cache.get("c1", a) == value  # a is now the most recently used
    assert cache.put("c1", c, value)
    assert len(cache) == 2 and cache.used_bytes == 2 * entry <= cache.max_bytes
    assert cache.get("c1", b) is None  # b was least recently used
    assert cache.get("c1", a) == value and cache.get("c1", c) == value
    assert cache.stats.evictions == 1


def test_replacing_a_key_does_not_double_count() -> None:
    cache = ResultCache(10_000)
    cache.put("c1", key(), b"a" * 100)
    cache.put("c1", key(), b"b" * 300)
    assert len(cache) == 1 and cache.used_bytes == KEY_BYTES + 300 + ENTRY_OVERHEAD_BYTES
    assert cache.get("c1", key()) == b"b" * 300


def test_entry_larger_than_the_budget_is_not_stored_and_evicts_nothing() -> None:
    cache = ResultCache(1000)
    assert cache.put("c1", key(torch.tensor([[1]])), b"small")
    assert not cache.put("c1", key(), b"x" * 1000)
    assert len(cache) == 1 and cache.stats.evictions == 0
    assert not ResultCache(0).put("c1", key(), b"")


def test_checksum_change_empties_the_cache() -> None:
    cache = ResultCache(10_000)
    cache.put("c1", key(checksum="c1"), b"old weights")
    assert cache.get("c2", key(checksum="c1")) is None  # even a key built for c1 is gone
    assert len(cache) == 0 and cache.used_bytes == 0 and cache.stats.invalidations == 1
    cache.put("c2", key(checksum="c2"), b"new weights")
    assert cache.get("c2", key(checksum="c2")) == b"new weights"
    assert cache.follow("c2") is False


def test_exported_metrics_follow_lookups_and_size() -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    hits, misses = sample("shardmesh_result_cache_lookups_total", result="hit"), sample(
        "shardmesh_result_cache_lookups_total", result="miss"
    )
    cache = ResultCache(10_000, export=True)
    cache.get("c1", key())
    cache.put("c1", key(), b"v" * 10)
    cache.get("c1", key())
    assert sample("shardmesh_result_cache_lookups_total", result="hit") == hits + 1
    assert sample("shardmesh_result_cache_lookups_total", result="miss") == misses + 1
    assert sample("shardmesh_result_cache_bytes") == KEY_BYTES + 10 + ENTRY_OVERHEAD_BYTES
    assert sample("shardmesh_result_cache_entries") == 1


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ResultCache(-1)
