"""Consul with ACLs on and ``default_policy = deny``: the emulator answers as Consul does, a refused token
is a configuration error for the worker, and the router never takes an ACL-filtered read for "no workers".

Against the emulator by default (started here with ACLs on). With ``CONSUL_HTTP_ADDR`` set the same tests
run against that agent, which must have ACLs on with ``default_policy = deny``, and ``CONSUL_HTTP_TOKEN``
must be a management token (tokens and policies are created for the tests and deleted after).
"""

from __future__ import annotations

import asyncio
import logging
import os
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace

import aiohttp
import pytest

from services.config import ConsulRegistration
from services.discovery.consul import ConsulDiscovery
from services.discovery.consul_client import ConsulAddress, make_client, parse_consul_address
from services.discovery.registration import ConsulAclRefused, ConsulRegistrar
from services.layers import LayerSpan
from shard_worker.presence import ConsulPresence
from tests.consul_emulator.process import FAST_TEST_ARGS, run_emulator
from tests.consul_fixtures import eventually

pytestmark = [pytest.mark.integration, pytest.mark.consul]

FILTERED = "X-Consul-Results-Filtered-By-ACLs"


@dataclass
class AclAgent:
    """An agent with ACLs on (deny by default) and a management token to make test tokens with."""

    address: ConsulAddress  # carries the management token
    created_tokens: list[str] = field(default_factory=list)
    created_policies: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.address.scheme}://{self.address.hostport}"

    def as_token(self, token: str | None) -> ConsulAddress:
        return replace(self.address, token=token)

    async def request(self, method: str, path: str, token: str | None, json: object = None) -> tuple[int, dict[str, str], object]:
        headers = {"X-Consul-Token": token} if token else {}
        async with aiohttp.ClientSession() as session:
            async with session.request(method, self.url + path, headers=headers, json=json) as resp:
                text = await resp.text()
                body: object = text
                if resp.content_type == "application/json":
                    body = await resp.json()
                return resp.status, dict(resp.headers), body

    async def token(self, rules: str) -> str:
        """A new token whose one policy has ``rules``; returns its secret."""
        status, _, policy = await self.request("PUT", "/v1/acl/policy", self.address.token,
                                               {"Name": f"shardmesh-test-{uuid.uuid4().hex[:10]}", "Rules": rules})
        assert status == 200, policy
        self.created_policies.append(policy["ID"])  # type: ignore[index]
        status, _, token = await self.request("PUT", "/v1/acl/token", self.address.token,
                                              {"Policies": [{"ID": policy["ID"]}]})  # type: ignore[index]
        assert status == 200, token
        self.created_tokens.append(token["AccessorID"])  # type: ignore[index]
        return str(token["SecretID"])  # type: ignore[index]

    async def delete_policies(self) -> None:
        for accessor in self.created_tokens:
            await self.request("DELETE", f"/v1/acl/token/{accessor}", self.address.token)
        for policy in self.created_policies:
            await self.request("DELETE", f"/v1/acl/policy/{policy}", self.address.token)
        self.created_tokens.clear()
        self.created_policies.clear()


def _probe_real_agent(address: ConsulAddress) -> str | None:
    """Why a real agent cannot run these tests, or None if it can."""
    import urllib.error
    import urllib.request

    if not address.token:
        return "CONSUL_HTTP_TOKEN (a management token) is not set"
    request = urllib.request.Request(f"{address.scheme}://{address.hostport}/v1/acl/token/self",
                                     headers={"X-Consul-Token": address.token})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            policy = reply.headers.get("X-Consul-Default-ACL-Policy", "")
    except urllib.error.HTTPError as exc:
        return f"the agent answered {exc.code} to /v1/acl/token/self (ACLs off, or not a management token)"
    return None if policy == "deny" else f"the agent's default ACL policy is {policy or 'unknown'}, not deny"


@pytest.fixture(scope="module")
def acl_agent() -> Iterator[AclAgent]:
    if os.environ.get("CONSUL_HTTP_ADDR"):
        address = parse_consul_address(None, os.environ)
        why = _probe_real_agent(address)
        if why:
            pytest.skip(f"needs an agent with ACLs on and default_policy deny: {why}")
        yield AclAgent(address)
        return
    management = str(uuid.uuid4())
    with run_emulator(*FAST_TEST_ARGS, "--acl-default-policy", "deny", "--acl-initial-management", management) as control:
        yield AclAgent(parse_consul_address(control.http, {"CONSUL_HTTP_TOKEN": management}))


