"""How busy the machine was with *other* work while a system was measured (Linux /proc; None elsewhere).

The bench often shares its machine (CI runners, other users). Every measurement records
``background_cores``: the cores' busy time not spent by the bench's own process tree, divided by the
wall time. 0 means the systems had the machine to themselves; on 2 cores, 1.0 means half of it was gone,
and such a row's numbers say more about the neighbours than about the system.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (idle and iowait excluded)


@dataclass(frozen=True)
class CpuSnapshot:
    busy_s: float  # whole machine, every core
    own_s: float  # the bench's process tree, including reaped children
    at: float


def _machine_busy_s() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields)) / _TICKS


def _tree_cpu_s(root: int) -> float:
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        rest = raw[raw.rfind(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(rest[1])
        times[pid] = sum(int(v) for v in rest[11:15]) / _TICKS  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, ()))
    return total


def snapshot(root_pid: int | None = None) -> CpuSnapshot | None:
    """``root_pid``: the bench process (children measuring themselves pass their parent's pid)."""
    try:
        return CpuSnapshot(_machine_busy_s(), _tree_cpu_s(root_pid or os.getpid()), time.monotonic())
    except (OSError, ValueError, IndexError):
        return None


def background_cores(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    if before is None or after is None or after.at <= before.at:
        return None
    foreign = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return round(max(0.0, foreign) / (after.at - before.at), 2)
