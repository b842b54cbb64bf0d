"""Route planning over worker snapshots: coverage, ties, checksums, exclusions and failover."""

from __future__ import annotations

import pytest

from router.planning.planner import coverage_problems, plan_route
from router.planning.types import RoutePlan, WorkerInfo
from services.errors import FailedPrecondition, Unavailable
from services.layers import LayerSpan


def worker(worker_id: str, span: str, *, total: int = 6, checksum: str = "abc", model: str = "m") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        address=f"{worker_id}:50051",
        model_id=model,
        architecture="llama",
        span=LayerSpan.parse(span),
        total_layers=total,
        checksum=checksum,
    )


def spans(plan: RoutePlan) -> list[str]:
    return [str(stage.span) for stage in plan.stages]


def test_simple_three_stage_route() -> None:
    plan = plan_route([worker("w3", "4:6"), worker("w1", "0:2"), worker("w2", "2:4")])
    assert spans(plan) == ["0:2", "2:4", "4:6"]
    assert plan.hop_count == 3
    assert (plan.model_id, plan.checksum, plan.total_layers) == ("m", "abc", 6)
    assert plan.describe() == "0:2[w1] -> 2:4[w2] -> 4:6[w3]"


def test_uneven_split() -> None:
    plan = plan_route([worker("a", "0:1"), worker("b", "1:5"), worker("c", "5:6")])
    assert spans(plan) == ["0:1", "1:5", "5:6"]


def test_replicas_are_grouped_into_one_stage_sorted_by_id() -> None:
    plan = plan_route([worker("w2", "0:2"), worker("w1", "0:2"), worker("w3", "2:6")])
    assert plan.describe() == "0:2[w1,w2] -> 2:6[w3]"
    assert plan.stages[0].replica_ids == ("w1", "w2")


def test_single_worker_holding_all_layers() -> None:
    plan = plan_route([worker("solo", "0:6")])
    assert plan.describe() == "0:6[solo]"


def test_stage_for_layer() -> None:
    plan = plan_route([worker("w1", "0:2"), worker("w2", "2:6")])
    assert plan.stage_for_layer(0).span == LayerSpan(0, 2)
    assert plan.stage_for_layer(3).span == LayerSpan(2, 6)
    with pytest.raises(FailedPrecondition, match="layer 6 is not in route"):
        plan.stage_for_layer(6)


def test_no_workers_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="no workers discovered"):
        plan_route([])


def test_gap_names_missing_layers() -> None:
    with pytest.raises(FailedPrecondition) as info:
        plan_route([worker("w1", "0:3"), worker("w2", "5:6")])
    assert str(info.value).startswith(
        "no complete route over layers 0:6: missing layers 3:5 (no worker starts at layer 3)"
    )


def test_several_gaps_are_all_named() -> None:
    with pytest.raises(FailedPrecondition) as info:
        plan_route([worker("w1", "1:2"), worker("w2", "3:6")])
    message = str(info.value)
    assert "missing layers 0:1" in message and "missing layers 2:3" in message


def test_overlap_names_the_overlapping_layers() -> None:
    with pytest.raises(FailedPrecondition) as info:
        plan_route([worker("w1", "0:3"), worker("w2", "2:6")])
    assert "layers 2:3 are held by both 0:3 and 2:6; stages must meet at the same layer" in str(info.value)
    assert "missing" not in str(info.value)


def test_overlap_that_an_alternative_split_avoids_is_fine() -> None:
    plan = plan_route([worker("w1", "0:3"), worker("w2", "2:6"), worker("w3", "0:2")])
    assert spans(plan) == ["0:2", "2:6"]


def test_span_beyond_the_model_is_reported() -> None:
    with pytest.raises(FailedPrecondition, match=r"worker w2 reports layers 3:8 but model 'm' has layers 0:6"):
        plan_route([worker("w1", "0:3"), worker("w2", "3:8")])


def test_checksum_mismatch_without_a_complete_group_lists_every_checksum() -> None:
    with pytest.raises(FailedPrecondition) as info:
        plan_route([worker("w1", "0:3", checksum="aaa"), worker("w2", "3:6", checksum="bbb")])
    message = str(info.value)
    assert message.startswith("checksum mismatch:")
    assert "checksum aaa ('m', 6 layers): w1 0:3" in message
    assert "checksum bbb ('m', 6 layers): w2 3:6" in message


def test_checksum_mismatch_uses_the_complete_group() -> None:
    workers = [
        worker("w1", "0:3", checksum="good"),
        worker("w2", "3:6", checksum="good"),
        worker("w3", "3:6", checksum="stale"),
        worker("w4", "0:6", checksum="stale2"),
    ]
    plan = plan_route(workers)
    # "stale2" is complete too, but "good" has more workers.
    assert plan.checksum == "good"
    assert plan.describe() == "0:3[w1] -> 3:6[w2]"
    problems = coverage_problems(workers)
    assert len(problems) == 1
    assert "checksum mismatch: ignoring workers w3, w4" in problems[0]


