"""bench placement's CPU quota: a process lands in a quota group and the group is gone after close()."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.bench import cpulimit


@pytest.mark.skipif(not cpulimit.available(), reason="no writable cgroup cpu controller (needs root)")
def test_a_limited_process_runs_in_its_quota_group_until_close() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    limit = cpulimit.CpuLimit(0.25, "unit-test")
    try:
        limit.add(child.pid)
        group = limit.path.name
        assert group in open(f"/proc/{child.pid}/cgroup").read()
        quota = (limit.path / "cpu.max").read_text().split()[0] if (limit.path / "cpu.max").exists() \
            else (limit.path / "cpu.cfs_quota_us").read_text().strip()
        assert int(quota) == 25_000
        limit.close()  # the child is still alive: moved out, group removed
        assert not limit.path.exists() and group not in open(f"/proc/{child.pid}/cgroup").read()
    finally:
        child.kill()
        child.wait()
        limit.close()


def test_a_quota_must_be_positive() -> None:
    if not cpulimit.available():
        with pytest.raises(RuntimeError, match="cgroup"):
            cpulimit.CpuLimit(0.5, "unit-test")
        return
    with pytest.raises(ValueError, match="positive"):
        cpulimit.CpuLimit(0, "unit-test")
