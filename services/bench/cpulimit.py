"""A CPU quota on a process (a cgroup), so a benchmark can run workers of really different speed.

On a 2-core host ``--threads`` does not make workers unequal once every core is busy: the scheduler shares
time per runnable thread, and three busy workers measure nearly the same speed whatever their thread counts
(``bench placement`` on an idle host: 1.53, 1.38, 1.33 for threads 2, 1, 1). A CFS quota does: a process
limited to 0.3 cores gets at most 30 ms of CPU in every 100 ms, whatever else runs. cgroup v2 (``cpu.max``)
where the root delegates the cpu controller, else cgroup v1 (``cpu.cfs_quota_us``). Needs root; callers ask
:func:`available` first and say what they fell back to.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PERIOD_US = 100_000
_V2_ROOT = Path("/sys/fs/cgroup")
_V1_ROOT = Path("/sys/fs/cgroup/cpu")


def _root() -> tuple[Path, int] | None:
    """Where quota groups can be made here, and the cgroup version; None when nowhere."""
    controllers = _V2_ROOT / "cgroup.subtree_control"
    if controllers.exists() and "cpu" in controllers.read_text().split() and os.access(_V2_ROOT, os.W_OK):
        return _V2_ROOT, 2
    if (_V1_ROOT / "cpu.cfs_quota_us").exists() and os.access(_V1_ROOT, os.W_OK):
        return _V1_ROOT, 1
    return None


def available() -> bool:
    return _root() is not None


class CpuLimit:
    """One cgroup holding processes to ``cores`` CPUs (0.3 = 30 ms per 100 ms); removed by :meth:`close`."""

    def __init__(self, cores: float, name: str) -> None:
        found = _root()
        if found is None:
            raise RuntimeError("no writable cgroup cpu controller on this host (needs root and cgroup v1 cpu or v2 cpu.max)")
        if cores <= 0:
            raise ValueError(f"cores must be positive, got {cores}")
        self._root, self._version = found
        self.path = self._root / f"shardmesh-{name}-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        quota = max(1000, int(cores * PERIOD_US))
        if self._version == 2:
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def add(self, pid: int) -> None:
        """Moves ``pid`` with all its threads (threads it starts later are in the group too)."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        """Moves any process still inside back to the root group and removes the group."""
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self._root / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()
