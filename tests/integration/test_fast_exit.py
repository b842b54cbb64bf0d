"""A worker started from the command line runs with the fast-exit allocator settings, as the same process."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from services.chaos.injector import _sockets_closed_ms
from tests.procs import start_worker, wait_serving


def test_cli_worker_reexecs_with_fast_exit_allocator() -> None:
    proc, address = start_worker("tiny-llama", "0:3", "--threads", "1")
    try:
        wait_serving(address)  # the pid we started is the one serving: exec kept it
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{proc.pid}/environ").read_text().split("\0") if "=" in item
        )
        assert environ.get("PYTHONMALLOC") == "malloc"
        assert "glibc.malloc.hugetlb=1" in environ.get("GLIBC_TUNABLES", "")
        assert environ.get("SHARDMESH_FAST_EXIT") == "applied"
        killed = time.monotonic()
        proc.proc.send_signal(signal.SIGKILL)
        # The sockets close once the address space is freed; the harness's measurement works on it.
        assert asyncio.run(_sockets_closed_ms(proc.pid, killed)) is not None
    finally:
        proc.proc.kill()
        proc.proc.wait(timeout=30)
