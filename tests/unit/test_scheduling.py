"""Router scheduling logic: priority/tenant resolution, queue policies and the concurrency gate."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.config import parse_tenant_weights
from services.errors import ConfigError, DeadlineExceeded, InvalidArgument, ResourceExhausted
from router.scheduling import CallerInfo, Ewma, Scheduler, SchedulerSettings, resolve_priority, resolve_tenant
from router.scheduling.context import current_priority, hop_priority, set_default_level
from router.scheduling.metrics import OTHER, SchedulerMetrics
from router.scheduling.policies import FairPolicy, FcfsPolicy, MlfqPolicy, PriorityPolicy, mlfq_level
from router.scheduling.ticket import Ticket


def tk(seq: int, priority: int = 2, tenant: str = "t", kind: str = "infer", tokens: int = 0, at: float = 0.0) -> Ticket:
    return Ticket(seq, kind, priority, tenant, enqueued=at, tokens=tokens)


def drain(policy, now: float = 0.0) -> list[int]:
    out = []
    while len(policy):
        out.append(policy.pop(now).seq)
    return out


# --- who is asking -------------------------------------------------------------------------------------------

def test_priority_field_wins_over_metadata_and_zero_is_default() -> None:
    assert resolve_priority(1, "3", levels=3, default_level=2) == 1
    assert resolve_priority(0, "3", levels=3, default_level=2) == 3
    assert resolve_priority(0, None, levels=3, default_level=2) == 2
    assert resolve_priority(0, " 0 ", levels=3, default_level=2) == 2


@pytest.mark.parametrize("field,meta,needle", [
    (4, None, "priority: 4 is out of range; send 1 (highest) .. 3"),
    (0, "9", "metadata x-shardmesh-priority: 9 is out of range"),
    (0, "high", "metadata x-shardmesh-priority: 'high' is not an integer"),
    (0, "-1", "out of range"),
])
def test_bad_priority_is_invalid_argument_naming_the_range(field: int, meta: str | None, needle: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_priority(field, meta, levels=3, default_level=2)
    assert needle in info.value.message


def test_tenant_authenticated_wins_then_metadata_then_default() -> None:
    assert resolve_tenant("alice", "bob") == "alice"
    assert resolve_tenant(None, " bob ") == "bob"
    assert resolve_tenant(None, None) == "default"
    with pytest.raises(InvalidArgument, match="x-shardmesh-tenant"):
        resolve_tenant(None, "bad tenant\n")
    with pytest.raises(InvalidArgument, match="at most 64"):
        resolve_tenant(None, "x" * 65)


def test_caller_from_metadata_takes_first_value_of_each_key() -> None:
    md = (("x-shardmesh-priority", "1"), ("x-shardmesh-tenant", b"acme"), ("x-shardmesh-priority", "3"), ("k", "v"))
    caller = CallerInfo.from_metadata(md, "auth")
    assert caller == CallerInfo("1", "acme", "auth")
    assert CallerInfo.from_metadata(None) == CallerInfo()


def test_tenant_weights_parse_and_errors() -> None:
    assert parse_tenant_weights("a=3, b=1") == {"a": 3.0, "b": 1.0}
    assert parse_tenant_weights("# file\na = 2.5\n\nb=1  # comment\n") == {"a": 2.5, "b": 1.0}
    for bad, needle in [("a", "not TENANT=WEIGHT"), ("a=x", "not a number"), ("a=0", "positive"),
                        ("a=1,a=2", "named twice"), ("a=inf", "positive")]:
        with pytest.raises(ConfigError, match=needle):
            parse_tenant_weights(bad)


def test_hop_priority_is_scoped_and_never_zero() -> None:
    set_default_level(2)
    assert current_priority() == 2
    with hop_priority(1):
        assert current_priority() == 1
    assert current_priority() == 2


def test_ewma_needs_min_samples_then_tracks() -> None:
    e = Ewma(alpha=0.5, min_samples=2)
    e.observe(1.0)
    assert e.value is None
    e.observe(3.0)
    assert e.value == pytest.approx(2.0)


def test_metrics_cap_tenant_labels() -> None:
    m = SchedulerMetrics(["named"])
    labels = {m.tenant_label(f"t{i}") for i in range(100)}
    assert OTHER in labels and len(labels) == 65
    assert m.tenant_label("named") == "named"


# --- policies -----------------------------------------------------------------------------------------------

def test_fcfs_ignores_priority_and_holds_sessions() -> None:
    p = FcfsPolicy()
    for seq, prio in [(0, 3), (1, 1), (2, 2)]:
        p.push(tk(seq, prio), 0.0)
    assert drain(p) == [0, 1, 2]
    assert not p.preempts_sessions


def test_priority_is_strict_then_arrival() -> None:
    p = PriorityPolicy()
    for seq, prio in [(0, 3), (1, 2), (2, 1), (3, 2), (4, 1)]:
        p.push(tk(seq, prio), 0.0)
    assert drain(p) == [2, 4, 1, 3, 0]


def test_removed_tickets_are_skipped() -> None:
    p = PriorityPolicy()
    tickets = [tk(i) for i in range(3)]
    for t in tickets:
        p.push(t, 0.0)
    assert p.remove(tickets[1]) and not p.remove(tickets[1])
    assert len(p) == 2 and drain(p) == [0, 2]


def test_mlfq_levels_double() -> None:
    assert [mlfq_level(n, 8, 4) for n in (0, 7, 8, 23, 24, 55, 56, 10_000)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_mlfq_short_request_passes_demoted_sessions() -> None:
    p = MlfqPolicy(quantum=8, levels=4, boost_s=10.0)
    p.push(tk(0, kind="step", tokens=40), 0.0)  # a long generation's step (level 2)
    p.push(tk(1, kind="step", tokens=3), 0.0)  # a young session (level 0)
    p.push(tk(2, kind="infer"), 0.0)  # a short request
    p.push(tk(3, kind="step", tokens=12), 0.0)  # level 1
    assert drain(p, now=1.0) == [1, 2, 3, 0]


def test_mlfq_priority_first_and_boost_prevents_starvation() -> None:
    p = MlfqPolicy(quantum=8, levels=4, boost_s=1.0)
    p.push(tk(0, priority=2, kind="step", tokens=100, at=0.0), 0.0)
    p.push(tk(1, priority=2, kind="infer", at=5.0), 5.0)
    p.push(tk(2, priority=1, kind="step", tokens=100, at=5.0), 5.0)
    assert p.pop(5.5).seq == 2  # strict priority
    assert p.pop(5.5).seq == 0  # waited 5.5 s > boost: served before the newer level-0 request
    assert p.pop(5.5).seq == 1


def test_fair_shares_dispatches_by_weight() -> None:
    p = FairPolicy({"a": 3.0, "b": 1.0})
    seq = 0
    for _ in range(40):
        for tenant in ("a", "b"):
            p.push(tk(seq, tenant=tenant), 0.0)
            seq += 1
    first = [p.pop(0.0).tenant for _ in range(40)]
    assert first.count("a") == 30 and first.count("b") == 10


def test_fair_idle_tenant_does_not_bank_credit() -> None:
    p = FairPolicy({})
    for i in range(10):
        p.push(tk(i, tenant="busy"), 0.0)
    for _ in range(8):
        p.pop(0.0)
    # a newcomer starts at the current virtual time: it alternates with busy, it does not run 8 times in a row
    for i in range(10, 14):
        p.push(tk(i, tenant="new"), 0.0)
    order = [p.pop(0.0).tenant for _ in range(4)]
    assert order.count("new") == 2


def test_fair_priority_is_strict() -> None:
    p = FairPolicy({"a": 100.0})
    p.push(tk(0, priority=2, tenant="a"), 0.0)
    p.push(tk(1, priority=1, tenant="b"), 0.0)
    assert drain(p) == [1, 0]


# --- the gate -----------------------------------------------------------------------------------------------

def sched(schedule: str = "priority", limit: int = 1, **kw) -> Scheduler:
    return Scheduler(SchedulerSettings(schedule=schedule, max_concurrency=limit, **kw))


def far() -> float:
    return time.monotonic() + 30.0


async def test_gate_orders_waiters_by_priority() -> None:
    s = sched()
    first = s.ticket("infer", 2, "t")
    await s.acquire(first, far())
    order: list[int] = []

    async def run(priority: int) -> None:
        t = s.ticket("infer", priority, "t")
        await s.acquire(t, far())
        order.append(priority)
        s.release(t, 0.001)

    tasks = [asyncio.create_task(run(p)) for p in (3, 2, 1)]
    await asyncio.sleep(0.01)
    assert s.queued == 3 and s.running == 1
    s.release(first, 0.001)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order == [1, 2, 3] and s.running == 0 and s.queued == 0


async def test_full_queue_is_resource_exhausted_naming_queue_and_limit() -> None:
    s = sched(queue_size=1)
    held = s.ticket("infer", 2, "t")
    await s.acquire(held, far())
    waiter = asyncio.create_task(s.acquire(s.ticket("infer", 2, "t"), far()))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted) as info:
        await s.acquire(s.ticket("infer", 2, "t"), far())
    assert "queue priority-2 is full: 1 requests waiting (limit --queue-size 1)" in info.value.message
    other = asyncio.create_task(s.acquire(s.ticket("infer", 1, "t"), far()))
    await asyncio.sleep(0.01)
    assert not other.done() and s.waiting[1] == 1
    # a running generation's step is never refused for queue size
    step = asyncio.create_task(s.acquire(s.ticket("step", 2, "t", tokens=5), far()))
    await asyncio.sleep(0.01)
    assert not step.done()
    for t in (waiter, other, step):
        t.cancel()
    await asyncio.gather(waiter, other, step, return_exceptions=True)
    assert s.queued == 0 and sum(s.waiting.values()) == 0 and s.running == 1


async def test_queue_timeout_is_resource_exhausted() -> None:
    s = sched(queue_timeout_s=0.05)
    await s.acquire(s.ticket("infer", 2, "t"), far())
    started = time.monotonic()
    with pytest.raises(ResourceExhausted, match="--queue-timeout-ms 50"):
        await s.acquire(s.ticket("infer", 3, "t"), far())
    assert 0.04 < time.monotonic() - started < 1.0
    assert s.queued == 0 and s.waiting[3] == 0


def warm(s: Scheduler, kind: str, seconds: float) -> None:
    for _ in range(5):
        s.estimates[kind].observe(seconds)


async def test_deadline_shorter_than_service_is_refused_at_once() -> None:
    s = sched(limit=4)
    warm(s, "infer", 0.2)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="200 ms expected service time"):
        await s.acquire(s.ticket("infer", 2, "t"), time.monotonic() + 0.1)
    assert time.monotonic() - started < 0.05
    assert s.running == 0
    await s.acquire(s.ticket("infer", 2, "t"), time.monotonic() + 0.5)  # enough time: admitted
    assert s.running == 1
    off = sched(limit=4, deadline_admission=False)
    warm(off, "infer", 0.2)
    await off.acquire(off.ticket("infer", 2, "t"), time.monotonic() + 0.1)


async def test_queue_wait_counts_in_admission() -> None:
    s = sched(limit=1)
    warm(s, "infer", 0.1)
    await s.acquire(s.ticket("infer", 2, "t"), far())
    waiters = [asyncio.create_task(s.acquire(s.ticket("infer", 2, "t"), far())) for _ in range(4)]
    await asyncio.sleep(0.01)
    # 4 queued ahead at 100 ms each on one slot: 0.3 s is not enough, at priority 2 ...
    with pytest.raises(DeadlineExceeded, match=r"\+ 400 ms queue wait at priority 2"):
        await s.acquire(s.ticket("infer", 2, "t"), time.monotonic() + 0.3)
    # ... but priority 1 jumps that queue
    high = asyncio.create_task(s.acquire(s.ticket("infer", 1, "t"), time.monotonic() + 0.3))
    await asyncio.sleep(0.01)
    assert not high.done()
    for t in (*waiters, high):
        t.cancel()
    await asyncio.gather(*waiters, high, return_exceptions=True)


async def test_queued_request_leaves_once_it_cannot_finish() -> None:
    s = sched(limit=1)
    warm(s, "infer", 0.2)
    await s.acquire(s.ticket("infer", 2, "t"), far())
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="dropped before running"):
        await s.acquire(s.ticket("infer", 2, "t"), time.monotonic() + 0.3)
    assert 0.05 < time.monotonic() - started < 0.25  # left ~0.2 s before its deadline, not at it


async def test_cancelled_waiter_frees_its_place_and_granted_slot() -> None:
    s = sched(limit=1)
    held = s.ticket("infer", 2, "t")
    await s.acquire(held, far())
    waiter = asyncio.create_task(s.acquire(s.ticket("infer", 2, "t"), far()))
    await asyncio.sleep(0.01)
    s.release(held, None)  # grants the waiter's slot ...
    waiter.cancel()  # ... and the caller goes away before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert s.running == 0 and s.queued == 0


async def test_slot_feeds_estimate_only_on_success() -> None:
    s = sched(limit=2)
    for _ in range(5):
        async with s.slot(s.ticket("infer", 2, "t"), far()):
            pass
    assert s.estimates["infer"].samples == 5
    with pytest.raises(RuntimeError):
        async with s.slot(s.ticket("infer", 2, "t"), far()):
            raise RuntimeError("boom")
    assert s.estimates["infer"].samples == 5 and s.running == 0


async def test_limit_follows_capacity_callable() -> None:
    cap = [1]
    s = Scheduler(SchedulerSettings(schedule="fcfs"), lambda: cap[0])
    await s.acquire(s.ticket("infer", 2, "t"), far())
    waiter = asyncio.create_task(s.acquire(s.ticket("infer", 2, "t"), far()))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    cap[0] = 3  # e.g. a replica joined: the next acquire dispatches the waiter first, then runs
    await s.acquire(s.ticket("infer", 2, "t"), far())
    await asyncio.wait_for(waiter, 1)
    assert s.running == 3


def test_settings_reject_default_outside_levels() -> None:
    with pytest.raises(ValueError, match="--default-priority 4"):
        SchedulerSettings(priority_levels=3, default_priority=4)


async def test_queue_time_and_refusals_are_prometheus_metrics() -> None:
    from prometheus_client import REGISTRY

    labels = {"priority": "1", "tenant": "metrics-tenant", "kind": "infer"}
    before = REGISTRY.get_sample_value("shardmesh_queue_seconds_count", labels) or 0.0
    s = Scheduler(SchedulerSettings(schedule="priority", max_concurrency=1, queue_size=1), observer=SchedulerMetrics())
    held = s.ticket("infer", 1, "metrics-tenant")
    await s.acquire(held, far())
    waiter = asyncio.create_task(s.acquire(s.ticket("infer", 1, "metrics-tenant"), far()))
    await asyncio.sleep(0.05)
    with pytest.raises(ResourceExhausted):
        await s.acquire(s.ticket("infer", 1, "metrics-tenant"), far())
    s.release(held, None)
    await waiter
    assert REGISTRY.get_sample_value("shardmesh_queue_seconds_count", labels) == before + 2
    assert (REGISTRY.get_sample_value("shardmesh_queue_seconds_sum", labels) or 0.0) >= 0.04  # the waiter's wait
    refused = {"priority": "1", "tenant": "metrics-tenant", "reason": "full"}
    assert REGISTRY.get_sample_value("shardmesh_schedule_refused_total", refused) == 1.0
