"""Consul discovery: watch ``/v1/health/service/NAME?passing`` with blocking queries, publish snapshots.

One background task long-polls the agent and follows Consul's rules for blocking queries
(https://developer.hashicorp.com/consul/api-docs/features/blocking): a return is not a change (the
result is diffed), an index that goes backwards resets the watch to a non-blocking read, an index of 0
is never blocked on, and the loop is paced by a token bucket, not by sleeps, so a stale index cannot spin
it. When the agent is unreachable the last known endpoints are kept and published as ``stale``: Consul is
the slower, authoritative view, and the router's own RPC failure detection covers the gap.

Three answers are not what they seem, and are handled as such:
- no ``X-Consul-Index`` (a proxy in between may strip it): there is nothing to block on, so the watch
  falls back to non-blocking reads every ``poll_interval_s`` until the header comes back;
- ``X-Consul-Results-Filtered-By-ACLs: true``: the token may not see some or all instances, so the list
  is not "the workers": the last known endpoints are kept, marked stale, with the reason;
- 403 (``ACL not found``, ``Permission denied``): a configuration error, logged as such, retried with
  back-off while the last known endpoints are served as stale.
A client agent answers blocking health queries from its streaming backend: after a snapshot restore
moves the index backwards, the lower index shows up only when ``wait`` runs out, so the watch recovers
within ``wait`` x 17/16, not at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import consul.aio
import consul.base

from services.discovery.base import DiscoverySnapshot, Endpoint, SnapshotPublisher
from services.discovery.consul_client import DEFAULT_SERVICE_NAME, ConsulAddress, make_client
from services.errors import ConfigError

log = logging.getLogger(__name__)

MAX_WAIT_S = 600.0  # Consul caps a blocking query at 10 minutes
JITTER_FRACTION = 16  # and adds up to wait/16 to it
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float) -> float:
    """Parses a Go/Consul duration (``"5s"``, ``"1m30s"``, ``"250ms"``) or a number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    raw = text.strip()
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(raw):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if not raw or pos != len(raw):
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 5s, 1m30s or 250ms")
    return total


