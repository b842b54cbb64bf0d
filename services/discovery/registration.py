"""Worker self-registration with the local Consul agent, and the service metadata it advertises.

The agent owns health: either it calls the worker's grpc.health.v1 service (``check="grpc"``), or the
worker proves liveness with TTL heartbeats (``check="ttl"``, for agents that cannot dial the worker).
Registration uses an explicit CheckID and ``replace-existing-checks`` so a restarted worker re-registers
idempotently, and ``DeregisterCriticalServiceAfter`` so a worker that dies without deregistering is
reaped by the agent. Metadata (model, layer range, checksum, capacity) lets the router plan before it
dials anyone; :func:`worker_meta` writes it and :func:`parse_worker_meta` reads it back.

Once registered, the registrar keeps checking that the agent still knows the instance, for both check
kinds: a TTL heartbeat gets 404 from an agent that forgot its check, and with a gRPC check (which needs
no call from the worker) a ``GET /v1/agent/service/ID`` every ``resync_s`` does the same. An agent
restarted without its data dir, or an operator's deregistration, is then undone within ``resync_s``.
A 403 from the agent is a configuration error (:class:`ConsulAclRefused`) whose message names the token
variable and the missing right; it is never mistaken for an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import consul
import consul.aio
import consul.base

from services.discovery.consul import format_duration, parse_duration
from services.discovery.consul_client import DEFAULT_SERVICE_NAME, ConsulAddress, make_client
from services.errors import ConfigError, FailedPrecondition, Unavailable
from services.layers import LayerSpan

log = logging.getLogger(__name__)

CheckKind = Literal["grpc", "ttl"]

# Keys of the service Meta map (Consul allows [A-Za-z0-9_-] keys <= 128 chars, values <= 512, 64 pairs).
META_MODEL = "model"
META_LAYERS = "layers"
META_TOTAL_LAYERS = "total_layers"
META_CHECKSUM = "checksum"
META_MAX_INFLIGHT = "max_inflight"
META_STATE = "state"
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_MAX_META_PAIRS = 64
_MAX_META_VALUE_BYTES = 512  # Consul counts bytes (Go's len), whatever its message says
TOKEN_HINT = "set CONSUL_HTTP_TOKEN (or CONSUL_HTTP_TOKEN_FILE)"


class ConsulAclRefused(ConfigError):
    """The agent answered 403: the ACL token is unknown or lacks a right. Retrying will not fix it."""


@dataclass(frozen=True)
class WorkerMeta:
    """What a worker advertises in Consul, parsed back into domain types."""

    model_id: str
    layers: LayerSpan
    total_layers: int
    checksum: str
    max_inflight: int
    state: str = "serving"
    extra: Mapping[str, str] | None = None  # any other keys, untouched


def _validate_meta(meta: Mapping[str, str]) -> dict[str, str]:
    if len(meta) > _MAX_META_PAIRS:
        raise ConfigError(f"Consul service meta has {len(meta)} pairs; at most {_MAX_META_PAIRS} are allowed")
    for key, value in meta.items():
        if not _META_KEY_RE.match(key) or key.lower().startswith("consul-"):
            raise ConfigError(f"invalid Consul meta key {key!r}: use [A-Za-z0-9_-], not starting with 'consul-'")
        if not isinstance(value, str) or len(value.encode("utf-8")) > _MAX_META_VALUE_BYTES:
            raise ConfigError(f"invalid Consul meta value for {key!r}: must be a string of at most "
                              f"{_MAX_META_VALUE_BYTES} bytes in UTF-8")
    return dict(meta)


def worker_meta(
    model_id: str,
    layers: LayerSpan | str,
    total_layers: int,
    checksum: str,
    max_inflight: int,
    *,
    state: str = "serving",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Builds the Meta map a worker registers with (all values are strings, as Consul requires)."""
    span = layers if isinstance(layers, LayerSpan) else LayerSpan.parse(layers)
    span.check_within(total_layers, model_id)
    meta = {
        META_MODEL: model_id,
        META_LAYERS: str(span),
        META_TOTAL_LAYERS: str(total_layers),
        META_CHECKSUM: checksum,
        META_MAX_INFLIGHT: str(max_inflight),
        META_STATE: state,
    }
    for key, value in (extra or {}).items():
        if key in meta:
            raise ConfigError(f"Consul meta key {key!r} is reserved by shardmesh")
        meta[key] = value
    return _validate_meta(meta)