@pytest.fixture
async def agent(acl_agent: AclAgent) -> AsyncIterator[AclAgent]:
    yield acl_agent
    await acl_agent.delete_policies()


@pytest.fixture
async def service(acl_agent: AclAgent) -> AsyncIterator[str]:
    name = f"shardmesh-acl-{uuid.uuid4().hex[:10]}"
    yield name
    client = make_client(acl_agent.address, http_timeout_s=10)
    try:
        for sid, svc in (await client.agent.services()).items():
            if svc["Service"] == name:
                await client.agent.service.deregister(sid)
    finally:
        await client.close()


def _writer_rules(service: str) -> str:
    return f'service "{service}" {{ policy = "write" }}\nnode_prefix "" {{ policy = "read" }}'


def _reader_rules(service: str) -> str:
    return f'service "{service}" {{ policy = "read" }}\nnode_prefix "" {{ policy = "read" }}'


async def _register_passing(agent: AclAgent, token: str, service: str, sid: str, port: int) -> None:
    client = make_client(agent.as_token(token), http_timeout_s=10)
    try:
        assert await client.agent.service.register(service, service_id=sid, address="127.0.0.1", port=port,
                                                   check={"CheckID": f"{sid}:ttl", "TTL": "60s"})
        assert await client.agent.check.ttl_pass(f"{sid}:ttl")
    finally:
        await client.close()


async def test_the_agent_answers_as_consul_does_under_deny(agent: AclAgent, service: str) -> None:
    writer = await agent.token(_writer_rules(service))
    other_reader = await agent.token('service "someone-else" { policy = "read" }\nnode_prefix "" { policy = "read" }')
    body = {"Name": service, "ID": f"{service}-1", "Port": 7301, "Check": {"CheckID": f"{service}-1:ttl", "TTL": "60s"}}

    status, _, text = await agent.request("PUT", "/v1/agent/service/register", str(uuid.uuid4()), body)
    assert (status, text) == (403, "ACL not found")
    status, _, text = await agent.request("PUT", "/v1/agent/service/register", other_reader, body)
    assert status == 403 and str(text).startswith("Permission denied: token with AccessorID '")
    assert f"lacks permission 'service:write' on \"{service}\"" in str(text)
    status, _, _ = await agent.request("PUT", "/v1/agent/service/register", writer, body)
    assert status == 200
    await agent.request("PUT", f"/v1/agent/check/pass/{service}-1:ttl", writer)

    path = f"/v1/health/service/{service}?passing=1"
    status, headers, entries = await agent.request("GET", path, writer)
    assert status == 200 and len(entries) == 1 and FILTERED not in headers  # type: ignore[arg-type]
    status, headers, entries = await agent.request("GET", path, other_reader)
    assert (status, entries, headers.get(FILTERED)) == (200, [], "true")
    assert int(headers["X-Consul-Index"]) > 0  # a filtered read is still a blocking-query answer
    status, headers, entries = await agent.request("GET", path, None)  # anonymous: Consul masks the header
    assert (status, entries, FILTERED in headers) == (200, [], False)
    status, _, text = await agent.request("GET", f"/v1/agent/service/{service}-1", other_reader)
    assert status == 403 and "lacks permission 'service:read'" in str(text)
    status, _, _ = await agent.request("GET", f"/v1/agent/service/{service}-1", writer)
    assert status == 200


async def test_a_refused_token_is_a_configuration_error_for_the_registrar(agent: AclAgent, service: str) -> None:
    reader = await agent.token(_reader_rules(service))
    for token, why in ((reader, f"lacks service:write on {service}"), (str(uuid.uuid4()), "ACL not found")):
        registrar = ConsulRegistrar(agent.as_token(token), service_name=service, service_id=f"{service}-w",
                                    address="127.0.0.1", port=7302, check="ttl", ttl_s=30)
        try:
            with pytest.raises(ConsulAclRefused) as info:
                await registrar.register()
        finally:
            await registrar.close()
        message = str(info.value)
        assert why in message and "CONSUL_HTTP_TOKEN" in message and f"service:write on {service}" in message, message


