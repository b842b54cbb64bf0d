"""Self-placement rules: joining covers the weakest layers, a departure's gap is closed by exactly one
mover, hysteresis stops flapping, and no move ever uncovers a layer that someone holds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.layers import LayerSpan
from services.placement.costs import uniform_costs
from services.placement.coverage import Holder, best_span, layer_throughput, next_move, uncovered

COSTS = uniform_costs(6, weight_bytes=10)


def _join(names: list[str], memory: int = 30, speed: float = 1.0) -> list[Holder]:
    holders: list[Holder] = []
    for name in names:
        span = best_span(COSTS, holders, Holder(name, LayerSpan(0, 1), speed, memory, True))
        assert span is not None
        holders.append(Holder(name, span, speed, memory, True))
    return holders


def test_join_in_turn_covers_gaps_first_then_the_weakest() -> None:
    a, b, c = _join(["a", "b", "c"])
    assert (a.span, b.span) == (LayerSpan(0, 3), LayerSpan(3, 6))  # memory holds 3 layers: a gap is worse than anything
    assert c.span in (LayerSpan(0, 3), LayerSpan(3, 6))  # all covered: the third doubles a weakest half
    assert not uncovered(COSTS, [a, b])


def test_with_memory_to_spare_a_worker_takes_the_whole_model() -> None:
    (a,) = _join(["a"], memory=0)
    assert a.span == LayerSpan(0, 6)


def test_faster_worker_takes_more_layers_when_memory_allows() -> None:
    slow = Holder("slow", LayerSpan(0, 2), 1.0)
    fast = best_span(COSTS, [slow], Holder("fast", LayerSpan(0, 1), 4.0, 50, True))
    assert fast is not None and fast.start <= 2 and fast.end == 6


def test_departure_gap_is_closed_by_one_mover_and_then_nobody_moves() -> None:
    a, b, c = _join(["a", "b", "c"])
    lone = b if c.span != b.span else a  # the only holder of its half
    rest = [h for h in (a, b, c) if h is not lone]
    move = next_move(COSTS, rest)
    assert move is not None and move.new == lone.span and move.before_min == 0.0 and move.after_min > 0
    after = [Holder(h.name, move.new, h.speed, h.memory_bytes, True) if h.name == move.worker else h for h in rest]
    assert not uncovered(COSTS, after)
    assert next_move(COSTS, after) is None  # settled: no second move (no flapping)


def test_hysteresis_ignores_small_gains() -> None:
    # a holds 0:3, b 3:6, c 3:6: moving c to 0:3 would balance, but the weakest layer gains only 0 -> no gap,
    # and min goes 1/3 -> 1/3 (layers 3:6 lose c): not a lift
    holders = [Holder("a", LayerSpan(0, 3), 1.0, 30, True), Holder("b", LayerSpan(3, 6), 1.0, 30, True),
               Holder("c", LayerSpan(3, 6), 1.0, 30, True)]
    assert next_move(COSTS, holders) is None
    # a slow worker alone on 0:3 and a fast idle one: lifting the weakest layer by 4x is worth a move
    holders = [Holder("a", LayerSpan(0, 3), 0.25, 30, False), Holder("b", LayerSpan(3, 6), 1.0, 30, False),
               Holder("c", LayerSpan(3, 6), 1.0, 30, True), Holder("d", LayerSpan(3, 6), 1.0, 30, True)]
    move = next_move(COSTS, holders, hysteresis=0.5)
    assert move is not None and move.worker == "c" and move.new == LayerSpan(0, 3)
    assert next_move(COSTS, holders, hysteresis=5.0) is None


def test_fixed_workers_never_move() -> None:
    holders = [Holder("a", LayerSpan(0, 3), 1.0, 30, False)]
    assert next_move(COSTS, holders) is None


spans_st = st.tuples(st.integers(0, 5), st.integers(1, 6)).filter(lambda t: t[0] < t[1]).map(lambda t: LayerSpan(*t))
holders_st = st.lists(st.tuples(spans_st, st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0, 20, 30, 40]),
                                st.booleans()), min_size=1, max_size=5).map(
    lambda hs: [Holder(f"w{i}", span, speed, mem, movable) for i, (span, speed, mem, movable) in enumerate(hs)])


@settings(max_examples=200, deadline=None)
@given(holders_st)
def test_a_move_never_uncovers_a_layer_and_respects_memory(holders: list[Holder]) -> None:
    move = next_move(COSTS, holders)
    if move is None:
        return
    mover = next(h for h in holders if h.name == move.worker)
    assert mover.movable
    assert not mover.memory_bytes or 10 * len(move.new) <= mover.memory_bytes
    after = [Holder(h.name, move.new, h.speed, h.memory_bytes, h.movable) if h is mover else h for h in holders]
    now, then = layer_throughput(COSTS, holders), layer_throughput(COSTS, after)
    assert all(t > 0 for t, n in zip(then, now) if n > 0)
    assert sum(t == 0 for t in then) < sum(n == 0 for n in now) or min(then) >= 1.5 * min(now)
