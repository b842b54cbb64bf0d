"""The recorded history of a chaos run, Jepsen style: one event per line.

``invoke`` when a client sends a request; ``ok`` or ``fail`` when it ends (same ``id``); ``info`` for what is
not a client operation (a fault starting or ending, the mesh's state). Times are seconds since the run
started (monotonic clock). The checker reads only these events, so a history saved as JSON lines can be
checked again later, or built by hand in a test.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Event:
    type: str  # invoke | ok | fail | info
    time: float  # seconds since the run started
    op: str  # infer | generate | fault
    id: str = ""  # request id (client operations) or fault label (info)
    client: int = -1
    input: str = ""  # key of the input in the reference table
    route: tuple[str, ...] = ()
    attempts: int = 0  # infer: 1 + failovers; generate: 1 + failovers
    status: str = ""  # fail: the gRPC status name; info: "start" / "end" / a note
    message: str = ""
    digest: str = ""  # infer: digest of the output tensor; generate: digest of the token ids
    tokens: tuple[int, ...] = ()  # generate: the token ids as streamed
    indices: tuple[int, ...] = ()  # generate: the streamed token indices (exactly-once check)
    summary_tokens: tuple[int, ...] = ()  # generate: the token ids the summary reports
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v not in ((), "", -1, {}) or k in ("type", "time", "op")}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Event:
        data = json.loads(line)
        for key in ("route", "tokens", "indices", "summary_tokens"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def tensor_digest(t: torch.Tensor) -> str:
    """Bit-level digest: equal digests mean equal dtype, shape and bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:20]


def tokens_digest(tokens: Iterable[int]) -> str:
    return hashlib.sha256(",".join(str(int(t)) for t in tokens).encode()).hexdigest()[:20]


class History:
    """Events appended in arrival order, with times relative to ``start``."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.events: list[Event] = []

    def now(self) -> float:
        return time.monotonic() - self.start

    def add(self, event: Event) -> Event:
        self.events.append(event)
        return event

    def write(self, path: str | Path) -> None:
        Path(path).write_text("".join(e.to_json() + "\n" for e in self.events))


def read_history(path: str | Path) -> list[Event]:
    return [Event.from_json(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pairs(events: Iterable[Event]) -> Iterator[tuple[Event, Event | None]]:
    """(invoke, completion) for each client operation; completion None when the op never ended (lost)."""
    ends = {e.id: e for e in events if e.type in ("ok", "fail")}
    for e in events:
        if e.type == "invoke":
            yield e, ends.get(e.id)