async def test_the_worker_says_why_it_is_not_registered(agent: AclAgent, service: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shard_worker.presence")
    reader = await agent.token(_reader_rules(service))
    source = types.SimpleNamespace(model_id="minilm", total_layers=6, checksum="sha256:abc")
    presence = ConsulPresence(
        ConsulRegistration(agent=agent.as_token(reader), service=service, check="grpc", tags=()),
        worker_id=f"{service}-w", advertise="127.0.0.1:7303", source=source,  # type: ignore[arg-type]
        span=LayerSpan(0, 3), max_inflight=4,
    )
    presence.start()
    try:
        record = await eventually(lambda: [r for r in caplog.records if r.levelno == logging.ERROR], bool, timeout_s=5,
                                  what="an error log")
        message = record[0].getMessage()
        assert "configuration error" in message and f"service:write on {service}" in message
        assert "CONSUL_HTTP_TOKEN" in message and "retrying every 30s" in message
        await asyncio.sleep(0.5)
        assert not presence.registered.is_set()
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1  # said once, not spammed
    finally:
        await presence.stop()


async def _watch(agent: AclAgent, token: str | None, service: str) -> ConsulDiscovery:
    discovery = ConsulDiscovery(agent.as_token(token), service, wait="1s", start_timeout_s=3.0, backoff_initial_s=0.05,
                                backoff_max_s=0.2, http_timeout_margin_s=0.5, rate_per_s=50.0)
    await discovery.start()
    return discovery


async def test_a_filtered_read_keeps_the_last_table_as_stale(agent: AclAgent, service: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.discovery.consul")
    writer = await agent.token(_writer_rules(service))
    await _register_passing(agent, writer, service, f"{service}-a", 7304)

    # A token that may not read the service: the router must not believe "no workers".
    blind = await _watch(agent, await agent.token('node_prefix "" { policy = "read" }'), service)
    try:
        snap = blind.snapshot()
        assert snap.stale and snap.endpoints == () and "filtered" in snap.detail and "ACLs" in snap.detail
        assert f"service:read on {service}" in snap.detail and blind.filtered_answers >= 1
    finally:
        await blind.close()
    caplog.clear()

    reader_policy_token = await agent.token(_reader_rules(service))
    discovery = await _watch(agent, reader_policy_token, service)
    try:
        assert [e.service_id for e in discovery.snapshot().endpoints] == [f"{service}-a"]
        assert not discovery.snapshot().stale
        # The reader's policy goes away (an operator's mistake): the next answer is filtered.
        status, _, _ = await agent.request("DELETE", f"/v1/acl/policy/{agent.created_policies[-1]}", agent.address.token)
        assert status == 200
        await _register_passing(agent, writer, service, f"{service}-b", 7305)  # wakes the blocking query
        snap = await eventually(discovery.snapshot, lambda s: s.stale, timeout_s=5, what="a stale snapshot")
        assert [e.service_id for e in snap.endpoints] == [f"{service}-a"]  # kept, not emptied
        assert "filtered" in snap.detail and discovery.watch_errors == 0
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "ACLs" in errors[0].getMessage() and "keeping 1 last known" in errors[0].getMessage()
    finally:
        await discovery.close()


async def test_an_unknown_token_makes_discovery_stale_with_the_reason(agent: AclAgent, service: str) -> None:
    discovery = await _watch(agent, str(uuid.uuid4()), service)
    try:
        snap = await eventually(discovery.snapshot, lambda s: s.stale, timeout_s=3, what="a stale snapshot")
        assert "refused the ACL token" in snap.detail and "ACL not found" in snap.detail
        assert "CONSUL_HTTP_TOKEN" in snap.detail
    finally:
        await discovery.close()


async def test_no_token_under_deny_is_called_out(agent: AclAgent, service: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Consul hides the filtered header from the anonymous token, so an empty list cannot be told from a
    filtered one: the router says so once instead of silently trusting it."""
    caplog.set_level(logging.WARNING, logger="services.discovery.consul")
    writer = await agent.token(_writer_rules(service))
    await _register_passing(agent, writer, service, f"{service}-a", 7306)
    discovery = await _watch(agent, None, service)
    try:
        assert discovery.snapshot().endpoints == ()  # hidden, without the header
        warnings = [r.getMessage() for r in caplog.records if "no token is set" in r.getMessage()]
        assert len(warnings) == 1 and "default ACL policy is deny" in warnings[0] and "CONSUL_HTTP_TOKEN" in warnings[0]
    finally:
        await discovery.close()
