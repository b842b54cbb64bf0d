"""The --balancer policies (router/planning/balancers.py): pure choices over one stage's replicas."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.planning.balancers import (
    POLICIES,
    Balancer,
    RoundRobin,
    capacity_weights,
    least_connections,
    least_response_time,
    weighted,
)
from router.planning.types import WorkerInfo
from services.errors import ConfigError, Unavailable
from services.layers import LayerSpan
from tests.unit.test_balancer import stats_with


def replica(worker_id: str, span: LayerSpan = LayerSpan(0, 4), speed: float = 0.0) -> WorkerInfo:
    return WorkerInfo(worker_id, f"{worker_id}:1", "m", "llama", span, 8, "abc", speed=speed)


def test_round_robin_alternates_exactly_and_keeps_one_turn_per_stage() -> None:
    rr = RoundRobin()
    rng = random.Random(0)
    first = [replica("a"), replica("b")]
    second = [replica("c", LayerSpan(4, 8)), replica("d", LayerSpan(4, 8)), replica("e", LayerSpan(4, 8))]
    picks = []
    for _ in range(6):  # a request in direct mode: stage 0, then stage 1
        picks.append(rr(first, {}, rng).worker_id)
        picks.append(rr(second, {}, rng).worker_id)
    assert picks[0::2] == ["a", "b"] * 3
    assert picks[1::2] == ["c", "d", "e"] * 2


def test_round_robin_ignores_load_and_latency() -> None:
    stats = {"a": stats_with(outstanding=50, latency_s=9.0)}
    rr = RoundRobin()
    assert [rr([replica("a"), replica("b")], stats, random.Random(0)).worker_id for _ in range(4)] == ["a", "b", "a", "b"]


def test_least_connections_picks_fewest_outstanding_regardless_of_latency() -> None:
    stats = {"slow": stats_with(outstanding=1, latency_s=5.0), "busy": stats_with(outstanding=3, latency_s=0.001)}
    replicas = [replica("busy"), replica("slow"), replica("unknown")]
    assert least_connections(replicas, stats, random.Random(0)).worker_id == "unknown"
    stats["unknown"] = stats_with(outstanding=2)
    assert least_connections(replicas, stats, random.Random(0)).worker_id == "slow"


def test_least_connections_breaks_ties_at_random() -> None:
    replicas = [replica("a"), replica("b"), replica("c")]
    rng = random.Random(1)
    assert {least_connections(replicas, {}, rng).worker_id for _ in range(60)} == {"a", "b", "c"}


def test_least_response_time_prefers_low_latency_until_its_queue_outweighs_it() -> None:
    replicas = [replica("fast"), replica("slow")]
    stats = {"fast": stats_with(latency_s=0.01), "slow": stats_with(latency_s=0.05)}
    rng = random.Random(0)
    assert {least_response_time(replicas, stats, rng).worker_id for _ in range(20)} == {"fast"}
    for _ in range(5):  # 6 x 10 ms expected on fast > 1 x 50 ms on slow
        stats["fast"].start()
    assert least_response_time(replicas, stats, rng).worker_id == "slow"


def test_least_response_time_costs_unsampled_replica_at_the_mean() -> None:
    replicas = [replica("a"), replica("b"), replica("new")]
    stats = {"a": stats_with(latency_s=0.01), "b": stats_with(latency_s=0.03)}
    # new is costed at 20 ms: above a (10 ms), below b (30 ms).
    assert least_response_time(replicas, stats, random.Random(0)).worker_id == "a"
    assert least_response_time([replica("b"), replica("new")], stats, random.Random(0)).worker_id == "new"


def test_capacity_weights_use_speed_then_latency_then_equal() -> None:
    fast, slow, silent = replica("fast", speed=3.0), replica("slow", speed=1.0), replica("silent")
    assert capacity_weights([fast, slow], {}) == [3.0, 1.0]
    assert capacity_weights([fast, slow, silent], {}) == [3.0, 1.0, 2.0]  # unknown speed: the mean
    stats = {"a": stats_with(latency_s=0.01), "b": stats_with(latency_s=0.04)}
    assert capacity_weights([replica("a"), replica("b")], stats) == pytest.approx([100.0, 25.0])
    assert capacity_weights([replica("a"), replica("b"), replica("c")], stats) == pytest.approx([100.0, 25.0, 62.5])
    assert capacity_weights([replica("a"), replica("b")], {}) == [1.0, 1.0]
    assert capacity_weights([replica("x", speed=float("nan")), replica("y", speed=-1)], {}) == [1.0, 1.0]


def test_weighted_picks_in_proportion_to_speed() -> None:
    replicas = [replica("fast", speed=3.0), replica("slow", speed=1.0)]
    rng = random.Random(7)
    counts = Counter(weighted(replicas, {}, rng).worker_id for _ in range(8000))
    assert counts["fast"] / 8000 == pytest.approx(0.75, abs=0.02)


def test_weighted_falls_back_to_inverse_latency() -> None:
    replicas = [replica("a"), replica("b")]
    stats = {"a": stats_with(latency_s=0.01), "b": stats_with(latency_s=0.04)}
    rng = random.Random(3)
    counts = Counter(weighted(replicas, stats, rng).worker_id for _ in range(8000))
    assert counts["a"] / 8000 == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_honours_exclude_and_names_the_stage_when_none_is_left(policy: str) -> None:
    balancer = Balancer(policy)
    replicas = [replica("a"), replica("b"), replica("c")]
    rng = random.Random(0)
    picks = {balancer.choose(replicas, {}, rng, exclude=frozenset({"a"})).worker_id for _ in range(50)}
    assert picks == {"b", "c"}
    assert balancer.choose(replicas, {}, rng, exclude=frozenset({"a", "b"})).worker_id == "c"
    with pytest.raises(Unavailable, match="layers 0:4"):
        balancer.choose(replicas, {}, rng, exclude=frozenset({"a", "b", "c"}))


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_reads_stats_without_changing_them(policy: str) -> None:
    stats = {"a": stats_with(outstanding=2, latency_s=0.02), "b": stats_with(latency_s=0.01)}
    before = {k: (v.outstanding, v.latency_ewma_s) for k, v in stats.items()}
    Balancer(policy).choose([replica("a"), replica("b")], stats, random.Random(0))
    assert {k: (v.outstanding, v.latency_ewma_s) for k, v in stats.items()} == before


def test_p2c_policy_is_todays_choice() -> None:
    replicas = [replica("busy"), replica("idle")]
    stats = {"busy": stats_with(outstanding=5, latency_s=0.01), "idle": stats_with(latency_s=0.01)}
    assert {Balancer("p2c").choose(replicas, stats, random.Random(i)).worker_id for i in range(20)} == {"idle"}


def test_unknown_policy_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="least_connections"):
        Balancer("fastest")