def format_duration(seconds: float) -> str:
    """Formats seconds as a duration Consul parses; whole milliseconds are enough for ``wait``."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class TokenBucket:
    """Allows ``rate_per_s`` operations per second with bursts of ``burst``; waits only when empty."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ConfigError(f"invalid rate limit {rate_per_s}/s burst {burst}: both must be positive")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._stamp = clock()

    def reserve(self) -> float:
        """Takes one token (possibly going into debt) and returns how long to wait before acting."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    async def take(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


def _all_passing(checks: Iterable[Mapping[str, Any]] | None) -> bool:
    return all((c or {}).get("Status") == "passing" for c in checks or ())


def endpoint_from_entry(entry: Mapping[str, Any]) -> Endpoint | None:
    """One ``/v1/health/service`` entry as an Endpoint; ``None`` if it has no usable address."""
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    host = str(service.get("Address") or node.get("Address") or "")
    port = service.get("Port")
    if not host or not isinstance(port, int) or not 0 < port < 65536:
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    meta = {str(k): str(v) for k, v in (service.get("Meta") or {}).items()}
    return Endpoint(address=f"{host}:{port}", service_id=str(service.get("ID") or ""), meta=MappingProxyType(meta))


class ConsulAclError(Exception):
    """Consul answered 403: the token is unknown (``ACL not found``) or lacks a permission."""


class ConsulHttpError(Exception):
    """Consul answered with an error status other than 403."""


@dataclass(frozen=True)
class HealthAnswer:
    """One ``/v1/health/service`` answer with the headers that decide what it means."""

    entries: list[Mapping[str, Any]]
    index: int | None  # None: no (usable) X-Consul-Index header
    filtered_by_acls: bool = False
    default_acl_policy: str = ""


def health_answer(response: consul.base.Response) -> HealthAnswer:
    """py-consul callback for the health query that keeps the headers its own callbacks drop."""
    if response.code == 403:
        raise ConsulAclError(str(response.body).strip() or "403 Forbidden")
    if response.code >= 400:
        raise ConsulHttpError(f"{response.code} {str(response.body).strip()[:200]}")
    headers = response.headers
    raw_index = headers.get("X-Consul-Index", "")
    index = int(raw_index) if raw_index.isdigit() else None
    try:
        entries = json.loads(response.body)
    except ValueError:
        raise ConsulHttpError(f"unparsable answer from Consul: {str(response.body)[:200]!r}") from None
    if not isinstance(entries, list):
        raise ConsulHttpError(f"unexpected answer from Consul: {str(response.body)[:200]!r}")
    return HealthAnswer(entries=entries, index=index,
                        filtered_by_acls=headers.get("X-Consul-Results-Filtered-By-ACLs", "").lower() == "true",
                        default_acl_policy=headers.get("X-Consul-Default-ACL-Policy", ""))


def endpoints_from_health(entries: Iterable[Mapping[str, Any]] | None) -> tuple[Endpoint, ...]:
    """Passing entries as endpoints; re-checks ``passing`` client-side in case a proxy dropped the filter."""
    endpoints = []
    for entry in entries or ():
        if not _all_passing(entry.get("Checks")):
            continue
        endpoint = endpoint_from_entry(entry)
        if endpoint is None:
            log.debug("ignoring Consul entry without a usable address: %r", entry.get("Service"))
            continue
        endpoints.append(endpoint)
    return tuple(endpoints)


class ConsulDiscovery:
    """Discovery backend over a Consul agent's health API (see the module docstring for the rules).

    ``wait`` is the blocking-query wait; ``rate_per_s``/``burst`` bound how often the agent is asked;
    ``backoff_*`` pace retries while the agent is unreachable; ``start_timeout_s`` bounds how long
    :meth:`start` waits for the first answer before serving an empty, stale list.
    """

    name = "consul"

    def __init__(
        self,
        address: ConsulAddress,
        service: str = DEFAULT_SERVICE_NAME,
        *,
        wait: str | float = "60s",
        rate_per_s: float = 5.0,
        burst: int = 5,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        start_timeout_s: float = 3.0,
        http_timeout_margin_s: float = 5.0,
        poll_interval_s: float = 2.0,
    ) -> None:
        wait_s = parse_duration(wait)
        if not 0 < wait_s <= MAX_WAIT_S:
            raise ConfigError(f"invalid Consul wait {wait!r}: must be above 0 and at most 10m")
        if backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ConfigError("Consul retry back-off must satisfy 0 < initial <= max")
        if poll_interval_s <= 0:
            raise ConfigError("the Consul poll interval (used without X-Consul-Index) must be positive")
        self._poll_interval_s = poll_interval_s
        self._address = address
        self._service = service
        self._wait = format_duration(wait_s)
        # Above wait x 17/16 (Consul's maximum jitter), or healthy long polls would time out.
        self.http_timeout_s = wait_s * (1 + 1 / JITTER_FRACTION) + http_timeout_margin_s
        self._bucket = TokenBucket(rate_per_s, burst)
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._start_timeout_s = start_timeout_s
        self._publisher = SnapshotPublisher()
        self._client: consul.aio.Consul | None = None
        self._task: asyncio.Task[None] | None = None
        self._first_success = asyncio.Event()
        self._outage_since: float | None = None  # monotonic start of the current outage
        # Counters for metrics.
        self.queries = 0
        self.watch_errors = 0
        self.index_resets = 0
        self.last_success_monotonic: float | None = None
        self.last_index = 0
        self.unindexed_answers = 0  # answers without X-Consul-Index (polled instead of blocking)
        self.filtered_answers = 0  # answers filtered by ACLs (kept the last endpoints)
        self._polling = False  # no X-Consul-Index: non-blocking reads every poll_interval_s
        self._filtered_since: float | None = None
        self._warned_anonymous = False

    @property
    def service(self) -> str:
        return self._service

    @property
    def polling(self) -> bool:
        """True while Consul's answers lack X-Consul-Index and the watch polls instead of blocking."""
        return self._polling

    async def start(self) -> None:
        """Starts watching; returns after the first answer or ``start_timeout_s``, whichever is first."""
        if self._task is not None:
            return
        self._client = make_client(self._address, http_timeout_s=self.http_timeout_s)
        self._task = asyncio.create_task(self._watch(), name=f"consul-watch:{self._service}")
        ready = asyncio.create_task(self._first_success.wait())
        try:
            done, _ = await asyncio.wait({ready, self._task}, timeout=self._start_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
        if self._task in done:
            self._task.result()  # the watcher never returns on its own: surface its bug
        if not self._first_success.is_set() and self._outage_since is None:  # slow, not failing: say so once
            log.warning("no answer from Consul at %s within %.1fs; starting with no endpoints",
                        self._address.hostport, self._start_timeout_s)

    def snapshot(self) -> DiscoverySnapshot:
        return self._publisher.current()

    async def wait_changed(self, after_version: int, timeout: float) -> DiscoverySnapshot:
        return await self._publisher.wait_changed(after_version, timeout)

    async def close(self) -> None:
        """Stops the watcher and closes the HTTP client; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _health(self, index: int) -> HealthAnswer:
        """``GET /v1/health/service/NAME?passing`` (blocking when ``index`` > 0) through py-consul's HTTP
        client, with a callback that keeps the headers (its ``health.service`` drops them, and fails
        outright without X-Consul-Index)."""
        assert self._client is not None
        params: list[tuple[str, str]] = [("passing", "1")]
        if index > 0:
            params += [("index", str(index)), ("wait", self._wait)]
        path = f"/v1/health/service/{self._service}"  # py-consul quotes the path
        answer: HealthAnswer = await self._client.http.get(health_answer, path, params=params,
                                                           headers=self._client.prepare_headers())
        return answer

    async def _watch(self) -> None:
        assert self._client is not None  # set by start() before the task exists
        index = 0
        backoff = self._backoff_initial_s
        while True:
            await self._bucket.take()
            try:
                self.queries += 1
                answer = await self._health(index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means "Consul unavailable", never a dead watcher
                self.watch_errors += 1
                await self._on_error(exc)
                index = 0  # after an outage, read without blocking so recovery shows at once
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._backoff_max_s)
                continue
            backoff = self._backoff_initial_s
            self._check_anonymous(answer)
            if answer.index is None:
                await self._on_unindexed(answer)
                index = 0
                await asyncio.sleep(self._poll_interval_s)  # nothing to block on: poll, at a bounded rate
                continue
            if self._polling:
                self._polling = False
                log.info("Consul answers carry X-Consul-Index again; back to blocking queries for %s", self._service)
            new_index = answer.index
            if new_index < index:
                self.index_resets += 1
                log.info("Consul index went backwards (%d -> %d) for %s; restarting the watch", index, new_index,
                         self._service)
                index = 0  # Consul's rule: reset, i.e. the next read does not block
            else:
                index = max(new_index, 1)  # never block on index 0: it would return at once, forever
            self.last_index = new_index
            if answer.filtered_by_acls:
                await self._on_filtered()
                continue
            await self._on_success(endpoints_from_health(answer.entries))

    async def _on_unindexed(self, answer: HealthAnswer) -> None:
        self.unindexed_answers += 1
        if not self._polling:
            self._polling = True
            log.warning("Consul answered without X-Consul-Index (a proxy between here and the agent may strip it): "
                        "cannot block, polling %s every %.1fs instead", self._service, self._poll_interval_s)
        if answer.filtered_by_acls:
            await self._on_filtered()
        else:
            await self._on_success(endpoints_from_health(answer.entries))

    def _check_anonymous(self, answer: HealthAnswer) -> None:
        if answer.default_acl_policy == "deny" and not self._address.token and not self._warned_anonymous:
            self._warned_anonymous = True
            log.warning("Consul's default ACL policy is deny and no token is set: Consul hides what the anonymous "
                        "token may not read without saying so, so an empty list may mean 'not allowed'; set "
                        "CONSUL_HTTP_TOKEN (or CONSUL_HTTP_TOKEN_FILE) to a token with service:read on %s and "
                        "node:read", self._service)

    async def _on_filtered(self) -> None:
        """Some instances were hidden by ACLs: the list is not the set of workers; keep the last one, stale."""
        self.filtered_answers += 1
        self._first_success.set()
        self.last_success_monotonic = time.monotonic()
        if self._outage_since is not None:
            log.info("Consul at %s answers again after %.1fs", self._address.hostport, time.monotonic() - self._outage_since)
            self._outage_since = None
        if self._filtered_since is not None:
            return
        self._filtered_since = time.monotonic()
        kept = len(self._publisher.current().endpoints)
        detail = (f"consul filtered the {self._service} health results by ACLs since {time.strftime('%H:%M:%S')}: "
                  f"the token lacks service:read on {self._service} or node:read on some nodes; keeping {kept} last "
                  f"known endpoint(s); set CONSUL_HTTP_TOKEN to a token with those rights")
        log.error("%s", detail)
        await self._publisher.publish(stale=True, detail=detail)

    async def _on_success(self, endpoints: tuple[Endpoint, ...]) -> None:
        self.last_success_monotonic = time.monotonic()
        if self._filtered_since is not None:
            log.info("Consul no longer filters the %s health results by ACLs; %d passing instance(s)", self._service,
                     len(endpoints))
            self._filtered_since = None
        if self._outage_since is not None:
            log.info("Consul at %s reachable again after %.1fs; %d passing %s instance(s)", self._address.hostport,
                     time.monotonic() - self._outage_since, len(endpoints), self._service)
            self._outage_since = None
        if await self._publisher.publish(endpoints, stale=False, detail=""):
            log.debug("Consul %s: %d passing endpoint(s)", self._service, len(endpoints))
        self._first_success.set()

    async def _on_error(self, exc: BaseException) -> None:
        if self._outage_since is not None:
            log.debug("Consul still unreachable: %s", _describe(exc))
            return
        self._outage_since = time.monotonic()
        since = time.strftime("%H:%M:%S")
        kept = len(self._publisher.current().endpoints)
        if isinstance(exc, ConsulAclError):
            detail = (f"consul refused the ACL token since {since}: {exc}; set CONSUL_HTTP_TOKEN (or "
                      f"CONSUL_HTTP_TOKEN_FILE) to a token with service:read on {self._service} and node:read")
            log.error("%s; serving %d last known endpoint(s) as stale and retrying", detail, kept)
        else:
            detail = f"consul unreachable since {since}: {_describe(exc)}"
            log.warning("%s; serving %d last known endpoint(s) as stale and retrying", detail, kept)
        await self._publisher.publish(stale=True, detail=detail)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300] if text != type(exc).__name__ else text
