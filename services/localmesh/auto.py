"""``layers: auto`` in an ``up`` file: plan every worker's range before starting anything.

Costs are the measured ones cached on this host (``shardmesh plan --model M --measure`` fills the cache),
else equal layers; each worker's speed is its declared ``capacity`` (1.0 when absent) and its memory its
``memory_mb``. Workers the plan does not need (ties go to fewer hops) become replicas of the slowest stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from services.localmesh.spec import MeshSpec, WorkerSpec
from services.placement.costs import WorkerCapacity
from services.placement.measure import load_costs
from services.placement.planner import Plan, plan

MIB = 1024 * 1024


def place_auto(spec: MeshSpec, *, progress: Callable[[str], None] | None = None) -> tuple[MeshSpec, Plan, str]:
    """The spec with every ``layers: auto`` worker given its planned range (and ``--capacity`` flags)."""
    costs, origin = load_costs(spec.model)
    capacities = [WorkerCapacity(w.name, w.capacity or 1.0, int(w.memory_mb * MIB)) for w in spec.workers]
    result = plan(costs, capacities)
    slowest = max(result.stages, key=lambda s: s.predicted_s)
    workers: list[WorkerSpec] = []
    for w in spec.workers:
        span = result.span_of(w.name) or slowest.span
        extra = (*(("--capacity", f"{w.capacity:g}") if w.capacity else ()),
                 *(("--capacity-memory-mb", f"{w.memory_mb:g}") if w.memory_mb else ()))
        workers.append(dataclasses.replace(w, span=span, args=(*w.args, *extra)))
    if progress is not None:
        progress(placement_line(result, origin))
    return dataclasses.replace(spec, workers=tuple(workers)), result, origin


def placement_line(result: Plan, origin: str) -> str:
    stages = " ".join(f"{s.worker}={s.span}" for s in result.stages)
    unused = f" (replicas of the slowest stage: {','.join(result.unused)})" if result.unused else ""
    return f"placement: {stages}{unused}; costs {origin}"
