"""Pure routing decisions over a snapshot of the mesh: route planning, replica choice, ejection, retry budget.

No I/O, no asyncio and no clocks here: time comes in as ``now`` arguments, so every decision is
deterministic and unit-tested without sockets.
"""

from __future__ import annotations

from router.planning.balancer import ReplicaStats, choose_replica
from router.planning.outlier import OutlierConfig, OutlierDetector
from router.planning.planner import coverage_problems, plan_route
from router.planning.retry_budget import RetryBudget
from router.planning.types import RoutePlan, Stage, WorkerInfo

__all__ = [
    "OutlierConfig",
    "OutlierDetector",
    "ReplicaStats",
    "RetryBudget",
    "RoutePlan",
    "Stage",
    "WorkerInfo",
    "choose_replica",
    "coverage_problems",
    "plan_route",
]
