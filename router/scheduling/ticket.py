"""One unit of work waiting for (or holding) a pipeline slot."""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("infer", "generate", "step")  # an Infer; a generation's admission (prefill); a later decode step


@dataclass(eq=False)
class Ticket:
    seq: int  # arrival order, unique per scheduler
    kind: str
    priority: int  # resolved level, 1 = highest
    tenant: str
    enqueued: float = 0.0  # clock time it entered the queue
    tokens: int = 0  # tokens a generation session has produced so far (mlfq demotion)
    cost: float = 1.0  # service units charged to the tenant (fair)
    removed: bool = field(default=False, repr=False)  # left the queue (timed out, cancelled): skipped lazily

    @property
    def is_new(self) -> bool:
        """A new request (Infer, or a generation's first step): limits and admission apply to it."""
        return self.kind != "step"
