"""--balancer through real router and worker processes: round_robin alternates exactly between two replicas
(Infer and Generate), and least_connections / least_response_time keep traffic off a replica slowed by a
500 ms link delay (the chaos fault proxy in front of it) where round_robin splits it evenly."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from services.chaos.proxy import FaultProxy, Rule
from services.client import AsyncRouterClient, RouterClient
from tests.procs import Proc, mesh_up, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MODEL = "tiny-llama"  # 6 layers
TOKENS = [1, 17, 302, 44, 9, 120, 77, 5]
SLOW_MS = 500


def test_round_robin_alternates_exactly_between_two_replicas() -> None:
    config = {
        "model": MODEL,
        "workers": [{"layers": "0:3", "replicas": 2}, {"layers": "3:6"}],
        "router_args": ["--balancer", "round_robin"],
        "worker_args": ["--threads", "1"],
    }
    with mesh_up(config) as mesh, RouterClient(mesh.router) as client:
        results = [client.infer(tokens=TOKENS) for _ in range(8)]
        firsts = [r.route[0] for r in results]
        assert len(set(firsts)) == 2, firsts
        assert firsts == [firsts[0], firsts[1]] * 4, firsts  # strictly in turn
        assert all(r.route[1] == results[0].route[1] for r in results)
        assert all(torch.equal(r.output, results[0].output) for r in results)  # either replica, same answer
        sessions = [client.generate(tokens=TOKENS, max_new_tokens=2) for _ in range(4)]
        gen_firsts = [s.route[0] for s in sessions]
        assert set(gen_firsts) == set(firsts) and gen_firsts[0] != gen_firsts[1] and gen_firsts[::2] == [gen_firsts[0]] * 2
        assert len({s.token_ids for s in sessions}) == 1


class _ProxyThread:
    """The chaos FaultProxy on its own event loop thread, so a blocking test can hold it up."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy", daemon=True)
        self.thread.start()
        self.proxy = FaultProxy((host, int(port)))
        self.address = self._run(self.proxy.start())

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def delay(self, ms: float) -> None:
        async def add() -> None:
            self.proxy.add(Rule("delay", direction="to", delay_ms=ms))

        self._run(add())

    def close(self) -> None:
        self._run(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def slow_replica_mesh() -> Iterator[tuple[list[str], str, str]]:
    """Workers fast (0:3), slow (0:3, behind a proxy that delays every byte to it by SLOW_MS) and tail (3:6)."""
    started: list[Proc] = []
    proxy: _ProxyThread | None = None
    try:
        fast, fast_addr = start_worker(MODEL, "0:3", "--worker-id", "fast", "--threads", "1")
        started.append(fast)
        slow, slow_addr = start_worker(MODEL, "0:3", "--worker-id", "slow", "--threads", "1")
        started.append(slow)
        tail, tail_addr = start_worker(MODEL, "3:6", "--worker-id", "tail", "--threads", "1")
        started.append(tail)
        for address in (fast_addr, slow_addr, tail_addr):
            wait_serving(address)
        proxy = _ProxyThread(slow_addr)
        proxy.delay(SLOW_MS)
        yield [fast_addr, proxy.address, tail_addr], "fast", "slow"
    finally:
        for proc in started:
            proc.stop()
        if proxy is not None:
            proxy.close()


async def _first_hops(router: str, clients: int, per_client: int) -> Counter[str]:
    async with AsyncRouterClient(router) as client:
        await client.wait_ready(60)

        async def one_client() -> list[str]:
            return [(await client.infer(tokens=TOKENS, timeout_s=30)).route[0] for _ in range(per_client)]

        routes = await asyncio.gather(*(one_client() for _ in range(clients)))
    return Counter(worker for route in routes for worker in route)


@pytest.mark.parametrize("policy", ["round_robin", "least_connections", "least_response_time"])
def test_slowed_replica_gets_its_share_only_from_round_robin(policy: str, slow_replica_mesh) -> None:  # type: ignore[no-untyped-def]
    workers, fast, slow = slow_replica_mesh
    router, address = start_router(workers, "--balancer", policy, "--log-level", "warning")
    try:
        wait_serving(address)
        counts = asyncio.run(_first_hops(address, clients=4, per_client=12))
    finally:
        router.stop()
    assert sum(counts.values()) == 48 and set(counts) <= {fast, slow}, counts
    if policy == "round_robin":
        assert counts[slow] == counts[fast] == 24, counts  # blind to latency: the slow replica gets half
    else:
        assert counts[slow] <= 12, counts  # at most a quarter of the traffic (round_robin: half)
