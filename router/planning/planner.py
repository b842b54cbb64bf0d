"""Route planning: which sequence of layer spans, and which replicas, serve a request.

A pure function over a snapshot of what workers reported, so the router can re-plan on every
discovery change or failover without I/O, and every rejection says exactly which layers are wrong.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.errors import FailedPrecondition, ShardmeshError, Unavailable
from services.layers import LayerSpan

from router.planning.types import RoutePlan, Stage, WorkerInfo

NO_WORKERS_MESSAGE = (
    "no workers discovered: start at least one shard worker and check that it registered with discovery"
)

_GroupKey = tuple[str, str, int]  # (checksum, model_id, total_layers): workers that may share a route


@dataclass(frozen=True)
class _GroupAnalysis:
    """How far one checksum group gets: a healthy plan, a complete-but-unhealthy route, or neither."""

    key: _GroupKey
    members: tuple[WorkerInfo, ...]
    outcome: RoutePlan | ShardmeshError
    complete: bool

    @property
    def plan(self) -> RoutePlan | None:
        return self.outcome if isinstance(self.outcome, RoutePlan) else None


def plan_route(
    workers: Iterable[WorkerInfo],
    *,
    excluded: frozenset[str] = frozenset(),
    start_layer: int = 0,
    checksum: str | None = None,
) -> RoutePlan:
    """Plans the fewest-hop route over ``start_layer .. total_layers`` avoiding ``excluded`` workers.

    ``start_layer > 0`` re-plans the rest of a request after a hop failed at that layer; pass the
    original plan's ``checksum`` then, so the request finishes on the same weights it started on.
    Ties between equally short routes go to the one whose thinnest stage has most replicas, then
    most replicas in total, then the lexicographically smallest spans (deterministic).

    Raises Unavailable when no worker is known or every replica of a needed span is excluded,
    FailedPrecondition when the reported spans or checksums cannot form a route at all.
    """
    outcome = _decide(_analyse_groups(list(workers), excluded, start_layer, checksum))
    if isinstance(outcome, ShardmeshError):
        raise outcome
    return outcome


def stage_groups(workers: Iterable[WorkerInfo]) -> dict[tuple[str, LayerSpan], tuple[str, ...]]:
    """Worker ids of each (checksum, layer span): every stage's full membership, in table order."""
    groups: dict[tuple[str, LayerSpan], list[str]] = defaultdict(list)
    for worker in workers:
        groups[(worker.checksum, worker.span)].append(worker.worker_id)
    return {key: tuple(ids) for key, ids in groups.items()}


def coverage_problems(workers: Iterable[WorkerInfo], *, excluded: frozenset[str] = frozenset()) -> list[str]:
    """Human-readable reasons the mesh cannot (fully) serve layers 0..total; empty when it can.

    For Topology and health reporting: unlike :func:`plan_route` this also reports problems that do
    not block serving, such as minority-checksum workers that are being ignored.
    """
    pool = list(workers)
    analyses = _analyse_groups(pool, excluded, 0, None)
    outcome = _decide(analyses)
    problems: list[str] = []
    if isinstance(outcome, ShardmeshError):
        problems.append(str(outcome))
    chosen = _select(analyses)
    if chosen is not None and len(analyses) > 1:
        ignored = [w for a in analyses if a is not chosen for w in a.members]
        problems.append(
            f"checksum mismatch: ignoring {_list_workers(ignored)} because the route uses checksum "
            f"{chosen.key[0]} ({chosen.key[1]!r}, {chosen.key[2]} layers); restart them with the same model files"
        )
    for worker in pool:
        message = _out_of_range_message(worker)
        if message is not None and all(message not in p for p in problems):
            problems.append(message)
    return problems


def _analyse_groups(
    pool: list[WorkerInfo], excluded: frozenset[str], start_layer: int, checksum: str | None
) -> list[_GroupAnalysis]:
    if not pool:
        return []
    if start_layer < 0:
        raise FailedPrecondition(f"cannot plan a route from layer {start_layer}: the start layer must be >= 0")
    groups: dict[_GroupKey, list[WorkerInfo]] = defaultdict(list)
    for worker in pool:
        groups[(worker.checksum, worker.model_id, worker.total_layers)].append(worker)
    if checksum is not None:
        if not any(key[0] == checksum for key in groups):
            raise FailedPrecondition(
                f"no worker serves checksum {checksum} any more (workers report {sorted({k[0] for k in groups})}); "
                "the request cannot continue on the weights it started with, retry it from the beginning"
            )
        groups = {key: members for key, members in groups.items() if key[0] == checksum}
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return [_analyse_group(key, tuple(members), excluded, start_layer) for key, members in ordered]


