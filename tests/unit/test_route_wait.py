"""The coverage wait (router/planning/route_wait.py): budget and deadline arithmetic, and the re-plan loop."""

from __future__ import annotations

import asyncio

import pytest

from services.errors import FailedPrecondition, Unavailable
from router.planning.route_wait import RouteWait, plan_waiting


def test_next_wait_is_the_poll_until_the_budget_or_deadline_runs_out() -> None:
    wait = RouteWait(limit_s=10.0, deadline=100.0, poll_s=0.5, reserve_s=0.5)
    assert wait.next_wait(now=50.0, since=50.0) == 0.5
    assert wait.next_wait(now=59.8, since=50.0) == pytest.approx(0.2)  # 10 s budget nearly spent
    assert wait.next_wait(now=60.0, since=50.0) == 0.0
    # The deadline comes first, less the reserve that lets the client hear UNAVAILABLE and why.
    assert RouteWait(limit_s=10.0, deadline=50.8, reserve_s=0.5).next_wait(now=50.0, since=50.0) == pytest.approx(0.3)
    assert RouteWait(limit_s=10.0, deadline=50.5, reserve_s=0.5).next_wait(now=50.0, since=50.0) == 0.0
    assert RouteWait(limit_s=0.0, deadline=100.0).next_wait(now=50.0, since=50.0) == 0.0


def test_the_budget_is_shared_by_every_wait_of_one_request() -> None:
    wait = RouteWait(limit_s=10.0, deadline=1000.0)
    wait.finish(now=7.0, since=1.0)  # a first wait of 6 s (e.g. at the first hop)
    assert wait.waited_s == 6.0
    assert wait.next_wait(now=20.0, since=20.0) == 0.5
    assert wait.next_wait(now=23.9, since=20.0) == pytest.approx(0.1)
    assert wait.next_wait(now=24.0, since=20.0) == 0.0


def test_explain_keeps_the_original_message() -> None:
    wait = RouteWait(limit_s=10.0, deadline=1000.0)
    assert wait.explain(Unavailable("no healthy replica left for layers 0:3")).message == "no healthy replica left for layers 0:3"
    wait.finish(now=12.5, since=2.5)
    message = wait.explain(Unavailable("no healthy replica left for layers 0:3")).message
    assert message.startswith("no healthy replica left for layers 0:3; waited 10.0 s for coverage"), message


class FakeTopology:
    """A version that a test bumps, and a plan that fails until ``covered``."""

    def __init__(self) -> None:
        self.version = 0
        self.event = asyncio.Event()
        self.covered = False
        self.plans = 0

    def plan(self) -> str:
        self.plans += 1
        if not self.covered:
            raise Unavailable("no healthy replica left for layers 3:6")
        return "route"

    def bump(self, covered: bool) -> None:
        self.covered = covered
        self.version += 1
        self.event.set()
        self.event = asyncio.Event()

    async def wait_version(self, version: int, timeout: float) -> int:
        if version == self.version:
            event = self.event
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                pass
        return self.version


async def _plan(topo: FakeTopology, wait: RouteWait | None, **kw: object) -> str:
    return await plan_waiting(topo.plan, wait, topo.wait_version, lambda: topo.version, **kw)  # type: ignore[arg-type]


def test_a_change_that_restores_coverage_ends_the_wait_at_once() -> None:
    async def main() -> tuple[str, float, int]:
        topo = FakeTopology()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, topo.bump, False)  # a change that does not help: plan again, keep waiting
        loop.call_later(0.15, topo.bump, True)
        start = loop.time()
        wait = RouteWait(limit_s=5.0, deadline=loop.time() + 5.0, poll_s=10.0)  # no poll: events only
        result = await _plan(topo, wait)
        return result, loop.time() - start, topo.plans

    result, elapsed, plans = asyncio.run(main())
    assert result == "route" and 0.1 < elapsed < 1.0, elapsed
    assert plans == 3  # first try, the unhelpful change, the helpful one


def test_coverage_without_an_event_is_found_by_the_poll() -> None:
    async def main() -> float:
        topo = FakeTopology()
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, setattr, topo, "covered", True)  # e.g. an ejection expired: no table change
        start = loop.time()
        assert await _plan(topo, RouteWait(limit_s=5.0, deadline=loop.time() + 5.0, poll_s=0.2)) == "route"
        return loop.time() - start

    assert 0.1 < asyncio.run(main()) < 1.0


def test_gives_up_with_the_original_error_when_the_wait_ends() -> None:
    async def main() -> tuple[str, float]:
        topo = FakeTopology()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(Unavailable) as caught:
            await _plan(topo, RouteWait(limit_s=0.3, deadline=loop.time() + 5.0, poll_s=0.1))
        return caught.value.message, loop.time() - start

    message, elapsed = asyncio.run(main())
    assert message.startswith("no healthy replica left for layers 3:6; waited 0.3 s for coverage"), message
    assert 0.28 < elapsed < 1.0


def test_no_wait_configured_or_a_configuration_error_fails_at_once() -> None:
    async def main() -> None:
        topo = FakeTopology()
        with pytest.raises(Unavailable) as caught:
            await _plan(topo, RouteWait(limit_s=0.0, deadline=1e12))
        assert "waited" not in caught.value.message and topo.plans == 1

        def misconfigured() -> str:
            raise FailedPrecondition("no complete route over layers 0:6: missing layers 3:5")

        with pytest.raises(FailedPrecondition):  # never served: waiting would not help
            await plan_waiting(misconfigured, RouteWait(limit_s=5.0, deadline=1e12), topo.wait_version, lambda: 0)

    asyncio.run(asyncio.wait_for(main(), 2.0))


def test_on_change_runs_before_each_replan() -> None:
    async def main() -> list[int]:
        topo = FakeTopology()
        seen: list[int] = []

        async def forgive() -> None:
            seen.append(topo.version)
            topo.covered = len(seen) >= 2  # e.g. a failed worker answers SERVING again

        loop = asyncio.get_running_loop()
        await _plan(topo, RouteWait(limit_s=5.0, deadline=loop.time() + 5.0, poll_s=0.05), on_change=forgive)
        return seen

    assert len(asyncio.run(main())) == 2
