"""Which sessions' decode steps a decode batch should wait for before it starts (pure logic, no I/O).

Continuous batching takes whatever is queued when the compute thread gets free. Sessions that ran in one
batch come back together (the previous stage answers them at once), but not at the same instant: the first
arrival finds the thread free and runs alone, the rest run as a second batch, and every stage splits the
group again, until most steps run alone, each at nearly the cost of a whole batch (a one-row step reads
all the weights, as a batch of 8 does: SmolLM2, 10 layers, one thread, 15 ms for 1 row, 29 ms for 8).
Measured with 8 SmolLM2 sessions on 3 stages: most decode steps ran alone.

Two rules keep and grow batches:

- *cohort*: the sessions that last ran in one batch. A batch waits for the rest of the cohorts of what is
  queued, so a group stays together through every stage.
- *due*: a session that steps steadily (one step per round of the pipeline) is expected back one period
  after its last step here. A batch also waits for sessions expected within the wait, so two groups that
  drift close merge, and stay merged by the first rule.

The wait itself is bounded by the caller (:mod:`shard_worker.sessions`); a session that does not come (its
generation ended, it failed over) costs one bounded wait and leaves the cohort with the next batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable


class DecodeCohorts:
    """Per session: the decode batch it last ran in, when, and its period; what a queued batch waits for."""

    def __init__(self) -> None:
        self._batch: dict[str, int] = {}
        self._ran_at: dict[str, float] = {}
        self._period: dict[str, float] = {}
        self._ids = itertools.count(1)

    def ran(self, sessions: Iterable[str], now: float) -> None:
        """These sessions ran together in one batch at ``now``: from now on they are one cohort."""
        batch = next(self._ids)
        for session in sessions:
            self._batch[session] = batch
            last = self._ran_at.get(session)
            if last is not None:
                self._period[session] = now - last
            self._ran_at[session] = now

    def forget(self, session: str) -> None:
        """The session closed or expired: nobody waits for it any more."""
        self._batch.pop(session, None)
        self._ran_at.pop(session, None)
        self._period.pop(session, None)

    def awaited(self, queued: Iterable[str], start: float, until: float) -> set[str]:
        """Sessions to wait for (none: start now): those of the queued sessions' cohorts that are not queued,
        and those expected (last step + period) between ``2 * start - until`` and ``until``; a session
        overdue by more than the wait is not waited for (it left, or its generation ended)."""
        queued = set(queued)
        batches = {self._batch[s] for s in queued if s in self._batch}
        earliest = start - (until - start)
        return {
            s
            for s, batch in self._batch.items()
            if s not in queued
            and (batch in batches or (s in self._period and earliest <= self._ran_at[s] + self._period[s] <= until))
        }

    def __len__(self) -> int:
        return len(self._batch)
