"""Exponentially weighted moving averages of service time, for deadline-aware admission."""

from __future__ import annotations


class Ewma:
    """EWMA of observed durations; ``value`` is None until ``min_samples`` were seen (a cold router
    refuses nothing on a guess)."""

    def __init__(self, alpha: float = 0.2, min_samples: int = 5) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.min_samples = min_samples
        self.samples = 0
        self._value = 0.0

    def observe(self, seconds: float) -> None:
        if seconds < 0:
            return
        self._value = seconds if self.samples == 0 else self._value + self.alpha * (seconds - self._value)
        self.samples += 1

    @property
    def value(self) -> float | None:
        return self._value if self.samples >= self.min_samples else None
