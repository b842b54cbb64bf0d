"""Closed-loop load: ``concurrency`` clients each send their next request when the last one returns.

A fixed request count and per-request deadlines bound every loop; a client stops at its first failure
(a failing system is reported, not hammered), and the caller's overall deadline bounds the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Callable

from services.bench import noise
from services.bench.records import Measurement, RequestSample


class _Tally:
    def __init__(self) -> None:
        self.samples: list[RequestSample] = []
        self.failures = 0
        self.first_failure = ""

    def fail(self, exc: BaseException) -> None:
        self.failures += 1
        self.first_failure = self.first_failure or f"{type(exc).__name__}: {exc}"[:500]

    def measurement(self, wall_s: float, concurrency: int, matches: bool | None, background: float | None) -> Measurement:
        return Measurement(tuple(self.samples), wall_s, concurrency, self.failures, self.first_failure, matches, background)


async def closed_loop_async(
    call: Callable[[int], Awaitable[RequestSample]],
    *,
    requests: int,
    concurrency: int,
    timeout_s: float,
    matches: Callable[[], bool | None] = lambda: None,
    bench_pid: int | None = None,
) -> Measurement:
    """Runs ``call(i)`` for i in 0..requests-1 from ``concurrency`` coroutines; ``timeout_s`` bounds it all."""
    tally = _Tally()
    indices = iter(range(requests))  # shared: the coroutines interleave only at awaits

    async def client() -> None:
        for index in indices:
            try:
                tally.samples.append(await call(index))
            except Exception as exc:  # noqa: BLE001 - recorded in the row, the run goes on
                tally.fail(exc)
                return

    before = noise.snapshot(bench_pid)
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(concurrency))), timeout_s)
    wall_s = time.perf_counter() - started
    return tally.measurement(wall_s, concurrency, matches(), noise.background_cores(before, noise.snapshot(bench_pid)))


def closed_loop_threads(
    call: Callable[[int], RequestSample],
    *,
    requests: int,
    concurrency: int,
    timeout_s: float,
    matches: Callable[[], bool | None] = lambda: None,
    bench_pid: int | None = None,
) -> Measurement:
    """Thread version for blocking clients (torch.distributed.rpc's ``rpc_sync``).

    Each ``call`` must carry its own timeout; ``timeout_s`` then only decides when to stop waiting
    (threads are daemons and the process running them is bounded by its parent).
    """
    tally = _Tally()
    counter = itertools.count()
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(counter)
            if index >= requests:
                return
            try:
                sample = call(index)
            except Exception as exc:  # noqa: BLE001 - recorded in the row, the run goes on
                with lock:
                    tally.fail(exc)
                return
            with lock:
                tally.samples.append(sample)

    threads = [threading.Thread(target=client, name=f"bench-client-{i}", daemon=True) for i in range(concurrency)]
    before = noise.snapshot(bench_pid)
    started = time.perf_counter()
    for t in threads:
        t.start()
    deadline = started + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"closed loop of {requests} requests did not finish within {timeout_s:.0f}s")
    wall_s = time.perf_counter() - started
    return tally.measurement(wall_s, concurrency, matches(), noise.background_cores(before, noise.snapshot(bench_pid)))
