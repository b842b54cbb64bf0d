"""Layer ranges: the one domain type every other part (planner, adapters, config, Consul meta) shares."""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import ConfigError


@dataclass(frozen=True, order=True)
class LayerSpan:
    """Half-open range of transformer layers ``[start, end)``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ConfigError(f"invalid layer range {self.start}:{self.end}: need 0 <= START < END")

    @classmethod
    def parse(cls, text: str) -> LayerSpan:
        """Parses ``"START:END"``; errors say what a valid value looks like."""
        parts = text.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"invalid layer range {text!r}: expected START:END, e.g. 0:3")
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    def __len__(self) -> int:
        return self.end - self.start

    def check_within(self, total_layers: int, model: str) -> None:
        if self.end > total_layers:
            raise ConfigError(
                f"layer range {self} is beyond model {model!r}, which has {total_layers} layers (0:{total_layers})"
            )

    def overlaps(self, other: LayerSpan) -> bool:
        return self.start < other.end and other.start < self.end
