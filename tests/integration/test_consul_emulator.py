"""The Consul emulator behaves as Consul documents, checked through the real py-consul aio client.

Every test also runs against a real agent (``CONSUL_HTTP_ADDR=...``) except those that need the
emulator's fault controls or its fast reaper, which skip there.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import consul
import consul.aio
import pytest
from grpc_health.v1 import health_pb2

from services.discovery.consul_client import ConsulAddress
from tests.consul_emulator.process import EmulatorControl
from tests.consul_emulator.state import go_duration, parse_go_duration
from tests.consul_fixtures import eventually, serve_health

pytestmark = [pytest.mark.integration, pytest.mark.consul]

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def agent_checks(client: consul.aio.Consul) -> dict[str, Any]:
    return dict(await client.agent.checks())


async def check_status(client: consul.aio.Consul, check_id: str) -> str | None:
    check = (await agent_checks(client)).get(check_id)
    return None if check is None else str(check["Status"])


async def register_ttl(client: consul.aio.Consul, name: str, sid: str, ttl: str = "1s", **extra: Any) -> str:
    check_id = f"{sid}:ttl"
    assert await client.agent.service.register(
        name, service_id=sid, address="127.0.0.1", port=7000, check={"CheckID": check_id, "TTL": ttl, **extra},
        replace_existing_checks=True,
    )
    return check_id


def test_go_durations_round_trip() -> None:
    assert [go_duration(s) for s in (1, 60, 0.5, 1.5, 90, 3600, 0)] == ["1s", "1m0s", "500ms", "1.5s", "1m30s", "1h0m0s", "0s"]
    assert parse_go_duration("1m30s") == 90 and parse_go_duration("250ms") == 0.25 and parse_go_duration(10**9) == 1


async def test_ttl_check_starts_critical_passes_then_expires(consul_client: consul.aio.Consul,
                                                             consul_service_name: str) -> None:
    sid = f"{consul_service_name}-1"
    check_id = await register_ttl(consul_client, consul_service_name, sid, ttl="600ms")
    check = (await agent_checks(consul_client))[check_id]
    assert (check["Status"], check["Type"], check["ServiceID"], check["ServiceName"]) == ("critical", "ttl", sid, consul_service_name)

    assert await consul_client.agent.check.ttl_pass(check_id, notes="all good")
    check = (await agent_checks(consul_client))[check_id]
    assert (check["Status"], check["Output"]) == ("passing", "all good")

    started = time.monotonic()
    check = await eventually(lambda: agent_checks(consul_client), lambda c: c[check_id]["Status"] == "critical",
                             timeout_s=5, what="TTL expiry")
    assert time.monotonic() - started > 0.3  # not before the TTL ran out
    assert check[check_id]["Output"].startswith("TTL expired")

    assert await consul_client.agent.check.ttl_warn(check_id)
    assert await check_status(consul_client, check_id) == "warning"


async def test_check_update_endpoint(consul_client: consul.aio.Consul, consul_service_name: str,
                                     consul_address: ConsulAddress) -> None:
    check_id = await register_ttl(consul_client, consul_service_name, f"{consul_service_name}-u", ttl="30s")
    url = f"http://{consul_address.hostport}/v1/agent/check/update/{check_id}"
    async with aiohttp.ClientSession() as session:
        async with session.put(url, json={"Status": "passing", "Output": "updated"}) as resp:
            assert resp.status == 200
        async with session.put(url, json={"Status": "sideways"}) as resp:
            assert resp.status == 400
    check = (await agent_checks(consul_client))[check_id]
    assert (check["Status"], check["Output"]) == ("passing", "updated")


async def test_tcp_check(consul_client: consul.aio.Consul, consul_service_name: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    async with serve_health() as hs:
        assert await consul_client.agent.service.register(
            consul_service_name, service_id=f"{consul_service_name}-tcp", port=hs.port,
            check={"CheckID": "tcp-open", "TCP": hs.address, "Interval": "100ms", "Timeout": "1s"},
            extra_checks=[{"CheckID": "tcp-closed", "TCP": f"127.0.0.1:{closed_port}", "Interval": "100ms",
                           "Status": "passing"}])
        checks = await eventually(lambda: agent_checks(consul_client),
                                  lambda c: c["tcp-open"]["Status"] == "passing" and c["tcp-closed"]["Status"] == "critical",
                                  what="TCP probes")
        assert checks["tcp-open"]["Type"] == "tcp"


async def test_check_ids_names_and_initial_status_default_as_consul(consul_client: consul.aio.Consul,
                                                                    consul_service_name: str) -> None:
    one, two = f"{consul_service_name}-one", f"{consul_service_name}-two"
    assert await consul_client.agent.service.register(consul_service_name, service_id=one, port=7001,
                                                      check={"TTL": "30s"})
    assert await consul_client.agent.service.register(
        consul_service_name, service_id=two, port=7002,
        check={"TTL": "30s", "Status": "passing"}, extra_checks=[{"TTL": "30s", "Status": "warning"}])
    checks = await agent_checks(consul_client)
    assert checks[f"service:{one}"]["Status"] == "critical"
    assert checks[f"service:{one}"]["Name"] == f"Service '{consul_service_name}' check"
    assert (checks[f"service:{two}:1"]["Status"], checks[f"service:{two}:2"]["Status"]) == ("passing", "warning")


async def test_grpc_check_follows_the_health_servicer(consul_client: consul.aio.Consul, consul_service_name: str) -> None:
    sid = f"{consul_service_name}-grpc"
    check_id = f"{sid}:health"
    async with serve_health(status=NOT_SERVING) as hs:
        assert await consul_client.agent.service.register(
            consul_service_name, service_id=sid, address="127.0.0.1", port=hs.port, replace_existing_checks=True,
            check={"CheckID": check_id, "Name": "grpc", "GRPC": hs.address, "GRPCUseTLS": False,
                   "Interval": "200ms", "Timeout": "1s"},
        )
        stored = (await agent_checks(consul_client))[check_id]
        assert (stored["Type"], stored["Interval"], stored["Timeout"]) == ("grpc", "200ms", "1s")

        async def status() -> dict[str, Any]:
            return dict((await agent_checks(consul_client))[check_id])

        check = await eventually(status, lambda c: "NOT_SERVING" in c["Output"], what="a NOT_SERVING probe")
        assert check["Status"] == "critical"
        await hs.servicer.set("", SERVING)
        check = await eventually(status, lambda c: c["Status"] == "passing", what="passing after SERVING")
        assert check["Output"] == f"gRPC check {hs.address}: success"
        await hs.servicer.set("", NOT_SERVING)
        await eventually(status, lambda c: c["Status"] == "critical", what="critical after NOT_SERVING")
        await hs.servicer.set("", SERVING)
        await eventually(status, lambda c: c["Status"] == "passing", what="passing again")
    # The server is gone now.
    check = await eventually(status, lambda c: c["Status"] == "critical", what="critical once the server stopped")
    assert "rpc error: code = Unavailable desc = " in check["Output"]  # grpc-go's code name, as Consul writes it


async def test_grpc_check_probes_the_named_service(consul_client: consul.aio.Consul, consul_service_name: str) -> None:
    sid = f"{consul_service_name}-named"
    async with serve_health() as hs:
        await hs.servicer.set("shardmesh.v1.Worker", NOT_SERVING)
        assert await consul_client.agent.service.register(
            consul_service_name, service_id=sid, port=hs.port,
            check={"CheckID": "named", "GRPC": f"{hs.address}/shardmesh.v1.Worker", "Interval": "200ms"})
        check = await eventually(lambda: agent_checks(consul_client), lambda c: c["named"]["Output"] != "",
                                 what="a probe of the named service")
        assert check["named"]["Status"] == "critical"
        await hs.servicer.set("shardmesh.v1.Worker", SERVING)
        await eventually(lambda: check_status(consul_client, "named"), lambda s: s == "passing", what="passing")


async def test_deregister_removes_service_and_checks(consul_client: consul.aio.Consul, consul_service_name: str) -> None:
    sid = f"{consul_service_name}-d"
    check_id = await register_ttl(consul_client, consul_service_name, sid, ttl="30s")
    assert sid in await consul_client.agent.services()
    assert await consul_client.agent.service.deregister(sid)
    assert sid not in await consul_client.agent.services()
    assert check_id not in await agent_checks(consul_client)
    _, entries = await consul_client.health.service(consul_service_name)
    assert entries == []
    assert await consul_client.agent.service.deregister(sid) is False  # 404 Unknown service ID


async def test_deregister_critical_service_after_reaps(consul_emulator: EmulatorControl, consul_client: consul.aio.Consul,
                                                       consul_service_name: str) -> None:
    kept, reaped = f"{consul_service_name}-kept", f"{consul_service_name}-reaped"
    await register_ttl(consul_client, consul_service_name, reaped, ttl="30s", DeregisterCriticalServiceAfter="300ms")
    kept_check = await register_ttl(consul_client, consul_service_name, kept, ttl="30s",
                                    DeregisterCriticalServiceAfter="300ms")
    assert await consul_client.agent.check.ttl_pass(kept_check)
    await eventually(consul_client.agent.services, lambda s: reaped not in s, timeout_s=5, what="the reap")
    assert kept in await consul_client.agent.services()


async def test_replace_existing_checks_and_status_survives_reregistration(consul_client: consul.aio.Consul,
                                                                          consul_service_name: str) -> None:
    sid = f"{consul_service_name}-r"
    a, b = {"CheckID": f"{sid}:a", "TTL": "30s"}, {"CheckID": f"{sid}:b", "TTL": "30s"}
    assert await consul_client.agent.service.register(consul_service_name, service_id=sid, port=7003, check=a,
                                                      extra_checks=[b])
    assert await consul_client.agent.check.ttl_pass(f"{sid}:a")
    assert await consul_client.agent.service.register(consul_service_name, service_id=sid, port=7003, check=a)
    checks = await agent_checks(consul_client)
    assert {f"{sid}:a", f"{sid}:b"} <= set(checks)  # without replace-existing-checks, b stays
    assert checks[f"{sid}:a"]["Status"] == "passing"  # re-registration keeps the status
    assert await consul_client.agent.service.register(consul_service_name, service_id=sid, port=7003, check=a,
                                                      replace_existing_checks=True)
    checks = await agent_checks(consul_client)
    assert f"{sid}:b" not in checks and checks[f"{sid}:a"]["Status"] == "passing"


async def test_health_entries_passing_filter_and_serf_check(consul_client: consul.aio.Consul,
                                                            consul_service_name: str) -> None:
    up, down = f"{consul_service_name}-up", f"{consul_service_name}-down"
    await register_ttl(consul_client, consul_service_name, down, ttl="30s")
    up_check = await register_ttl(consul_client, consul_service_name, up, ttl="30s")
    assert await consul_client.agent.check.ttl_pass(up_check)
    _, everything = await consul_client.health.service(consul_service_name)
    assert sorted(e["Service"]["ID"] for e in everything) == [down, up]
    _, passing = await consul_client.health.service(consul_service_name, passing=True)
    assert [e["Service"]["ID"] for e in passing] == [up]
    entry = passing[0]
    assert {c["CheckID"] for c in entry["Checks"]} == {"serfHealth", up_check}
    assert entry["Node"]["Address"] and entry["Service"]["Port"] == 7000
    assert entry["Service"]["Weights"] == {"Passing": 1, "Warning": 1}
    _, catalog = await consul_client.catalog.service(consul_service_name)
    assert sorted(c["ServiceID"] for c in catalog) == [down, up]


async def test_blocking_query_returns_on_change_and_times_out_without_one(consul_client: consul.aio.Consul,
                                                                          consul_service_name: str) -> None:
    sid = f"{consul_service_name}-b"
    check_id = await register_ttl(consul_client, consul_service_name, sid, ttl="30s")
    index, entries = await consul_client.health.service(consul_service_name, passing=True)
    assert int(index) > 0 and entries == []

    waiter = asyncio.create_task(consul_client.health.service(consul_service_name, index=index, wait="5s", passing=True))
    await asyncio.sleep(0.2)
    assert not waiter.done()  # blocked: nothing changed yet
    started = time.monotonic()
    assert await consul_client.agent.check.ttl_pass(check_id)
    new_index, entries = await asyncio.wait_for(waiter, 3)
    assert time.monotonic() - started < 1.0
    assert int(new_index) > int(index) and [e["Service"]["ID"] for e in entries] == [sid]

    # A heartbeat that changes nothing takes no index, so a blocking query waits out its time.
    assert await consul_client.agent.check.ttl_pass(check_id)
    started = time.monotonic()
    same_index, _ = await consul_client.health.service(consul_service_name, index=new_index, wait="400ms", passing=True)
    elapsed = time.monotonic() - started
    assert same_index == new_index
    assert 0.35 < elapsed < 0.4 * 17 / 16 + 0.5


async def test_invalid_requests_are_rejected(consul_client: consul.aio.Consul, consul_service_name: str,
                                             consul_address: ConsulAddress) -> None:
    with pytest.raises(consul.ConsulException, match="TTL must be > 0"):
        await consul_client.agent.service.register(consul_service_name, check={"CheckID": "x", "Notes": "no kind"})
    with pytest.raises(consul.ConsulException, match="Interval"):
        await consul_client.agent.service.register(consul_service_name, check={"GRPC": "127.0.0.1:1"})
    assert await consul_client.agent.check.ttl_pass("no-such-check") is False  # 404
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{consul_address.hostport}/v1/health/service/x?index=1&wait=10") as resp:
            assert resp.status == 400  # "10" has no unit: Invalid wait time


async def test_status_leader(consul_client: consul.aio.Consul) -> None:
    assert ":" in await consul_client.status.leader()


@pytest.mark.parametrize("mode", ["error", "refuse"])
async def test_pause_makes_consul_unavailable_until_resumed(consul_emulator: EmulatorControl,
                                                            consul_client: consul.aio.Consul, mode: str) -> None:
    consul_emulator.pause(mode)
    with pytest.raises((consul.ConsulException, aiohttp.ClientError)):
        await consul_client.health.service("anything")
    consul_emulator.resume()
    _, entries = await consul_client.health.service("anything")
    assert entries == []


async def test_restore_moves_the_index_backwards_and_wakes_watchers_on_a_server(consul_emulator: EmulatorControl,
                                                                                consul_client: consul.aio.Consul,
                                                                                consul_service_name: str) -> None:
    consul_emulator.mode(blocking="rpc")  # a server agent: the state store's abandon channel wakes everyone
    await register_ttl(consul_client, consul_service_name, f"{consul_service_name}-x", ttl="30s")
    index, _ = await consul_client.health.service(consul_service_name)
    waiter = asyncio.create_task(consul_client.health.service(consul_service_name, index=index, wait="10s"))
    await asyncio.sleep(0.1)
    consul_emulator.restore(2)
    new_index, entries = await asyncio.wait_for(waiter, 2)
    assert 0 < int(new_index) <= 2 < int(index)
    assert len(entries) == 1


async def test_streaming_backend_shows_a_lower_index_only_when_wait_runs_out(consul_emulator: EmulatorControl,
                                                                            consul_client: consul.aio.Consul,
                                                                            consul_service_name: str) -> None:
    """A client agent's materialized view answers a blocking query only once its index exceeds ``index``:
    after a restore, neither the restore nor a new registration (at a still lower index) wakes it."""
    assert consul_emulator.state()["blocking"] == "streaming"  # the default, as on a client agent
    await register_ttl(consul_client, consul_service_name, f"{consul_service_name}-x", ttl="30s")
    index, _ = await consul_client.health.service(consul_service_name)
    started = time.monotonic()
    waiter = asyncio.create_task(consul_client.health.service(consul_service_name, index=index, wait="1500ms"))
    await asyncio.sleep(0.1)
    consul_emulator.restore(2)
    await register_ttl(consul_client, consul_service_name, f"{consul_service_name}-y", ttl="30s")
    await asyncio.sleep(0.3)
    assert not waiter.done(), "the streaming backend woke on a restore"
    new_index, entries = await asyncio.wait_for(waiter, 4)
    elapsed = time.monotonic() - started
    assert 1.4 < elapsed < 1.5 * 17 / 16 + 1.0
    assert 0 < int(new_index) < int(index)
    assert len(entries) == 2  # the latest view, at the lower index


async def test_meta_values_are_limited_to_512_bytes_not_characters(consul_client: consul.aio.Consul,
                                                                   consul_service_name: str) -> None:
    sid = f"{consul_service_name}-meta"
    fits = {"ascii": "a" * 512, "accents": "é" * 256}  # 512 bytes each
    assert await consul_client.agent.service.register(consul_service_name, service_id=sid, port=7005, meta=fits)
    assert (await consul_client.agent.services())[sid]["Meta"] == fits
    with pytest.raises(consul.ConsulException, match="Value is too long"):  # 257 characters, 514 bytes
        await consul_client.agent.service.register(consul_service_name, service_id=sid, port=7005,
                                                   meta={"accents": "é" * 257})


async def test_forget_drops_every_service_as_an_agent_restarted_without_data(consul_emulator: EmulatorControl,
                                                                             consul_client: consul.aio.Consul,
                                                                             consul_service_name: str) -> None:
    await register_ttl(consul_client, consul_service_name, f"{consul_service_name}-a", ttl="30s")
    await register_ttl(consul_client, consul_service_name, f"{consul_service_name}-b", ttl="30s")
    index, entries = await consul_client.health.service(consul_service_name)
    assert len(entries) == 2
    waiter = asyncio.create_task(consul_client.health.service(consul_service_name, index=index, wait="5s"))
    await asyncio.sleep(0.1)
    assert {f"{consul_service_name}-a", f"{consul_service_name}-b"} <= set(consul_emulator.forget())
    new_index, entries = await asyncio.wait_for(waiter, 2)  # a change at a higher index wakes even streaming
    assert entries == [] and int(new_index) > int(index)
    assert not any(s["Service"] == consul_service_name for s in (await consul_client.agent.services()).values())
    assert await consul_client.agent.check.ttl_pass(f"{consul_service_name}-a:ttl") is False  # 404: forgotten


async def test_strip_index_drops_the_index_header(consul_emulator: EmulatorControl, consul_address: ConsulAddress,
                                                  consul_service_name: str) -> None:
    url = f"http://{consul_address.hostport}/v1/health/service/{consul_service_name}"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200 and "X-Consul-Index" in resp.headers
        consul_emulator.mode(strip_index=True)
        async with session.get(url) as resp:
            assert resp.status == 200 and "X-Consul-Index" not in resp.headers and await resp.json() == []
