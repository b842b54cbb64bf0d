"""Which replicas may take over one stage of a generation session while the other stages keep theirs.

A direct-mode session whose hop failed at one stage need not be rebuilt everywhere: the router knows
every input that stage was ever sent (the token ids for stage 0, the previous stage's outputs after
that), so a new replica of that stage alone can be replayed, and the healthy stages keep their caches
(Petals' client does the same with the inputs it keeps per server span). That is only sound when the
planner would still route through every other stage's worker, over the same layer spans; otherwise the
whole route is re-planned and replayed. Pure: decides over a plan snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.planning.types import RoutePlan, WorkerInfo


def stage_candidates(plan: RoutePlan, route: Sequence[WorkerInfo], stage: int) -> tuple[WorkerInfo, ...]:
    """Replicas that may replace ``route[stage]`` (never that worker itself), or () when the route must be
    re-planned as a whole: the plan's stages differ from the route's spans, or another stage's worker is
    no longer one the plan would use (ejected, failed, gone)."""
    if not 0 <= stage < len(route) or len(plan.stages) != len(route) or plan.checksum != route[stage].checksum:
        return ()
    for index, (planned, worker) in enumerate(zip(plan.stages, route)):
        if planned.span != worker.span:
            return ()
        if index != stage and worker not in planned.replicas:
            return ()
    failed = route[stage].worker_id
    return tuple(w for w in plan.stages[stage].replicas if w.worker_id != failed)
