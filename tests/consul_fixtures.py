"""Consul fixtures: a real agent when ``CONSUL_HTTP_ADDR`` is set, else the emulator in a subprocess.

Load with ``pytest_plugins = ["tests.consul_fixtures"]`` in the root conftest. ``consul_addr`` is
session-scoped (one emulator for the run; tests use unique service names); ``consul_emulator`` hands out
the fault controls and skips the test against a real agent, which has none.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import consul.aio
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.discovery.consul_client import ConsulAddress, make_client, parse_consul_address
from tests.consul_emulator.process import FAST_TEST_ARGS, EmulatorControl, run_emulator

T = TypeVar("T")


@pytest.fixture(scope="session")
def _consul_backend() -> Iterator[tuple[ConsulAddress, EmulatorControl | None]]:
    if os.environ.get("CONSUL_HTTP_ADDR"):
        yield parse_consul_address(None, os.environ), None
        return
    with run_emulator(*FAST_TEST_ARGS) as control:
        yield parse_consul_address(control.http, {}), control


@pytest.fixture(scope="session")
def consul_address(_consul_backend: tuple[ConsulAddress, EmulatorControl | None]) -> ConsulAddress:
    """The agent as a :class:`ConsulAddress` (scheme and token included for a real agent)."""
    return _consul_backend[0]


@pytest.fixture(scope="session")
def consul_addr(consul_address: ConsulAddress) -> str:
    """``host:port`` of the agent under test."""
    return consul_address.hostport


@pytest.fixture(scope="session")
def consul_is_emulator(_consul_backend: tuple[ConsulAddress, EmulatorControl | None]) -> bool:
    return _consul_backend[1] is not None


@pytest.fixture
def consul_control(_consul_backend: tuple[ConsulAddress, EmulatorControl | None]) -> Iterator[EmulatorControl | None]:
    """The emulator's controls, or None against a real agent (for tests that run on both)."""
    control = _consul_backend[1]
    yield control
    if control is not None:
        control.resume()


@pytest.fixture
def consul_emulator(_consul_backend: tuple[ConsulAddress, EmulatorControl | None]) -> Iterator[EmulatorControl]:
    """Fault controls (pause, index restore); skips against a real agent. Resumes after the test."""
    control = _consul_backend[1]
    if control is None:
        pytest.skip("needs the Consul emulator's fault controls; CONSUL_HTTP_ADDR points at a real agent")
    yield control
    control.resume()
    control.mode(blocking="streaming", strip_index=False)  # the defaults: a client agent, no proxy


def _agent_request(address: ConsulAddress, method: str, path: str) -> object:
    request = urllib.request.Request(f"{address.scheme}://{address.hostport}{path}", method=method,
                                     data=b"" if method == "PUT" else None)
    if address.token:
        request.add_header("X-Consul-Token", address.token)
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


@pytest.fixture
def consul_service_name(_consul_backend: tuple[ConsulAddress, EmulatorControl | None]) -> Iterator[str]:
    """A service name unique to the test; every instance of it is deregistered afterwards."""
    consul_address, control = _consul_backend
    name = f"shardmesh-test-{uuid.uuid4().hex[:10]}"
    yield name
    if control is not None:
        control.resume()  # a failed test may have left it paused
        control.mode(blocking="streaming", strip_index=False)
    services = _agent_request(consul_address, "GET", "/v1/agent/services")
    for service_id, service in dict(services or {}).items():  # type: ignore[call-overload]
        if service.get("Service") == name:
            _agent_request(consul_address, "PUT", f"/v1/agent/service/deregister/{urllib.request.quote(service_id)}")


@pytest.fixture
async def consul_client(consul_address: ConsulAddress) -> AsyncIterator[consul.aio.Consul]:
    """A py-consul aio client for the agent under test (timeout above the tests' longest waits)."""
    client = make_client(consul_address, http_timeout_s=30.0)
    yield client
    await client.close()


@asynccontextmanager
async def serve_health(*, status: int = health_pb2.HealthCheckResponse.SERVING) -> AsyncIterator[HealthServer]:
    """A real grpc.aio server on 127.0.0.1:0 with only grpc.health.v1, for the agent to probe."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", status)
    try:
        yield HealthServer(server, servicer, port)
    finally:
        await server.stop(0)


@dataclass
class HealthServer:
    server: grpc.aio.Server
    servicer: health.aio.HealthServicer
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def wait_until(probe: Callable[[], T], accept: Callable[[T], bool], timeout_s: float, what: str) -> T:
    """Blocking form of :func:`eventually` for synchronous tests (polls every 100 ms)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {value!r}")
        time.sleep(0.1)


async def eventually(probe: Callable[[], Awaitable[T] | T], accept: Callable[[T], bool], timeout_s: float = 10.0,
                     what: str = "condition") -> T:
    """Polls ``probe`` (sync or async) every 50 ms until ``accept`` holds; fails with the last value after
    ``timeout_s``. For state that offers no change notification (agent check status, counters)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s; last value: {value!r}")
        await asyncio.sleep(0.05)
