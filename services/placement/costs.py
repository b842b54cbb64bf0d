"""The cost model's inputs: what one layer costs, and what one worker can give. Pure types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.errors import ConfigError


@dataclass(frozen=True)
class LayerCost:
    """One transformer layer at the reference shape.

    ``compute_s``: forward time on a worker of speed 1.0; ``activation_bytes``: the hidden state it hands
    to the next layer (what crosses a stage boundary placed after it); ``weight_bytes``: its parameters.
    """

    compute_s: float
    activation_bytes: int = 0
    weight_bytes: int = 0

    def __post_init__(self) -> None:
        if self.compute_s < 0 or self.activation_bytes < 0 or self.weight_bytes < 0:
            raise ConfigError(f"layer costs must be non-negative, got {self}")


@dataclass(frozen=True)
class ModelCosts:
    """Per-layer costs plus what only the first stage (embeddings) and the last stage (head, pooling) run.

    ``last.activation_bytes`` is the model output that the last stage sends back.
    """

    layers: tuple[LayerCost, ...]
    first: LayerCost = LayerCost(0.0)
    last: LayerCost = LayerCost(0.0)
    model_id: str = ""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("a model needs at least one layer to place")

    @property
    def total_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class WorkerCapacity:
    """What one worker offers. ``speed``: relative compute speed (1.0 = the machine the costs were measured
    on); ``memory_bytes``: room for weights (0 = unbounded); ``bandwidth_bps``: bytes/s of its outgoing
    link (0 = transfer is free, e.g. shared memory on one host)."""

    name: str
    speed: float = 1.0
    memory_bytes: int = 0
    bandwidth_bps: float = 0.0
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ConfigError(f"worker {self.name!r}: speed must be positive, got {self.speed}")
        if self.memory_bytes < 0 or self.bandwidth_bps < 0:
            raise ConfigError(f"worker {self.name!r}: memory and bandwidth must be 0 (unbounded) or positive")

    @property
    def kind(self) -> tuple[float, int, float]:
        """Workers of one kind are interchangeable to the planner."""
        return (self.speed, self.memory_bytes, self.bandwidth_bps)


def uniform_costs(n_layers: int, compute_s: float = 1.0, activation_bytes: int = 0, weight_bytes: int = 0) -> ModelCosts:
    """Equal layers (when nothing was measured): the planner then splits by speed alone."""
    return ModelCosts(tuple(LayerCost(compute_s, activation_bytes, weight_bytes) for _ in range(n_layers)))


def parse_capacities(text: str, n_workers: int) -> list[float]:
    """``--capacity 1,2.5,1``: one positive relative speed per worker."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--capacity {text!r}: expected comma-separated numbers, e.g. 1,2,1") from None
    if len(values) != n_workers:
        raise ConfigError(f"--capacity has {len(values)} values for {n_workers} workers; give one per worker")
    if any(v <= 0 for v in values):
        raise ConfigError(f"--capacity {text!r}: every speed must be positive")
    return values


def stage_weight_bytes(costs: ModelCosts, start: int, end: int) -> int:
    total = sum(layer.weight_bytes for layer in costs.layers[start:end])
    if start == 0:
        total += costs.first.weight_bytes
    if end == costs.total_layers:
        total += costs.last.weight_bytes
    return total


def stage_compute_s(costs: ModelCosts, start: int, end: int) -> float:
    total = sum(layer.compute_s for layer in costs.layers[start:end])
    if start == 0:
        total += costs.first.compute_s
    if end == costs.total_layers:
        total += costs.last.compute_s
    return total


def stage_output_bytes(costs: ModelCosts, end: int) -> int:
    return costs.last.activation_bytes if end == costs.total_layers else costs.layers[end - 1].activation_bytes


def speeds_of(workers: Sequence[WorkerCapacity]) -> list[float]:
    return [w.speed for w in workers]


# Consul service Meta keys a worker adds for placement (beside services/discovery/registration.py's own).
META_SPEED = "speed"
META_MEMORY_BYTES = "memory_bytes"
META_AUTO = "auto_layers"  # "1" when the worker places itself (--layers auto) and may move


def capacity_meta(speed: float, memory_bytes: int, auto: bool = False) -> dict[str, str]:
    meta = {META_SPEED: f"{speed:.4g}", META_MEMORY_BYTES: str(int(memory_bytes))}
    if auto:
        meta[META_AUTO] = "1"
    return meta
