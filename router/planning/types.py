"""Frozen snapshot types the planner, balancer and router share.

They hold what workers reported about themselves (Describe) and the route built from it; no I/O,
so every routing decision can be made and tested as a pure function over a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.errors import FailedPrecondition
from services.layers import LayerSpan


@dataclass(frozen=True)
class WorkerInfo:
    """What one worker's Describe RPC reported: identity, model, and the layers it serves."""

    worker_id: str
    address: str
    model_id: str
    architecture: str
    span: LayerSpan
    total_layers: int
    checksum: str
    hidden_size: int = 0
    # Relative compute speed the worker reported (Capacity.speed; 0 = unknown), for the weighted balancer.
    # Not part of identity: a re-measured speed is no reason to treat the worker as changed.
    speed: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Stage:
    """One hop of a route: a layer span and the interchangeable replicas that serve it."""

    span: LayerSpan
    replicas: tuple[WorkerInfo, ...]

    @property
    def replica_ids(self) -> tuple[str, ...]:
        return tuple(w.worker_id for w in self.replicas)


@dataclass(frozen=True)
class RoutePlan:
    """Stages that cover ``stages[0].span.start .. total_layers`` contiguously, all on one checksum."""

    stages: tuple[Stage, ...]
    model_id: str
    checksum: str
    total_layers: int

    @property
    def hop_count(self) -> int:
        return len(self.stages)

    @property
    def start_layer(self) -> int:
        return self.stages[0].span.start if self.stages else self.total_layers

    def stage_for_layer(self, start_layer: int) -> Stage:
        """The stage that holds ``start_layer``, e.g. to find which hop a failed layer belongs to."""
        for stage in self.stages:
            if stage.span.start <= start_layer < stage.span.end:
                return stage
        raise FailedPrecondition(
            f"layer {start_layer} is not in route {self.describe()}; re-plan the route from layer {start_layer}"
        )

    def worker_ids(self) -> frozenset[str]:
        return frozenset(w.worker_id for stage in self.stages for w in stage.replicas)

    def describe(self) -> str:
        """Short text for logs and errors, e.g. ``0:2[w1,w2] -> 2:6[w3]``."""
        return " -> ".join(f"{s.span}[{','.join(s.replica_ids)}]" for s in self.stages)
