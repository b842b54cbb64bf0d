"""Check runners of the emulated agent: active probes (gRPC, TCP, HTTP), TTL expiry, and the reaper.

As in Consul (agent/checks/check.go): an active check waits a random stagger up to one interval, then
probes every interval with its Timeout (10 s default); a gRPC probe calls grpc.health.v1 Check on
``host:port[/service]`` over a fresh connection and passes only on SERVING; SuccessBeforePassing and
FailuresBeforeCritical/Warning gate status flips; a TTL check goes critical ("TTL expired") when not
refreshed in time; the reaper deregisters a service whose check has been critical for longer than its
DeregisterCriticalServiceAfter. Real Consul reaps every 30 s with a 1 m minimum; the emulator takes both
from its command line so tests can reap in well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.consul_emulator.state import CRITICAL, PASSING, WARNING, AgentState, Check

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
_GRPC_TARGET_RE = re.compile(r"(.*)((?::)(?:[0-9]+))(.*)$")  # Consul's grpcAddrRE


class StatusHandler:
    """Consul's StatusHandler: flips only after N consecutive successes/failures."""

    def __init__(self, state: AgentState, check_id: str, success_before_passing: int,
                 failures_before_warning: int, failures_before_critical: int) -> None:
        self._state = state
        self._check_id = check_id
        self._success_before_passing = success_before_passing
        self._failures_before_warning = failures_before_warning or failures_before_critical
        self._failures_before_critical = failures_before_critical
        self._successes = 0
        self._failures = 0

    def update(self, status: str, output: str) -> None:
        if status in (PASSING, WARNING):
            self._successes += 1
            self._failures = 0
            if self._successes >= self._success_before_passing:
                self._state.update_check(self._check_id, status, output)
            return
        self._failures += 1
        self._successes = 0
        if self._failures >= self._failures_before_critical:
            self._state.update_check(self._check_id, CRITICAL, output)
        elif self._failures >= self._failures_before_warning:
            self._state.update_check(self._check_id, WARNING, output)


def go_code_name(code: grpc.StatusCode) -> str:
    """grpc-go's ``codes.Code.String()``, which Consul's check output carries: ``Unavailable``,
    ``DeadlineExceeded``, ``OK`` (Python's enum names are ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``)."""
    return "OK" if code == grpc.StatusCode.OK else "".join(part.capitalize() for part in code.name.split("_"))


async def probe_grpc(target: str, timeout_s: float, use_tls: bool) -> tuple[str, str]:
    match = _GRPC_TARGET_RE.match(target)
    server, service = (match.group(1) + match.group(2), match.group(3).lstrip("/")) if match else (target, "")
    channel = (grpc.aio.secure_channel(server, grpc.ssl_channel_credentials()) if use_tls
               else grpc.aio.insecure_channel(server))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return CRITICAL, f"rpc error: code = {go_code_name(exc.code())} desc = {exc.details()}"
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            return CRITICAL, f"gRPC {target} serving status: {name}"
        return PASSING, f"gRPC check {target}: success"
    finally:
        await channel.close()


async def probe_tcp(target: str, timeout_s: float) -> tuple[str, str]:
    host, _, port = target.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout_s)
    except (OSError, TimeoutError, ValueError) as exc:
        return CRITICAL, f"dial tcp {target}: {exc or type(exc).__name__}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return PASSING, f"TCP connect {target}: Success"


async def probe_http(session: aiohttp.ClientSession, url: str, method: str, timeout_s: float,
                     skip_verify: bool) -> tuple[str, str]:
    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                   ssl=False if skip_verify else True) as resp:
            body = (await resp.text(errors="replace"))[:4096]
    except (aiohttp.ClientError, TimeoutError) as exc:
        return CRITICAL, f'{method} {url}: {type(exc).__name__}: {exc}'
    output = f"HTTP {method} {url}: {resp.status} {resp.reason} Output: {body}"
    if 200 <= resp.status < 300:
        return PASSING, output
    return (WARNING if resp.status == 429 else CRITICAL), output


class CheckRunners:
    """Owns one task per active check plus a ticker for TTL expiry and reaping."""

    def __init__(self, state: AgentState, *, reap_interval_s: float, min_deregister_after_s: float,
                 min_check_interval_s: float, on_reap: Callable[[str], None]) -> None:
        self._state = state
        self._reap_interval_s = reap_interval_s
        self._min_deregister_after_s = min_deregister_after_s
        self._min_check_interval_s = min_check_interval_s
        self._on_reap = on_reap
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._http = aiohttp.ClientSession()
        self._ticker = asyncio.create_task(self._tick(), name="emulator-ticker")

    async def close(self) -> None:
        tasks = list(self._tasks.values()) + ([self._ticker] if self._ticker else [])
        self._tasks.clear()
        self._ticker = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def reap_after_s(self, check: Check) -> float:
        after = check.definition.deregister_after_s
        return max(after, self._min_deregister_after_s) if after > 0 else 0.0

    def start_check(self, check: Check) -> None:
        self.stop_check(check.check_id)
        if check.definition.kind in ("grpc", "tcp", "http"):
            self._tasks[check.check_id] = asyncio.create_task(self._run_active(check), name=f"check:{check.check_id}")

    def stop_check(self, check_id: str) -> None:
        task = self._tasks.pop(check_id, None)
        if task is not None:
            task.cancel()

    async def _run_active(self, check: Check) -> None:
        d = check.definition
        interval = max(d.interval_s, self._min_check_interval_s)
        timeout = d.timeout_s if d.timeout_s > 0 else DEFAULT_TIMEOUT_S
        handler = StatusHandler(self._state, d.check_id, d.success_before_passing, d.failures_before_warning,
                                d.failures_before_critical)
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            started = time.monotonic()
            try:
                if d.kind == "grpc":
                    status, output = await probe_grpc(d.target, timeout, d.grpc_use_tls)
                elif d.kind == "tcp":
                    status, output = await probe_tcp(d.target, timeout)
                else:
                    assert self._http is not None
                    status, output = await probe_http(self._http, d.target, d.method, timeout, d.tls_skip_verify)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a probe bug must not kill the check loop
                status, output = CRITICAL, f"probe error: {type(exc).__name__}: {exc}"
            if self._state.checks.get(d.check_id) is check:
                handler.update(status, output)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _tick(self) -> None:
        last_reap = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            for check in list(self._state.checks.values()):
                if check.ttl_deadline is not None and now >= check.ttl_deadline:
                    check.ttl_deadline = None  # re-armed by the next pass/warn/fail, as Consul's timer
                    output = "TTL expired"
                    if check.last_ttl_output:
                        output += f" (last output before timeout follows): {check.last_ttl_output}"
                    log.info("check %s missed its TTL, now critical", check.check_id)
                    self._state.update_check(check.check_id, CRITICAL, output)
            if now - last_reap >= self._reap_interval_s:
                last_reap = now
                self._reap(now)

    def _reap(self, now: float) -> None:
        reaped: set[str] = set()
        for check in list(self._state.checks.values()):
            timeout = self.reap_after_s(check)
            sid = check.service_id
            if (not sid or sid in reaped or timeout <= 0 or check.status != CRITICAL
                    or check.critical_since is None or now - check.critical_since <= timeout):
                continue
            reaped.add(sid)
            log.info("check %s critical for too long; deregistering service %s", check.check_id, sid)
            self._on_reap(sid)
