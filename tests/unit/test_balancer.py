"""Power-of-two-choices replica selection and the peak-EWMA stats it reads."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.planning.balancer import DEFAULT_LATENCY_S, ReplicaStats, choose_replica
from router.planning.types import WorkerInfo
from services.errors import Unavailable
from services.layers import LayerSpan


def replica(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id, f"{worker_id}:1", "m", "llama", LayerSpan(0, 4), 4, "abc")


def stats_with(outstanding: int = 0, latency_s: float | None = None) -> ReplicaStats:
    stats = ReplicaStats()
    for _ in range(outstanding):
        stats.start()
    if latency_s is not None:
        stats.observe(latency_s, now=0.0)
    return stats


def test_prefers_less_loaded_of_two() -> None:
    replicas = [replica("busy"), replica("idle")]
    stats = {"busy": stats_with(outstanding=5, latency_s=0.1), "idle": stats_with(outstanding=0, latency_s=0.1)}
    rng = random.Random(1)
    assert {choose_replica(replicas, stats, rng).worker_id for _ in range(50)} == {"idle"}


def test_prefers_faster_at_equal_load() -> None:
    replicas = [replica("slow"), replica("fast")]
    stats = {"slow": stats_with(latency_s=0.5), "fast": stats_with(latency_s=0.05)}
    assert choose_replica(replicas, stats, random.Random(3)).worker_id == "fast"


def test_unknown_latency_is_neutral_so_load_decides() -> None:
    replicas = [replica("new"), replica("known")]
    stats = {"new": stats_with(outstanding=0), "known": stats_with(outstanding=2, latency_s=0.01)}
    assert choose_replica(replicas, stats, random.Random(0)).worker_id == "new"
    assert choose_replica(replicas, {}, random.Random(0)).worker_id in {"new", "known"}


def test_respects_exclude() -> None:
    replicas = [replica("a"), replica("b"), replica("c")]
    stats = {"a": stats_with(latency_s=0.001)}
    rng = random.Random(7)
    picks = {choose_replica(replicas, stats, rng, exclude=frozenset({"a"})).worker_id for _ in range(100)}
    assert picks == {"b", "c"}
    assert choose_replica(replicas, stats, rng, exclude=frozenset({"a", "b"})).worker_id == "c"


def test_all_excluded_is_unavailable() -> None:
    with pytest.raises(Unavailable, match=r"no replica left for layers 0:4: all 2 are excluded \(a, b\)"):
        choose_replica([replica("a"), replica("b")], {}, random.Random(0), exclude=frozenset({"a", "b"}))


def test_statistical_spread_with_seeded_rng() -> None:
    replicas = [replica(f"w{i}") for i in range(4)]
    rng = random.Random(42)
    counts = Counter(choose_replica(replicas, {}, rng).worker_id for _ in range(4000))
    assert set(counts) == {"w0", "w1", "w2", "w3"}
    assert all(800 < n < 1200 for n in counts.values()), counts
    # With one replica heavily loaded, two choices almost never pick it (only if sampled twice: impossible).
    stats = {"w0": stats_with(outstanding=10, latency_s=0.05)}
    loaded = Counter(choose_replica(replicas, stats, rng).worker_id for _ in range(4000))
    assert loaded["w0"] == 0


def test_peak_ewma_takes_spikes_at_once_and_decays_back() -> None:
    stats = ReplicaStats(decay_s=10.0)
    stats.observe(0.1, now=0.0)
    stats.observe(1.0, now=1.0)
    assert stats.latency_ewma_s == 1.0
    stats.observe(0.1, now=1.0)  # no time passed: the peak stays
    assert stats.latency_ewma_s == pytest.approx(1.0)
    stats.observe(0.1, now=101.0)  # ten time constants later: nearly forgotten
    assert stats.latency_ewma_s == pytest.approx(0.1, abs=1e-3)


def test_outstanding_and_cost() -> None:
    stats = ReplicaStats()
    assert stats.cost() == DEFAULT_LATENCY_S
    stats.start()
    stats.start()
    stats.finish()
    assert stats.outstanding == 1
    stats.observe(0.2, now=0.0)
    assert stats.cost() == pytest.approx(0.4)
    stats.finish()
    stats.finish()
    assert stats.outstanding == 0


def test_p95_estimate_uses_a_bounded_ring() -> None:
    stats = ReplicaStats(window=20)
    assert stats.p95_estimate() is None
    for i in range(100):
        stats.observe(i / 1000, now=float(i))
    assert stats.p95_estimate() == pytest.approx(0.098)  # only 0.080..0.099 kept