def _decide(analyses: list[_GroupAnalysis]) -> RoutePlan | ShardmeshError:
    if not analyses:
        return Unavailable(NO_WORKERS_MESSAGE)
    chosen = _select(analyses)
    if chosen is not None:
        return chosen.outcome
    if len(analyses) == 1:
        return analyses[0].outcome
    listing = "; ".join(
        f"checksum {key[0]} ({key[1]!r}, {key[2]} layers): "
        + ", ".join(f"{w.worker_id} {w.span}" for w in sorted(members, key=lambda w: (w.span, w.worker_id)))
        for key, members in ((a.key, a.members) for a in analyses)
    )
    return FailedPrecondition(
        f"checksum mismatch: no single model checksum has workers for a complete route: {listing}; "
        "start every worker from the same model files"
    )


def _select(analyses: list[_GroupAnalysis]) -> _GroupAnalysis | None:
    """The group to serve from: one with a healthy route, else one with a complete (but ejected) route.

    ``analyses`` is already ordered by most workers first, so the first match wins.
    """
    for analysis in analyses:
        if analysis.plan is not None:
            return analysis
    for analysis in analyses:
        if analysis.complete:
            return analysis
    return None


def _analyse_group(
    key: _GroupKey, members: tuple[WorkerInfo, ...], excluded: frozenset[str], start_layer: int
) -> _GroupAnalysis:
    checksum, model_id, total_layers = key
    if start_layer >= total_layers:
        error = FailedPrecondition(
            f"cannot plan a route from layer {start_layer}: model {model_id!r} has layers 0:{total_layers}"
        )
        return _GroupAnalysis(key, members, error, False)
    by_span: dict[LayerSpan, list[WorkerInfo]] = defaultdict(list)
    for worker in sorted(members, key=lambda w: w.worker_id):
        by_span[worker.span].append(worker)
    healthy = {span: [w for w in ws if w.worker_id not in excluded] for span, ws in by_span.items()}
    route = _best_route({span: len(ws) for span, ws in healthy.items()}, start_layer, total_layers)
    if route is not None:
        stages = tuple(Stage(span, tuple(healthy[span])) for span in route)
        return _GroupAnalysis(key, members, RoutePlan(stages, model_id, checksum, total_layers), True)
    if _best_route({span: len(ws) for span, ws in by_span.items()}, start_layer, total_layers) is not None:
        return _GroupAnalysis(key, members, _unhealthy_error(by_span, healthy, start_layer, total_layers), True)
    problems = _structural_problems(by_span, start_layer, total_layers)
    error = FailedPrecondition(
        f"no complete route over layers {start_layer}:{total_layers}: {'; '.join(problems)}; "
        "run workers so that every layer is served and each stage ends where the next one starts"
    )
    return _GroupAnalysis(key, members, error, False)


def _best_route(replica_counts: Mapping[LayerSpan, int], start: int, end: int) -> tuple[LayerSpan, ...] | None:
    """Fewest hops from ``start`` to ``end``; ties: largest thinnest stage, most replicas, smallest spans.

    Keeps, per layer boundary, the Pareto front of (thinnest stage, total replicas) over shortest
    suffixes, since a suffix that is best alone need not be best once a thinner stage precedes it.
    """
    outgoing: dict[int, list[LayerSpan]] = defaultdict(list)
    for span, count in replica_counts.items():
        if count > 0 and span.start >= start and span.end <= end:
            outgoing[span.start].append(span)
    hops: dict[int, int] = {end: 0}
    fronts: dict[int, list[tuple[int, int, tuple[LayerSpan, ...]]]] = {end: [(sys.maxsize, 0, ())]}
    for boundary in sorted(outgoing, reverse=True):
        reachable = [s for s in outgoing[boundary] if s.end in hops]
        if not reachable:
            continue
        hops[boundary] = 1 + min(hops[s.end] for s in reachable)
        candidates = [
            (min(replica_counts[s], thinnest), replica_counts[s] + total, (s, *path))
            for s in reachable
            if hops[s.end] == hops[boundary] - 1
            for thinnest, total, path in fronts[s.end]
        ]
        candidates.sort(key=lambda c: (-c[0], -c[1], c[2]))
        front: list[tuple[int, int, tuple[LayerSpan, ...]]] = []
        for candidate in candidates:
            if not front or candidate[1] > front[-1][1]:
                front.append(candidate)
        fronts[boundary] = front
    if start not in fronts:
        return None
    return fronts[start][0][2]