def parse_worker_meta(meta: Mapping[str, str] | None) -> WorkerMeta:
    """Reads :func:`worker_meta` output back; a worker with unusable meta cannot be routed to."""
    meta = dict(meta or {})
    missing = [k for k in (META_MODEL, META_LAYERS, META_TOTAL_LAYERS, META_CHECKSUM, META_MAX_INFLIGHT) if k not in meta]
    if missing:
        raise FailedPrecondition(f"worker metadata lacks {', '.join(missing)}")
    try:
        layers = LayerSpan.parse(meta[META_LAYERS])
        total = int(meta[META_TOTAL_LAYERS])
        max_inflight = int(meta[META_MAX_INFLIGHT])
    except (ValueError, ConfigError) as exc:
        raise FailedPrecondition(f"worker metadata is malformed: {exc}") from None
    if layers.end > total or max_inflight < 1:
        raise FailedPrecondition(f"worker metadata is inconsistent: layers {layers} of {total}, max_inflight {max_inflight}")
    known = {META_MODEL, META_LAYERS, META_TOTAL_LAYERS, META_CHECKSUM, META_MAX_INFLIGHT, META_STATE}
    return WorkerMeta(
        model_id=meta[META_MODEL],
        layers=layers,
        total_layers=total,
        checksum=meta[META_CHECKSUM],
        max_inflight=max_inflight,
        state=meta.get(META_STATE, "serving"),
        extra={k: v for k, v in meta.items() if k not in known},
    )


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ConsulRegistrar:
    """Registers one worker instance with its local agent and keeps it registered until deregistered.

    ``interval_s``/``check_timeout_s`` pace the agent's gRPC check; ``ttl_s`` is the TTL of a TTL check
    (heartbeats go every ttl/3). ``resync_s`` is how often a gRPC-checked instance asks the agent whether it
    still knows it (default: the check interval), so it is back in the catalog within that much after
    the agent forgot it. ``request_timeout_s`` bounds every call to the agent, so shutdown never hangs on an
    agent that is gone.
    """

    def __init__(
        self,
        consul: ConsulAddress,
        *,
        service_name: str = DEFAULT_SERVICE_NAME,
        service_id: str,
        address: str,
        port: int,
        tags: Sequence[str] = (),
        meta: Mapping[str, str] | None = None,
        check: CheckKind = "grpc",
        interval_s: float = 5.0,
        check_timeout_s: float | None = None,
        ttl_s: float = 15.0,
        deregister_critical_after: str = "1m",
        grpc_service: str = "",
        check_port: int | None = None,
        grpc_use_tls: bool = False,
        weight: int = 1,
        request_timeout_s: float = 5.0,
        resync_s: float | None = None,
    ) -> None:
        if check not in ("grpc", "ttl"):
            raise ConfigError(f"invalid Consul check kind {check!r}: expected grpc or ttl")
        if not service_id:
            raise ConfigError("a Consul registration needs a service id (the worker id)")
        if not 0 < port < 65536:
            raise ConfigError(f"invalid port {port} to register in Consul: expected 1-65535")
        if interval_s <= 0 or ttl_s <= 0 or weight < 1 or (resync_s is not None and resync_s <= 0):
            raise ConfigError("Consul check interval, TTL, resync period and weight must be positive")
        parse_duration(deregister_critical_after)  # validated now, sent as given
        self._consul = consul
        self.service_name = service_name
        self.service_id = service_id
        self.check_id = f"{service_id}:health"
        self._address = address
        self._port = port
        self._tags = list(tags)
        self._meta = _validate_meta(meta or {})
        self._check_kind: CheckKind = check
        self._interval_s = interval_s
        self._check_timeout_s = check_timeout_s if check_timeout_s is not None else min(interval_s, 10.0)
        self._ttl_s = ttl_s
        self._deregister_after = deregister_critical_after
        # check_port: a plaintext health-only listener when the service port speaks TLS.
        self._grpc_target = _hostport(address, check_port or port) + (f"/{grpc_service}" if grpc_service else "")
        self._grpc_use_tls = grpc_use_tls
        self._weight = weight
        self._request_timeout_s = request_timeout_s
        # TTL: heartbeats every ttl/3 double as the check (404 = forgotten); gRPC: a read every resync_s.
        self.resync_s = ttl_s / 3 if check == "ttl" else (resync_s if resync_s is not None else interval_s)
        self._client: consul.aio.Consul | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.registered = False
        self.heartbeats_sent = 0
        self.heartbeat_errors = 0
        self.reregistrations = 0  # times the agent had forgotten us and we registered again

    def check_definition(self) -> dict[str, Any]:
        """The check as sent to the agent: a raw dict, since py-consul's Check helpers have no gRPC kind."""
        check: dict[str, Any] = {
            "CheckID": self.check_id,
            "Name": f"{self.service_name} {self._check_kind} health",
            "DeregisterCriticalServiceAfter": self._deregister_after,
        }
        if self._check_kind == "grpc":
            check.update({
                "GRPC": self._grpc_target,
                "GRPCUseTLS": self._grpc_use_tls,
                "Interval": format_duration(self._interval_s),
                "Timeout": format_duration(self._check_timeout_s),
            })
        else:
            check["TTL"] = format_duration(self._ttl_s)
        return check

    def _ensure_client(self) -> consul.aio.Consul:
        if self._client is None:
            self._client = make_client(self._consul, http_timeout_s=self._request_timeout_s)
        return self._client

    def _acl_refused(self, what: str, right: str, said: str) -> ConsulAclRefused:
        said = said.strip() or "403 Forbidden"
        if "ACL not found" in said:
            why = "the ACL token is unknown to Consul (ACL not found)" if self._consul.token else \
                "no ACL token is set"
        else:
            why = f"the ACL token lacks {right} on {self.service_name} (Consul said: {said[:300]})"
        return ConsulAclRefused(f"Consul at {self._consul.hostport} refused {what} of {self.service_id}: {why}; "
                                f"{TOKEN_HINT} to a token with {right} on {self.service_name}")

    async def _call(self, what: str, coro: Any, right: str = "service:write") -> Any:
        try:
            return await asyncio.wait_for(coro, self._request_timeout_s)
        except asyncio.CancelledError:
            raise
        except consul.ACLPermissionDenied as exc:
            raise self._acl_refused(what, right, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - every agent failure is "Consul unavailable" to the caller
            raise Unavailable(f"Consul agent at {self._consul.hostport}: {what} failed: {type(exc).__name__}: {exc}") from exc

    async def is_known(self) -> bool:
        """Whether the agent still has this instance (``GET /v1/agent/service/ID``; 404 means forgotten).
        py-consul's ``service_definition`` sends no token, so the request is made here."""
        client = self._ensure_client()

        def status(response: consul.base.Response) -> tuple[int, str]:
            return response.code, str(response.body)

        code, body = await self._call("look-up", client.http.get(
            status, f"/v1/agent/service/{self.service_id}", headers=client.prepare_headers()), right="service:read")
        if code == 403:
            raise self._acl_refused("the look-up", "service:read", body)
        if code == 404:
            return False
        if code != 200:
            raise Unavailable(f"Consul agent at {self._consul.hostport}: look-up of {self.service_id} answered {code} "
                              f"{body.strip()[:200]}")
        return True

    async def resync(self) -> bool:
        """Registers again if the agent forgot this instance; returns whether it had to."""
        if self._check_kind == "ttl":
            before = self.reregistrations
            await self._pass_ttl()
            return self.reregistrations > before
        if await self.is_known():
            return False
        log.warning("Consul agent at %s no longer knows %s (restarted without its data, or deregistered); "
                    "registering again", self._consul.hostport, self.service_id)
        await self._register_once()
        self.reregistrations += 1
        return True

    async def _register_once(self) -> None:
        client = self._ensure_client()
        ok = await self._call("registration", client.agent.service.register(
            self.service_name,
            service_id=self.service_id,
            address=self._address,
            port=self._port,
            tags=self._tags,
            meta=self._meta,
            check=self.check_definition(),
            weights={"Passing": self._weight, "Warning": 1},
            replace_existing_checks=True,
        ))
        if not ok:
            raise Unavailable(f"Consul agent at {self._consul.hostport} refused to register {self.service_id}")
        self.registered = True

    async def register(self) -> None:
        """Registers (idempotently); with a TTL check, also passes it at once and starts heartbeats."""
        await self._register_once()
        log.info("registered %s (%s) in Consul at %s with a %s check", self.service_id, self.service_name,
                 self._consul.hostport, self._check_kind)
        if self._check_kind == "ttl":
            await self._pass_ttl()
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name=f"consul-resync:{self.service_id}")

    async def _pass_ttl(self) -> None:
        client = self._ensure_client()
        ok = await self._call("TTL pass", client.agent.check.ttl_pass(self.check_id))
        if not ok:  # 404: the agent forgot us (restarted without state, or reaped us): register again
            log.warning("Consul agent does not know check %s; registering %s again", self.check_id, self.service_id)
            await self._register_once()
            self.reregistrations += 1
            ok = await self._call("TTL pass", client.agent.check.ttl_pass(self.check_id))
            if not ok:
                raise Unavailable(f"Consul agent rejected the TTL heartbeat of {self.check_id}")
        self.heartbeats_sent += 1

    async def _heartbeat_loop(self) -> None:
        """TTL heartbeats, or for a gRPC check the low-rate look-up; both register again when forgotten."""
        period = self.resync_s
        what = "TTL heartbeat" if self._check_kind == "ttl" else "registration check"
        failing = False
        while True:
            await asyncio.sleep(period)
            try:
                await self.resync()
            except (ConsulAclRefused, Unavailable) as exc:
                self.heartbeat_errors += 1
                if not failing:  # a refused token is a configuration error: said louder than an outage
                    level = logging.ERROR if isinstance(exc, ConsulAclRefused) else logging.WARNING
                    log.log(level, "%s for %s failed (%s); retrying every %.1fs", what, self.service_id, exc, period)
                failing = True
                continue
            if failing:
                log.info("%s for %s works again", what, self.service_id)
                failing = False

    async def _stop_heartbeat(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def deregister(self) -> bool:
        """Stops heartbeats and deregisters; never raises, since it runs at shutdown when the agent may
        be gone (the agent then reaps the instance after ``deregister_critical_after``)."""
        await self._stop_heartbeat()
        if not self.registered:
            return False
        try:
            ok = await self._call("deregister", self._ensure_client().agent.service.deregister(self.service_id))
        except Unavailable as exc:
            log.warning("could not deregister %s (%s); the agent reaps it %s after its check fails",
                        self.service_id, exc, self._deregister_after)
            return False
        self.registered = False
        log.info("deregistered %s from Consul", self.service_id)
        return bool(ok)

    async def close(self) -> None:
        """Stops heartbeats and closes the HTTP client (does not deregister)."""
        await self._stop_heartbeat()
        client, self._client = self._client, None
        if client is not None:
            await client.close()
