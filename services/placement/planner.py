"""Contiguous layer ranges that minimise the slowest pipeline stage (DeepSpeed's balanced partition, but
per worker: each stage's time is its layers' measured compute divided by that worker's speed, plus the
time to send its output over that worker's link, plus a fixed per-hop overhead).

Objective, in order: the slowest stage (sets the pipeline's throughput), then fewer hops (each one costs
a round trip and a serialisation that the model only approximates), then the lowest sum of stage times
(latency). Exact: a min-max dynamic programme over (next layer, workers used so far) finds the best
bottleneck ``T``; a second, additive programme then picks the fewest hops among plans whose every stage
is within ``T``. Interchangeable workers (same speed, memory and link) are counted, not enumerated, so a
mesh of many equal workers plans as fast as one of few kinds.

Replica groups: ``replicas=R`` splits the workers into ``R`` groups of near-equal total speed (largest
first), and each group is planned to cover every layer once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from services.errors import ConfigError
from services.layers import LayerSpan
from services.placement.costs import ModelCosts, WorkerCapacity, stage_compute_s, stage_output_bytes, stage_weight_bytes

_EPS = 1e-12


@dataclass(frozen=True)
class PlannedStage:
    worker: str
    span: LayerSpan
    predicted_s: float  # compute / speed + transfer + hop overhead
    compute_s: float  # compute part, at the worker's speed
    weight_bytes: int


@dataclass(frozen=True)
class Plan:
    groups: tuple[tuple[PlannedStage, ...], ...]  # one pipeline per replica group, stages in layer order
    unused: tuple[str, ...] = ()  # workers the plan does not need (a hop would cost more than it saves)

    @property
    def stages(self) -> tuple[PlannedStage, ...]:
        return tuple(s for group in self.groups for s in group)

    @property
    def bottleneck_s(self) -> float:
        """The slowest stage of the slowest group."""
        return max(max(s.predicted_s for s in g) for g in self.groups)

    @property
    def throughput(self) -> float:
        """Predicted requests/s at the reference shape with the pipeline full: each group's slowest stage."""
        return sum(1.0 / max(max(s.predicted_s for s in g), _EPS) for g in self.groups)

    @property
    def latency_s(self) -> float:
        """Predicted time of one request through the first group alone (stages run one after another)."""
        return sum(s.predicted_s for s in self.groups[0])

    def span_of(self, worker: str) -> LayerSpan | None:
        return next((s.span for s in self.stages if s.worker == worker), None)


def stage_time(costs: ModelCosts, worker: WorkerCapacity, start: int, end: int, hop_overhead_s: float = 0.0) -> float:
    compute = stage_compute_s(costs, start, end) / worker.speed
    transfer = stage_output_bytes(costs, end) / worker.bandwidth_bps if worker.bandwidth_bps else 0.0
    return compute + transfer + hop_overhead_s


def _stage(costs: ModelCosts, worker: WorkerCapacity, start: int, end: int, hop_overhead_s: float) -> PlannedStage:
    return PlannedStage(
        worker.name, LayerSpan(start, end), stage_time(costs, worker, start, end, hop_overhead_s),
        stage_compute_s(costs, start, end) / worker.speed, stage_weight_bytes(costs, start, end),
    )


def _fits(costs: ModelCosts, worker: WorkerCapacity, start: int, end: int) -> bool:
    return not worker.memory_bytes or stage_weight_bytes(costs, start, end) <= worker.memory_bytes