def test_smaller_checksum_group_used_when_larger_one_is_incomplete() -> None:
    workers = [worker("a", "0:3", checksum="x"), worker("b", "0:3", checksum="x"), worker("c", "0:6", checksum="y")]
    assert plan_route(workers).describe() == "0:6[c]"


def test_excluded_workers_are_skipped() -> None:
    plan = plan_route(
        [worker("w1", "0:2"), worker("w2", "0:2"), worker("w3", "2:6")], excluded=frozenset({"w1"})
    )
    assert plan.describe() == "0:2[w2] -> 2:6[w3]"


def test_all_replicas_of_a_span_excluded_is_unavailable_naming_the_range() -> None:
    workers = [worker("w1", "0:2"), worker("w3", "2:4"), worker("w4", "2:4"), worker("w5", "4:6")]
    with pytest.raises(Unavailable) as info:
        plan_route(workers, excluded=frozenset({"w3", "w4"}))
    assert str(info.value).startswith("no healthy replica for layers 2:4 (workers w3, w4 ejected)")
    assert coverage_problems(workers, excluded=frozenset({"w3", "w4"})) == [str(info.value)]


def test_exclusion_falls_back_to_an_alternative_split() -> None:
    workers = [worker("big", "0:6"), worker("a", "0:3"), worker("b", "3:6")]
    assert plan_route(workers, excluded=frozenset({"big"})).describe() == "0:3[a] -> 3:6[b]"
    with pytest.raises(Unavailable) as info:
        plan_route(workers, excluded=frozenset({"big", "b"}))
    message = str(info.value)
    assert "layers 0:6 (worker big ejected)" in message and "layers 3:6 (worker b ejected)" in message
    assert "0:3" not in message.split(";")[0]


def test_failover_replans_from_start_layer() -> None:
    workers = [worker("w1", "0:2"), worker("w2", "2:4"), worker("w3", "2:4"), worker("w4", "4:6")]
    plan = plan_route(workers, start_layer=2, excluded=frozenset({"w2"}))
    assert plan.describe() == "2:4[w3] -> 4:6[w4]"
    assert plan.start_layer == 2


def test_failover_keeps_the_original_checksum() -> None:
    workers = [worker("a", "0:6", checksum="old"), worker("b", "3:6", checksum="new"), worker("c", "0:3", checksum="new")]
    with pytest.raises(FailedPrecondition, match="no worker starts at layer 3"):
        plan_route(workers, start_layer=3, checksum="old")
    assert plan_route(workers, start_layer=3, checksum="new").describe() == "3:6[b]"
    with pytest.raises(FailedPrecondition, match="no worker serves checksum gone"):
        plan_route(workers, checksum="gone")


def test_failover_from_a_layer_past_the_model_is_rejected() -> None:
    with pytest.raises(FailedPrecondition, match="cannot plan a route from layer 6"):
        plan_route([worker("w1", "0:6")], start_layer=6)


def test_fewest_hops_wins_over_finer_split() -> None:
    workers = [worker("a", "0:3"), worker("b", "3:6"), worker("big", "0:6")]
    assert plan_route(workers).describe() == "0:6[big]"


def test_equal_hops_prefers_more_replicas_then_is_deterministic() -> None:
    workers = [
        worker("a", "0:2"), worker("b", "2:6"),
        worker("c", "0:4"), worker("d", "0:4"), worker("e", "4:6"), worker("f", "4:6"),
    ]
    assert plan_route(workers).describe() == "0:4[c,d] -> 4:6[e,f]"
    tied = [worker("a", "0:2"), worker("b", "2:6"), worker("c", "0:4"), worker("d", "4:6")]
    assert plan_route(tied).describe() == plan_route(list(reversed(tied))).describe() == "0:2[a] -> 2:6[b]"


def test_tie_break_maximises_the_thinnest_stage() -> None:
    # 0:2(x1) + 2:6(x5) has more replicas in total, but 0:3(x2) + 3:6(x2) survives one failure per stage.
    workers = [worker("a", "0:2")] + [worker(f"b{i}", "2:6") for i in range(5)]
    workers += [worker("c1", "0:3"), worker("c2", "0:3"), worker("d1", "3:6"), worker("d2", "3:6")]
    assert [s.span for s in plan_route(workers).stages] == [LayerSpan(0, 3), LayerSpan(3, 6)]


def test_coverage_problems_empty_for_a_healthy_mesh() -> None:
    assert coverage_problems([worker("w1", "0:3"), worker("w2", "3:6")]) == []
    assert coverage_problems([]) == [
        "no workers discovered: start at least one shard worker and check that it registered with discovery"
    ]
    assert "missing layers 3:6" in coverage_problems([worker("w1", "0:3")])[0]