def _structural_problems(by_span: Mapping[LayerSpan, list[WorkerInfo]], start: int, end: int) -> list[str]:
    """Why no route exists even with every worker healthy: uncovered layers and misaligned stages."""
    found: list[tuple[int, str]] = []
    for span, workers in by_span.items():
        if span.end > end:
            for worker in workers:
                found.append((span.start, _out_of_range_message(worker) or ""))
    spans = sorted(s for s in by_span if s.end <= end)
    uncovered: set[int] = set(range(start, end))
    for span in spans:
        uncovered.difference_update(range(span.start, span.end))
    for gap_start, gap_end in _ranges(sorted(uncovered)):
        found.append(
            (gap_start, f"missing layers {gap_start}:{gap_end} (no worker starts at layer {gap_start})")
        )
    reachable = _reachable(spans, start)
    starts = {s.start for s in spans}
    for boundary in sorted(reachable):
        if boundary == end or boundary in starts or boundary in uncovered:
            continue
        covering = [s for s in spans if s.start < boundary < s.end]
        arriving = [s for s in spans if s.end == boundary and s.start in reachable]
        if not arriving:
            found.extend(
                (boundary, f"no worker starts at layer {boundary} to resume the route from; layer {boundary} is inside {c}")
                for c in covering
            )
        for a in arriving:
            for c in covering:
                found.append(
                    (max(a.start, c.start), f"layers {max(a.start, c.start)}:{boundary} are held by both {a} and {c}; "
                     "stages must meet at the same layer")
                )
    seen: set[str] = set()
    problems: list[str] = []
    for _, message in sorted(found):
        if message and message not in seen:
            seen.add(message)
            problems.append(message)
    return problems


def _unhealthy_error(
    by_span: Mapping[LayerSpan, list[WorkerInfo]],
    healthy: Mapping[LayerSpan, list[WorkerInfo]],
    start: int,
    end: int,
) -> Unavailable:
    """Names each span that lies on some complete route but has no healthy replica left."""
    spans = [s for s in by_span if s.end <= end]
    from_start = _reachable(spans, start)
    to_end = _reachable([LayerSpan(end - s.end, end - s.start) for s in spans if s.start < end], 0)
    blocked = [
        span
        for span in sorted(spans)
        if not healthy[span] and span.start in from_start and (end - span.end) in to_end
    ]
    details = "; ".join(
        f"no healthy replica for layers {span} ({_list_workers(by_span[span])} ejected)" for span in blocked
    )
    return Unavailable(
        f"{details}; no healthy route over layers {start}:{end} until one passes a health probe "
        "or a replica for those layers is added"
    )


def _reachable(spans: Iterable[LayerSpan], start: int) -> set[int]:
    outgoing: dict[int, list[int]] = defaultdict(list)
    for span in spans:
        outgoing[span.start].append(span.end)
    seen, todo = {start}, [start]
    while todo:
        for nxt in outgoing[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _ranges(layers: list[int]) -> list[tuple[int, int]]:
    """Sorted layer indices -> maximal half-open runs, e.g. [3, 4, 7] -> [(3, 5), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for layer in layers:
        if runs and runs[-1][1] == layer:
            runs[-1] = (runs[-1][0], layer + 1)
        else:
            runs.append((layer, layer + 1))
    return runs


def _list_workers(workers: Iterable[WorkerInfo]) -> str:
    ids = sorted({w.worker_id for w in workers})
    return f"worker {ids[0]}" if len(ids) == 1 else f"workers {', '.join(ids)}"


def _out_of_range_message(worker: WorkerInfo) -> str | None:
    if worker.span.end <= worker.total_layers:
        return None
    return (
        f"worker {worker.worker_id} reports layers {worker.span} but model {worker.model_id!r} has "
        f"layers 0:{worker.total_layers}; fix its layer range"
    )
