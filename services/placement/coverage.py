"""Self-placement (``--layers auto``): which range a worker should hold given the workers already there,
and whether one of them should move after a departure. Pure: the worker feeds it Consul's view.

Like Petals' block selection, a worker looks at each layer's throughput, the sum over the workers holding
it of ``speed / compute(their range)`` (requests/s that worker can push through its whole range), and
picks the range that lifts the weakest layers most: candidate ranges are compared by the sorted vector of
per-layer throughputs (leximin: the weakest layer first, then the next weakest, ...). An uncovered layer
has throughput 0, so covering gaps always comes first. Memory bounds the range (its weights must fit);
with memory to spare a worker takes the whole model, which the cost model says is best (replicas need no
hops), so meshes split when memory, or a declared ``--capacity-memory-mb``, says so.

Rebalancing: every worker evaluates the same rule for every movable worker over the same Consul view, so
they agree on one mover per round without talking (the best resulting vector, ties by name), and a move
happens only if it closes a gap or lifts the weakest layer by ``hysteresis`` (default 50 %), so noise in
measured speeds cannot make workers flap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.layers import LayerSpan
from services.placement.costs import ModelCosts, WorkerCapacity, stage_compute_s, stage_weight_bytes

DEFAULT_HYSTERESIS = 0.5


@dataclass(frozen=True)
class Holder:
    """A registered worker as placement sees it."""

    name: str
    span: LayerSpan
    speed: float = 1.0
    memory_bytes: int = 0  # 0 = unbounded
    movable: bool = False  # placed itself (--layers auto)

    @property
    def capacity(self) -> WorkerCapacity:
        return WorkerCapacity(self.name, self.speed if self.speed > 0 else 1.0, self.memory_bytes)


def layer_throughput(costs: ModelCosts, holders: Sequence[Holder]) -> list[float]:
    """Requests/s each layer can serve: the sum over its holders of speed / compute(their range)."""
    caps = [0.0] * costs.total_layers
    for h in holders:
        end = min(h.span.end, costs.total_layers)
        if h.span.start >= end:
            continue
        rate = h.capacity.speed / max(stage_compute_s(costs, h.span.start, end), 1e-12)
        for layer in range(h.span.start, end):
            caps[layer] += rate
    return caps


def _key(caps: Sequence[float]) -> tuple[float, ...]:
    """Leximin key (larger is better); rounded so float noise cannot break ties."""
    return tuple(float(f"{c:.9g}") for c in sorted(caps))


def uncovered(costs: ModelCosts, holders: Sequence[Holder]) -> list[LayerSpan]:
    """Maximal runs of layers nobody holds."""
    caps = layer_throughput(costs, holders)
    gaps, start = [], None
    for layer, cap in enumerate([*caps, 1.0]):
        if cap == 0.0 and start is None:
            start = layer
        elif cap != 0.0 and start is not None:
            gaps.append(LayerSpan(start, layer))
            start = None
    return gaps


def best_span(costs: ModelCosts, others: Sequence[Holder], me: Holder) -> LayerSpan | None:
    """The range ``me`` should hold among ``others`` (None if no single layer fits its memory).

    Ties (equal vectors) go to fewer layers (less memory, shorter stage), then the lower start.
    """
    n = costs.total_layers
    best: tuple[tuple[float, ...], int, int] | None = None
    choice: LayerSpan | None = None
    for i in range(n):
        for j in range(i + 1, n + 1):
            if me.memory_bytes and stage_weight_bytes(costs, i, j) > me.memory_bytes:
                break
            span = LayerSpan(i, j)
            key = (_key(layer_throughput(costs, [*others, Holder(me.name, span, me.speed)])), -(j - i), -i)
            if best is None or key > best:
                best, choice = key, span
    return choice


@dataclass(frozen=True)
class Move:
    worker: str
    old: LayerSpan
    new: LayerSpan
    before_min: float  # weakest layer's throughput now
    after_min: float  # ... after the move


def next_move(costs: ModelCosts, holders: Sequence[Holder], *, hysteresis: float = DEFAULT_HYSTERESIS) -> Move | None:
    """The one move this round (the same answer on every worker for the same view), or None.

    A move must close a gap (fewer uncovered layers) or lift the weakest layer by ``hysteresis``, and may
    not uncover a layer that someone holds now (the mover serves its old range until routers switch, so
    coverage never lapses during the move either).
    """
    now = layer_throughput(costs, holders)
    now_gaps = sum(1 for c in now if c == 0.0)
    now_min = min(now)
    best: tuple[tuple[tuple[float, ...], int], str] | None = None
    move: Move | None = None
    for h in holders:
        if not h.movable:
            continue
        others = [o for o in holders if o is not h]
        span = best_span(costs, others, h)
        if span is None or span == h.span:
            continue
        after = layer_throughput(costs, [*others, Holder(h.name, span, h.speed)])
        if any(a == 0.0 < c for a, c in zip(after, now)):
            continue  # never uncover a layer that is covered now
        gaps = sum(1 for c in after if c == 0.0)
        closes_gap = gaps < now_gaps
        lifts = now_gaps == 0 and gaps == 0 and min(after) >= (1.0 + hysteresis) * now_min
        if not (closes_gap or lifts):
            continue
        rank = (_key(after), -len(span))
        if best is None or rank > best[0] or (rank == best[0] and h.name < best[1]):
            best = (rank, h.name)
            move = Move(h.name, h.span, span, now_min, min(after))
    return move


def mesh_throughput(costs: ModelCosts, holders: Sequence[Holder]) -> float:
    """Requests/s of the mesh if routing spread load ideally: its weakest layer (0 with a gap)."""
    caps = layer_throughput(costs, holders)
    return min(caps) if caps else 0.0
