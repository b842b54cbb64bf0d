"""Checks a recorded history after the fact: nothing lost, every output exact, recovery measured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from services.chaos.load import Op


@dataclass(frozen=True)
class Verdict:
    requests: int
    failed: int
    wrong: int
    problems: tuple[str, ...]
    affected: int  # requests that needed a failover (attempts > 1) or overlapped the fault
    first_success_after_fault_ms: float | None
    affected_extra_ms_p50: float | None
    affected_extra_ms_max: float | None
    baseline_p50_ms: float | None

    @property
    def ok(self) -> bool:
        return not self.problems


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


_median = median


def check_history(
    history: Sequence[Op],
    references: Mapping[str, torch.Tensor],
    *,
    fault_at: float | None = None,
    faulty_workers: frozenset[str] = frozenset(),
) -> Verdict:
    """Every op must have succeeded with an output bit-identical to the single-process reference."""
    problems: list[str] = []
    failed = [op for op in history if not op.ok]
    for op in failed[:5]:
        problems.append(f"client {op.client} request {op.index} failed: {op.error}")
    if len(failed) > 5:
        problems.append(f"... and {len(failed) - 5} more failures")
    wrong = 0
    for op in history:
        if op.ok and op.output is not None:
            expected = references[op.text]
            if not torch.equal(op.output.reshape(expected.shape), expected):
                wrong += 1
                if wrong <= 3:
                    problems.append(f"client {op.client} request {op.index}: output differs from the reference")
    before = [op.latency_ms for op in history if op.ok and (fault_at is None or op.finished < fault_at)]
    baseline = _median(before)
    affected: list[Op] = []
    first_success = None
    if fault_at is not None:
        affected = [
            op for op in history
            if op.ok and (op.attempts > 1 or (op.started <= fault_at <= op.finished))
        ]
        rerouted = [op for op in history if op.ok and op.finished > fault_at and op.attempts > 1]
        after = [op for op in history if op.ok and op.started > fault_at and not (faulty_workers & set(op.route))]
        candidates = [op.finished for op in rerouted + after]
        if candidates:
            first_success = 1000 * (min(candidates) - fault_at)
    extras = [op.latency_ms - baseline for op in affected] if baseline is not None else []
    return Verdict(
        requests=len(history),
        failed=len(failed),
        wrong=wrong,
        problems=tuple(problems),
        affected=len(affected),
        first_success_after_fault_ms=first_success,
        affected_extra_ms_p50=_median(extras),
        affected_extra_ms_max=max(extras) if extras else None,
        baseline_p50_ms=baseline,
    )
