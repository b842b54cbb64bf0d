"""When the router describes a worker again: its discovery entry changed (Consul Meta), a caller suspects
it, or the periodic recheck comes round. The discovery backend and Describe are stand-ins here (no
sockets); the same behaviour with real processes is in tests/integration/test_static_discovery.py."""

from __future__ import annotations

import asyncio
from types import MappingProxyType

import pytest

from router.planning.types import WorkerInfo
from router.topology import Topology
from services.discovery.base import DiscoverySnapshot, Endpoint, SnapshotPublisher
from services.errors import Unavailable
from services.layers import LayerSpan


class FakeDiscovery:
    name = "fake"

    def __init__(self) -> None:
        self.publisher = SnapshotPublisher()

    async def start(self) -> None:
        return None

    def snapshot(self) -> DiscoverySnapshot:
        return self.publisher.current()

    async def wait_changed(self, after_version: int, timeout: float) -> DiscoverySnapshot:
        return await self.publisher.wait_changed(after_version, timeout)

    async def close(self) -> None:
        return None


class FakePool:
    """Describe answers from a dict the test rewrites, as if the worker at that address restarted."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[int, int]] = {}
        self.calls: list[str] = []

    async def describe(self, address: str, timeout_s: float) -> WorkerInfo:
        self.calls.append(address)
        start, end = self.spans[address]
        return WorkerInfo(worker_id=f"{address}-{start}-{end}", address=address, model_id="m", architecture="a",
                          span=LayerSpan(start, end), total_layers=6, checksum="c")

    async def forget(self, address: str) -> None:
        return None

    serving: frozenset[str] = frozenset()  # addresses whose health probe answers SERVING

    async def is_serving(self, address: str, timeout_s: float) -> bool:
        return address in self.serving


def _endpoint(address: str, layers: str) -> Endpoint:
    return Endpoint(address=address, service_id=address, meta=MappingProxyType({"layers": layers}))


async def _until(topology: Topology, spans: dict[str, tuple[int, int]], timeout_s: float) -> None:
    async def reached() -> None:
        while {w.address: (w.span.start, w.span.end) for w in topology.workers} != spans:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(reached(), timeout_s)


async def test_a_meta_change_is_described_again_at_once() -> None:
    discovery, pool = FakeDiscovery(), FakePool()
    pool.spans = {"a:1": (0, 3), "b:1": (3, 6)}
    await discovery.publisher.publish((_endpoint("a:1", "0:3"), _endpoint("b:1", "3:6")))
    changes: list[list[str]] = []

    async def on_change(complete: bool, joined: list[WorkerInfo]) -> None:
        changes.append(sorted(w.worker_id for w in joined))

    topology = Topology(discovery, pool, on_change, redescribe_s=3600)  # the periodic recheck never comes
    await topology.start()
    try:
        await _until(topology, {"a:1": (0, 3), "b:1": (3, 6)}, 1)
        pool.spans = {"a:1": (3, 6), "b:1": (0, 3)}  # both restarted, swapped: Consul Meta says so
        await discovery.publisher.publish((_endpoint("a:1", "3:6"), _endpoint("b:1", "0:3")))
        await _until(topology, {"a:1": (3, 6), "b:1": (0, 3)}, 2)
        assert topology.redescribes == 2 and topology.is_complete()
        assert changes[-1] == ["a:1-3-6", "b:1-0-3"]  # reported as joined: a clean outlier record
    finally:
        await topology.close()


async def test_plans_and_stage_groups_follow_the_table_they_were_memoised_with() -> None:
    """Every request plans, so plans are memoised per table: a changed table must never serve an old plan."""
    discovery, pool = FakeDiscovery(), FakePool()
    pool.spans = {"a:1": (0, 3), "b:1": (3, 6), "c:1": (3, 6)}
    await discovery.publisher.publish(tuple(_endpoint(a, f"{s}:{e}") for a, (s, e) in pool.spans.items()))
    topology = Topology(discovery, pool, redescribe_s=3600)
    await topology.start()
    try:
        await _until(topology, {"a:1": (0, 3), "b:1": (3, 6), "c:1": (3, 6)}, 1)
        first = topology.plan()
        assert topology.plan() is first  # memoised
        avoiding_b = topology.plan(excluded=frozenset({"b:1-3-6"}))
        assert [r.worker_id for r in avoiding_b.stages[1].replicas] == ["c:1-3-6"]
        assert topology.stage_groups()[("c", LayerSpan(3, 6))] == ("b:1-3-6", "c:1-3-6")
        pool.spans = {"a:1": (0, 3), "b:1": (3, 6), "c:1": (0, 3)}  # c restarted with the other half
        await discovery.publisher.publish(tuple(_endpoint(a, f"{s}:{e}") for a, (s, e) in pool.spans.items()))
        await _until(topology, {"a:1": (0, 3), "b:1": (3, 6), "c:1": (0, 3)}, 2)
        after = topology.plan()
        assert after is not first
        assert sorted(r.worker_id for r in after.stages[0].replicas) == ["a:1-0-3", "c:1-0-3"]
        assert topology.stage_groups()[("c", LayerSpan(3, 6))] == ("b:1-3-6",)
        with pytest.raises(Unavailable):
            topology.plan(excluded=frozenset({"b:1-3-6"}))  # the memoised plan through c is gone
    finally:
        await topology.close()


async def test_suspect_and_the_periodic_recheck_describe_again_without_a_discovery_change() -> None:
    discovery, pool = FakeDiscovery(), FakePool()
    pool.spans = {"a:1": (0, 6)}
    await discovery.publisher.publish((Endpoint(address="a:1"),))
    topology = Topology(discovery, pool, redescribe_s=3600)
    await topology.start()
    try:
        await _until(topology, {"a:1": (0, 6)}, 1)
        pool.spans = {"a:1": (0, 3)}
        calls = len(pool.calls)
        await asyncio.sleep(0.3)
        assert len(pool.calls) == calls  # nothing asks: nothing is described
        topology.suspect("a:1", "a hop answered FAILED_PRECONDITION about its layers")
        await _until(topology, {"a:1": (0, 3)}, 1)
    finally:
        await topology.close()

    periodic = Topology(discovery, pool, redescribe_s=0.2)
    await periodic.start()
    try:
        pool.spans = {"a:1": (3, 6)}
        await _until(periodic, {"a:1": (3, 6)}, 2)
    finally:
        await periodic.close()


async def test_workers_discovery_forgets_while_they_serve_stay_for_a_grace_period() -> None:
    """An agent restarted without its data lists nothing until the workers register again: the router keeps
    the ones that still answer SERVING (a draining worker answers NOT_SERVING and leaves at once)."""
    discovery, pool = FakeDiscovery(), FakePool()
    pool.spans = {"a:1": (0, 3), "b:1": (3, 6)}
    await discovery.publisher.publish((_endpoint("a:1", "0:3"), _endpoint("b:1", "3:6")))
    topology = Topology(discovery, pool, redescribe_s=0.1, unlisted_grace_s=0.6)
    await topology.start()
    try:
        await _until(topology, {"a:1": (0, 3), "b:1": (3, 6)}, 1)
        pool.serving = frozenset({"a:1"})  # b is draining
        await discovery.publisher.publish(())  # the agent forgot both
        await _until(topology, {"a:1": (0, 3)}, 1)
        await asyncio.sleep(0.3)
        assert [w.address for w in topology.workers] == ["a:1"]  # still kept, within the grace period
        await discovery.publisher.publish((_endpoint("a:1", "0:3"), _endpoint("b:1", "3:6")))  # registered again
        await _until(topology, {"a:1": (0, 3), "b:1": (3, 6)}, 1)
        await discovery.publisher.publish((_endpoint("b:1", "3:6"),))
        await _until(topology, {"a:1": (0, 3), "b:1": (3, 6)}, 1)
        await _until(topology, {"b:1": (3, 6)}, 2)  # a never came back: dropped once the grace ran out
    finally:
        await topology.close()
