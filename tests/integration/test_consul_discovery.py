"""ConsulDiscovery and ConsulRegistrar against a Consul agent (the emulator, or CONSUL_HTTP_ADDR).

Discovery runs with a 1 s blocking wait so that every behaviour shows within a couple of seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import consul.aio
import pytest
from grpc_health.v1 import health_pb2

from services.discovery.base import DiscoverySnapshot
from services.discovery.consul import ConsulDiscovery
from services.discovery.consul_client import ConsulAddress
from services.discovery.registration import ConsulRegistrar, parse_worker_meta, worker_meta
from services.discovery.url import build_discovery, parse_discovery
from tests.consul_emulator.process import EmulatorControl
from tests.consul_fixtures import eventually, serve_health

pytestmark = [pytest.mark.integration, pytest.mark.consul]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@asynccontextmanager
async def watching(address: ConsulAddress, service: str, **options: Any) -> AsyncIterator[ConsulDiscovery]:
    options = {"wait": "1s", "start_timeout_s": 3.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
               "http_timeout_margin_s": 0.5, "rate_per_s": 50.0, **options}
    discovery = ConsulDiscovery(address, service, **options)
    await discovery.start()
    try:
        yield discovery
    finally:
        await discovery.close()


async def until(discovery: ConsulDiscovery, accept: Callable[[DiscoverySnapshot], bool], timeout_s: float = 8.0,
                what: str = "snapshot") -> DiscoverySnapshot:
    """Waits on wait_changed (no polling) until a snapshot satisfies ``accept``."""
    deadline = time.monotonic() + timeout_s
    snap = discovery.snapshot()
    while not accept(snap):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what} not reached within {timeout_s}s; last: {snap}")
        snap = await discovery.wait_changed(snap.version, left)
    return snap


def ids(snap: DiscoverySnapshot) -> list[str]:
    return [e.service_id for e in snap.endpoints]


async def register_ttl(client: consul.aio.Consul, name: str, sid: str, port: int, *, passing: bool = True,
                       ttl: str = "30s", meta: dict[str, str] | None = None) -> str:
    check_id = f"{sid}:ttl"
    assert await client.agent.service.register(name, service_id=sid, address="127.0.0.1", port=port, meta=meta,
                                               check={"CheckID": check_id, "TTL": ttl}, replace_existing_checks=True)
    if passing:
        assert await client.agent.check.ttl_pass(check_id)
    return check_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_discovery_follows_registrations_and_checks(consul_address: ConsulAddress, consul_client: consul.aio.Consul,
                                                          consul_service_name: str) -> None:
    a, b = f"{consul_service_name}-a", f"{consul_service_name}-b"
    async with watching(consul_address, consul_service_name) as discovery:
        snap = discovery.snapshot()
        assert (snap.endpoints, snap.stale) == ((), False)

        check_a = await register_ttl(consul_client, consul_service_name, a, 7101, meta={"layers": "0:3"})
        snap = await until(discovery, lambda s: ids(s) == [a], what="instance a")
        endpoint = snap.endpoints[0]
        assert (endpoint.address, endpoint.service_id, dict(endpoint.meta)) == ("127.0.0.1:7101", a, {"layers": "0:3"})

        await register_ttl(consul_client, consul_service_name, b, 7102, passing=False)
        await register_ttl(consul_client, consul_service_name, b, 7102)
        await until(discovery, lambda s: ids(s) == [a, b], what="instances a and b")

        assert await consul_client.agent.check.ttl_fail(check_a, notes="broken")
        await until(discovery, lambda s: ids(s) == [b], what="a dropped while critical")
        assert await consul_client.agent.check.ttl_pass(check_a)
        await until(discovery, lambda s: ids(s) == [a, b], what="a back when passing")

        assert await consul_client.agent.service.deregister(b)
        snap = await until(discovery, lambda s: ids(s) == [a], what="b gone after deregistration")
        assert not snap.stale and discovery.watch_errors == 0


async def test_discovery_drops_an_instance_whose_grpc_check_fails(consul_address: ConsulAddress,
                                                                  consul_service_name: str) -> None:
    async with serve_health() as hs, watching(consul_address, consul_service_name) as discovery:
        registrar = ConsulRegistrar(consul_address, service_name=consul_service_name, service_id="w-grpc",
                                    address="127.0.0.1", port=hs.port, interval_s=0.2, check_timeout_s=1.0)
        await registrar.register()
        try:
            await until(discovery, lambda s: ids(s) == ["w-grpc"], what="the worker passing")
            await hs.servicer.set("", NOT_SERVING)
            await until(discovery, lambda s: ids(s) == [], what="the worker dropped on NOT_SERVING")
            await hs.servicer.set("", SERVING)
            await until(discovery, lambda s: ids(s) == ["w-grpc"], what="the worker back on SERVING")
        finally:
            await registrar.deregister()
            await registrar.close()


async def test_a_return_without_a_change_publishes_nothing(consul_emulator: EmulatorControl, consul_address: ConsulAddress,
                                                           consul_client: consul.aio.Consul, consul_service_name: str) -> None:
    await register_ttl(consul_client, consul_service_name, "same", 7103)
    async with watching(consul_address, consul_service_name, wait="10s") as discovery:
        snap = await until(discovery, lambda s: ids(s) == ["same"])
        queries = discovery.queries
        consul_emulator.touch(consul_service_name)  # new index, same result
        await eventually(lambda: discovery.queries, lambda q: q > queries, timeout_s=3, what="a wake-up")
        assert discovery.snapshot().version == snap.version


@pytest.mark.parametrize("mode", ["refuse", "error", "hang"])
async def test_outage_keeps_last_endpoints_as_stale_then_catches_up(
    mode: str, consul_emulator: EmulatorControl, consul_address: ConsulAddress, consul_client: consul.aio.Consul,
    consul_service_name: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.discovery.consul")
    await register_ttl(consul_client, consul_service_name, "ttl-worker", 7104, ttl="1s")
    async with serve_health(status=NOT_SERVING) as hs, watching(consul_address, consul_service_name) as discovery:
        assert await consul_client.agent.service.register(
            consul_service_name, service_id="grpc-worker", address="127.0.0.1", port=hs.port,
            check={"CheckID": "grpc-worker:health", "GRPC": hs.address, "Interval": "100ms"})
        await until(discovery, lambda s: ids(s) == ["ttl-worker"], what="the TTL worker")
        assert await consul_client.agent.check.ttl_pass("ttl-worker:ttl")

        consul_emulator.pause(mode)
        snap = await until(discovery, lambda s: s.stale, what="a stale snapshot")
        assert ids(snap) == ["ttl-worker"]  # last known endpoints kept
        assert snap.detail.startswith("consul unreachable since ")
        # Meanwhile the TTL worker stops heartbeating (its TTL expires) and the gRPC worker comes up.
        await hs.servicer.set("", SERVING)
        await eventually(consul_emulator.state, lambda st: st["checks"] == {"ttl-worker:ttl": "critical",
                                                                           "grpc-worker:health": "passing"},
                         timeout_s=5, what="both changes inside the emulator")
        assert discovery.snapshot().stale and discovery.watch_errors >= 1
        consul_emulator.resume()

        snap = await until(discovery, lambda s: not s.stale, what="recovery")
        assert ids(snap) == ["grpc-worker"] and snap.detail == ""
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unreachable" in r.getMessage()]
    recoveries = [r for r in caplog.records if r.levelno == logging.INFO and "reachable again" in r.getMessage()]
    assert len(warnings) == 1 and len(recoveries) == 1  # once per outage, however many retries


@pytest.mark.parametrize("backend", ["rpc", "streaming"])
async def test_index_going_backwards_resets_the_watch(backend: str, consul_emulator: EmulatorControl,
                                                      consul_address: ConsulAddress, consul_client: consul.aio.Consul,
                                                      consul_service_name: str) -> None:
    """A server agent wakes watchers at once on a restore; a client agent's streaming backend shows the
    lower index only when ``wait`` runs out, so recovery is bounded by wait x 17/16 there."""
    consul_emulator.mode(blocking=backend)
    wait_s = 2.0
    await register_ttl(consul_client, consul_service_name, "before", 7105)
    async with watching(consul_address, consul_service_name, wait=f"{wait_s:g}s") as discovery:
        await until(discovery, lambda s: ids(s) == ["before"])
        await asyncio.sleep(0.2)  # the watch is now blocked on the current index
        started = time.monotonic()
        consul_emulator.restore(2)
        bound = 1.5 if backend == "rpc" else wait_s * 17 / 16 + 1.5
        await eventually(lambda: discovery.index_resets, lambda n: n >= 1, timeout_s=bound, what="an index reset")
        reset_s = time.monotonic() - started
        if backend == "streaming":
            assert reset_s > wait_s * 0.5, "the streaming backend does not wake a watcher on a restore"
        started = time.monotonic()
        await register_ttl(consul_client, consul_service_name, "after", 7106)
        snap = await until(discovery, lambda s: sorted(ids(s)) == ["after", "before"], timeout_s=4, what="the change after reset")
        assert time.monotonic() - started < 2.0  # not stuck blocking on the old, higher index
        assert not snap.stale and 0 < discovery.last_index <= 10


async def test_answers_without_an_index_fall_back_to_rate_limited_polls(consul_emulator: EmulatorControl,
                                                                         consul_address: ConsulAddress,
                                                                         consul_client: consul.aio.Consul,
                                                                         consul_service_name: str) -> None:
    """A proxy that strips X-Consul-Index must not look like an outage: poll without blocking instead."""
    consul_emulator.mode(strip_index=True)
    await register_ttl(consul_client, consul_service_name, "a", 7110)
    async with watching(consul_address, consul_service_name, poll_interval_s=0.3) as discovery:
        snap = await until(discovery, lambda s: ids(s) == ["a"], timeout_s=5, what="the first poll")
        assert not snap.stale and discovery.polling
        await register_ttl(consul_client, consul_service_name, "b", 7111)
        await until(discovery, lambda s: ids(s) == ["a", "b"], timeout_s=3, what="a change seen by polling")
        queries = discovery.queries
        await asyncio.sleep(1.5)
        assert discovery.queries - queries <= 1.5 / 0.3 + 1  # paced by poll_interval_s, not spinning
        assert discovery.unindexed_answers >= 3 and discovery.watch_errors == 0
        consul_emulator.mode(strip_index=False)
        await eventually(lambda: discovery.polling, lambda p: not p, timeout_s=3, what="blocking again")
        assert not discovery.snapshot().stale


@pytest.mark.parametrize("check", ["grpc", "ttl"])
@pytest.mark.parametrize("how", ["forget", "deregister"])
async def test_registrar_registers_again_when_the_agent_forgot_it(
    check: str, how: str, request: pytest.FixtureRequest, consul_address: ConsulAddress,
    consul_client: consul.aio.Consul, consul_service_name: str,
) -> None:
    """An agent restarted without its data (emulator ``forget``), or an operator's deregistration, is undone
    within ``resync_s`` for both check kinds; a gRPC check alone would never tell the worker."""
    control = request.getfixturevalue("consul_emulator") if how == "forget" else None
    sid = f"w-{how}-{check}"
    async with serve_health() as hs:
        registrar = ConsulRegistrar(consul_address, service_name=consul_service_name, service_id=sid,
                                    address="127.0.0.1", port=hs.port, check=check,  # type: ignore[arg-type]
                                    interval_s=0.2, check_timeout_s=1.0, ttl_s=1.2, resync_s=0.4)
        await registrar.register()
        try:
            await eventually(consul_client.agent.checks, lambda c: c[f"{sid}:health"]["Status"] == "passing",
                             what="the check passing")
            started = time.monotonic()
            if control is not None:
                assert sid in control.forget()
            else:
                assert await consul_client.agent.service.deregister(sid)
            assert sid not in await consul_client.agent.services()
            await eventually(consul_client.agent.services, lambda s: sid in s, timeout_s=3, what="re-registration")
            assert time.monotonic() - started < registrar.resync_s + 1.0
            assert registrar.reregistrations == 1
            _, entries = await eventually(lambda: consul_client.health.service(consul_service_name, passing=True),
                                          lambda r: [e["Service"]["ID"] for e in r[1]] == [sid], timeout_s=3,
                                          what="passing again in the catalog")
        finally:
            await registrar.deregister()
            await registrar.close()


async def test_start_is_bounded_when_consul_is_down() -> None:
    address = ConsulAddress(host="127.0.0.1", port=free_port())
    before = {t for t in asyncio.all_tasks()}
    started = time.monotonic()
    async with watching(address, "nothing", start_timeout_s=0.5) as discovery:
        assert time.monotonic() - started < 1.5
        snap = discovery.snapshot()
        assert snap.endpoints == () and snap.stale and "unreachable" in snap.detail
        assert discovery.watch_errors >= 1 and discovery.last_success_monotonic is None
    assert {t for t in asyncio.all_tasks()} == before  # close() left no task behind


async def test_build_discovery_from_a_url(consul_address: ConsulAddress, consul_client: consul.aio.Consul,
                                          consul_service_name: str) -> None:
    await register_ttl(consul_client, consul_service_name, "via-url", 7107)
    spec = parse_discovery(f"consul://{consul_address.hostport}?service={consul_service_name}", {})
    discovery = build_discovery(spec, wait="1s")
    await discovery.start()
    try:
        assert ids(discovery.snapshot()) == ["via-url"]  # start() returned after the first answer
    finally:
        await discovery.close()


# -- registrar --------------------------------------------------------------------------------------------

def _meta() -> dict[str, str]:
    return worker_meta("minilm", "0:3", 6, "sha256:abc", 64, extra={"wire_dtype": "float32"})


async def test_registrar_grpc_registration_as_consul_stores_it(consul_address: ConsulAddress,
                                                              consul_client: consul.aio.Consul,
                                                              consul_service_name: str) -> None:
    async with serve_health() as hs:
        registrar = ConsulRegistrar(consul_address, service_name=consul_service_name, service_id="w1",
                                    address="127.0.0.1", port=hs.port, tags=["shard", "layers-0-3"], meta=_meta(),
                                    check="grpc", interval_s=0.2, check_timeout_s=1.0, weight=3,
                                    deregister_critical_after="1m")
        assert registrar.check_definition() == {
            "CheckID": "w1:health", "Name": f"{consul_service_name} grpc health", "GRPC": hs.address,
            "GRPCUseTLS": False, "Interval": "200ms", "Timeout": "1s", "DeregisterCriticalServiceAfter": "1m",
        }
        await registrar.register()
        try:
            service = (await consul_client.agent.services())["w1"]
            assert (service["Service"], service["Address"], service["Port"]) == (consul_service_name, "127.0.0.1", hs.port)
            assert service["Tags"] == ["shard", "layers-0-3"]
            assert service["Meta"] == _meta() and service["Weights"] == {"Passing": 3, "Warning": 1}
            check = (await consul_client.agent.checks())["w1:health"]
            assert (check["Type"], check["ServiceID"], check["Interval"], check["Timeout"]) == ("grpc", "w1", "200ms", "1s")
            check = await eventually(consul_client.agent.checks, lambda c: c["w1:health"]["Status"] == "passing",
                                     what="the gRPC check passing")
            assert check["w1:health"]["Output"] == f"gRPC check {hs.address}: success"
            await registrar.register()  # idempotent: same ID, checks replaced, status kept
            assert (await consul_client.agent.checks())["w1:health"]["Status"] == "passing"
            _, entries = await consul_client.health.service(consul_service_name, passing=True)
            meta = parse_worker_meta(entries[0]["Service"]["Meta"])
            assert (meta.model_id, str(meta.layers), meta.total_layers, meta.max_inflight) == ("minilm", "0:3", 6, 64)
            assert meta.extra == {"wire_dtype": "float32"}
        finally:
            assert await registrar.deregister() is True
            await registrar.close()
        assert "w1" not in await consul_client.agent.services()
        assert "w1:health" not in await consul_client.agent.checks()
        assert await registrar.deregister() is False  # already gone: no error


async def test_registrar_ttl_heartbeat_keeps_it_passing(consul_address: ConsulAddress, consul_client: consul.aio.Consul,
                                                        consul_service_name: str) -> None:
    registrar = ConsulRegistrar(consul_address, service_name=consul_service_name, service_id="w-ttl",
                                address="127.0.0.1", port=7201, meta=_meta(), check="ttl", ttl_s=0.6)
    assert registrar.check_definition()["TTL"] == "600ms"
    await registrar.register()
    try:
        assert (await consul_client.agent.checks())["w-ttl:health"]["Status"] == "passing"  # passed at once
        deadline = time.monotonic() + 1.5  # 2.5 TTLs
        while time.monotonic() < deadline:
            assert (await consul_client.agent.checks())["w-ttl:health"]["Status"] == "passing"
            await asyncio.sleep(0.1)
        assert registrar.heartbeats_sent >= 4

        # The agent forgets the service (e.g. restarted without state): the next heartbeat re-registers.
        assert await consul_client.agent.service.deregister("w-ttl")
        await eventually(consul_client.agent.services, lambda s: "w-ttl" in s, timeout_s=3, what="re-registration")
    finally:
        await registrar.close()  # heartbeats stop: the TTL expires
    await eventually(consul_client.agent.checks, lambda c: c["w-ttl:health"]["Status"] == "critical", timeout_s=3,
                     what="TTL expiry once heartbeats stopped")
    assert await registrar.deregister() is True
    await registrar.close()


@pytest.mark.parametrize("mode", ["refuse", "hang"])
async def test_registrar_deregister_is_bounded_when_consul_is_down(mode: str, consul_emulator: EmulatorControl,
                                                                  consul_address: ConsulAddress,
                                                                  consul_client: consul.aio.Consul,
                                                                  consul_service_name: str) -> None:
    registrar = ConsulRegistrar(consul_address, service_name=consul_service_name, service_id=f"w-down-{mode}",
                                address="127.0.0.1", port=7202, check="ttl", ttl_s=30, request_timeout_s=0.5)
    await registrar.register()
    consul_emulator.pause(mode)
    started = time.monotonic()
    assert await registrar.deregister() is False
    assert time.monotonic() - started < 1.5
    await registrar.close()
    consul_emulator.resume()
    assert f"w-down-{mode}" in await consul_client.agent.services()  # left for the reaper