def plan_group(
    costs: ModelCosts, workers: Sequence[WorkerCapacity], *, hop_overhead_s: float = 0.0, tolerance: float = 0.0,
) -> tuple[tuple[PlannedStage, ...], tuple[str, ...]]:
    """One pipeline over all layers using some of ``workers`` (each at most once); returns stages and the unused.

    ``tolerance``: plans whose slowest stage is within this share of the best count as tied (then fewer hops
    win); measured costs are noisy, so a hop saved for a 1 % slower bottleneck is usually worth it.
    """
    if not workers:
        raise ConfigError("no workers to place layers on")
    n = costs.total_layers
    kinds: list[tuple[float, int, float]] = sorted({w.kind for w in workers}, reverse=True)
    by_kind = {k: [w for w in workers if w.kind == k] for k in kinds}
    avail = tuple(len(by_kind[k]) for k in kinds)
    reps = [by_kind[k][0] for k in kinds]

    @lru_cache(maxsize=None)
    def cost(k: int, i: int, j: int) -> float:
        return stage_time(costs, reps[k], i, j, hop_overhead_s)

    @lru_cache(maxsize=None)
    def best_bottleneck(i: int, used: tuple[int, ...]) -> float:
        if i == n:
            return 0.0
        best = math.inf
        for k in range(len(kinds)):
            if used[k] >= avail[k]:
                continue
            nxt = used[:k] + (used[k] + 1,) + used[k + 1:]
            for j in range(i + 1, n + 1):
                if not _fits(costs, reps[k], i, j):
                    break  # weights only grow with j
                here = cost(k, i, j)
                if here >= best:
                    continue  # compute grows with j, but transfer may not: keep scanning
                best = min(best, max(here, best_bottleneck(j, nxt)))
        return best

    start = tuple(0 for _ in kinds)
    target = best_bottleneck(0, start)
    if math.isinf(target):
        largest = max(workers, key=lambda w: w.memory_bytes or math.inf)
        raise ConfigError(
            f"the model's {n} layers ({stage_weight_bytes(costs, 0, n)} weight bytes) do not fit on these "
            f"{len(workers)} workers (largest memory {largest.memory_bytes} bytes); add workers or memory"
        )
    limit = target * (1.0 + tolerance) + _EPS * max(1.0, target)

    @lru_cache(maxsize=None)
    def fewest(i: int, used: tuple[int, ...]) -> tuple[int, float, tuple[tuple[int, int], ...]]:
        if i == n:
            return (0, 0.0, ())
        best: tuple[int, float, tuple[tuple[int, int], ...]] = (n + 1, math.inf, ())
        for k in range(len(kinds)):
            if used[k] >= avail[k]:
                continue
            nxt = used[:k] + (used[k] + 1,) + used[k + 1:]
            for j in range(i + 1, n + 1):
                if not _fits(costs, reps[k], i, j):
                    break
                here = cost(k, i, j)
                if here > limit:
                    continue
                hops, total, path = fewest(j, nxt)
                candidate = (hops + 1, total + here, ((k, j), *path))
                if candidate[:2] < best[:2]:
                    best = candidate
        return best

    _, _, path = fewest(0, start)
    pools = {k: list(by_kind[kinds[k]]) for k in range(len(kinds))}
    stages: list[PlannedStage] = []
    i = 0
    for k, j in path:
        stages.append(_stage(costs, pools[k].pop(0), i, j, hop_overhead_s))
        i = j
    unused = tuple(w.name for k in pools for w in pools[k])
    return tuple(stages), unused


def split_groups(workers: Sequence[WorkerCapacity], replicas: int) -> list[list[WorkerCapacity]]:
    """Workers into ``replicas`` groups of near-equal total speed (longest-processing-time first)."""
    if replicas < 1:
        raise ConfigError(f"replicas must be at least 1, got {replicas}")
    if len(workers) < replicas:
        raise ConfigError(f"{replicas} replica groups need at least {replicas} workers, got {len(workers)}")
    groups: list[list[WorkerCapacity]] = [[] for _ in range(replicas)]
    for worker in sorted(workers, key=lambda w: (-w.speed, w.name)):
        min(groups, key=lambda g: (sum(w.speed for w in g), len(g))).append(worker)
    return groups


def plan(
    costs: ModelCosts, workers: Sequence[WorkerCapacity], *, replicas: int = 1, hop_overhead_s: float = 0.0,
    tolerance: float = 0.0,
) -> Plan:
    """The placement of ``costs``'s layers on ``workers`` (see the module docstring)."""
    names = [w.name for w in workers]
    if len(set(names)) != len(names):
        raise ConfigError(f"worker names must be unique, got {names}")
    groups, unused = [], []
    for group in split_groups(workers, replicas):
        stages, idle = plan_group(costs, group, hop_overhead_s=hop_overhead_s, tolerance=tolerance)
        groups.append(stages)
        unused.extend(idle)
    return Plan(tuple(groups), tuple(unused))


def even_spans(n_layers: int, n_workers: int) -> list[LayerSpan]:
    """What an operator types without measurements: equal layer counts, the first ones one longer."""
    n = min(n_layers, n_workers)
    base, extra = divmod(n_layers, n)
    spans, start = [], 0
    for index in range(n):
        end = start + base + (1 if index < extra else 0)
        spans.append(LayerSpan(start, end))
        start = end
    return spans


def evaluate(
    costs: ModelCosts, workers: Sequence[WorkerCapacity], spans: Sequence[LayerSpan], *, hop_overhead_s: float = 0.0,
) -> Plan:
    """The predicted stage times of a given split (``spans[i]`` on ``workers[i]``), e.g. the even split."""
    if len(spans) > len(workers):
        raise ConfigError(f"{len(spans)} ranges for {len(workers)} workers")
    stages = tuple(_stage(costs, w, s.start, s.end, hop_overhead_s) for w, s in zip(workers, spans))
    return Plan((stages,), tuple(w.name for w in workers[len(spans):]))


def even_plan(costs: ModelCosts, workers: Sequence[WorkerCapacity], *, hop_overhead_s: float = 0.0) -> Plan:
    return evaluate(costs, workers, even_spans(costs.total_layers, len(workers)), hop_overhead_s=hop_overhead_s)
