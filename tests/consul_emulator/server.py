"""The emulator's HTTP API: the Consul endpoints shardmesh uses, plus test-only ``/_emulator/`` controls.

Consul endpoints (https://developer.hashicorp.com/consul/api-docs):
  PUT /v1/agent/service/register[?replace-existing-checks=true]   PUT /v1/agent/service/deregister/:id
  PUT /v1/agent/check/pass|warn|fail/:id[?note=]  PUT /v1/agent/check/update/:id  PUT /v1/agent/check/deregister/:id
  GET /v1/agent/services  GET /v1/agent/service/:id  GET /v1/agent/checks  GET /v1/agent/self
  GET /v1/health/service/:name[?passing&tag=]  GET /v1/catalog/service/:name  GET /v1/catalog/services
  GET /v1/status/leader  GET /v1/status/peers
  PUT /v1/acl/policy  PUT /v1/acl/token  GET /v1/acl/token/self  DELETE /v1/acl/token/:id  DELETE /v1/acl/policy/:id
Read endpoints support blocking queries (``index``, ``wait``: default 5m, max 10m, plus up to wait/16
of jitter) and answer ``X-Consul-Index``. Request keys are matched case-insensitively and with
snake_case aliases, as Consul's decoder does. Not emulated: ``filter`` (ignored), ``near``, ``dc``,
``node-meta``, consistency modes, script/alias/docker checks.

Blocking backends (``blocking_backend``): ``streaming`` is what a client agent does for
``/v1/health/service`` (``use_streaming_backend``, on by default since Consul 1.10): the agent's
materialized view answers only once its index exceeds ``index``, so after a snapshot restore moved the
index backwards nothing wakes a watcher and the lower index shows up only when ``wait`` runs out, and a
leader loss shows up then too. ``rpc`` is a server agent (or streaming off): the state store's abandon
channel wakes every watcher at once on a restore. ACLs (``acl_default_policy``) follow ``acl.py``; off
by default, when every token is accepted and ignored.

Controls (on the main port and on the separate control port, which keeps listening while paused):
  POST /_emulator/pause?mode=error|refuse|hang  -- error: every /v1 call answers 500 "No cluster leader";
       refuse: stop listening and drop open connections (connection refused); hang: accept, never answer
  POST /_emulator/resume
  POST /_emulator/restore?index=N  -- move the index back to N (a snapshot restore) and wake all watchers
  POST /_emulator/touch?service=NAME -- take a new index for NAME without changing anything
  POST /_emulator/forget  -- the agent restarted without its data dir: every service and check is gone
  POST /_emulator/mode?blocking=streaming|rpc&strip_index=true|false  -- strip_index: drop X-Consul-Index
       from every answer, as a proxy in front of the agent may
  GET  /_emulator/state
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tests.consul_emulator.acl import AclNotFound, AclStore, Authorizer, InvalidPolicy, PermissionDenied
from tests.consul_emulator.checks import CheckRunners
from tests.consul_emulator.state import (
    CRITICAL,
    PASSING,
    STATUSES,
    WARNING,
    AgentState,
    BadRequest,
    CheckDef,
    Service,
    parse_go_duration,
)

log = logging.getLogger(__name__)

READY_PREFIX = "consul-emulator-ready"  # the one stdout line of ``python -m tests.consul_emulator``
DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 600.0
PAUSE_MODES = ("error", "refuse", "hang")
BLOCKING_BACKENDS = ("streaming", "rpc")
META_VALUE_MAX_BYTES = 512  # Go's len(): bytes of the UTF-8 encoding, although the message says characters
_GO_TRUE = {"", "1", "t", "T", "true", "TRUE", "True"}
_GO_FALSE = {"0", "f", "F", "false", "FALSE", "False"}
_META_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _keys(obj: Any, what: str) -> dict[str, Any]:
    """Consul's decoder matches field names case-insensitively and accepts snake_case aliases."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise BadRequest(f"Request decode failed: {what} must be an object")
    return {str(k).lower().replace("_", ""): v for k, v in obj.items()}


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"Request decode failed: {what} must be a list of strings")
    return list(value)


def _int(value: Any, what: str, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"Request decode failed: {what} must be an integer")
    return value


def _go_bool(value: str, what: str) -> bool:
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise BadRequest(f"Invalid value for ?{what}")


def _validate_meta(meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise BadRequest("Request decode failed: Meta must be an object")
    if len(meta) > 64:
        raise BadRequest("Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise BadRequest(f"Request decode failed: Meta[{key!r}] must be a string")
        if not key or len(key) > 128 or not set(key) <= _META_KEY_CHARS:
            raise BadRequest(f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): Key contains invalid characters")
        if key.startswith("consul-"):
            raise BadRequest(f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): Key prefix 'consul-' is reserved for internal use")
        if len(value.encode("utf-8")) > META_VALUE_MAX_BYTES:
            raise BadRequest(f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): Value is too long (limit: 512 characters)")
    return dict(meta)


def parse_check(raw: Any, service_id: str, service_name: str, position: int, total: int) -> CheckDef:
    c = _keys(raw, "Check")
    check_id = c.get("checkid") or c.get("id") or f"service:{service_id}" + (f":{position + 1}" if total > 1 else "")
    status = c.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadRequest("Status for checks must 'passing', 'warning', 'critical'")
    for unsupported in ("args", "scriptargs", "udp", "h2ping", "dockercontainerid", "aliasservice", "aliasnode", "osservice"):
        if c.get(unsupported):
            raise BadRequest(f"Invalid check: the emulator does not run {unsupported} checks")
    kind, target = "ttl", ""
    for key in ("grpc", "tcp", "http"):
        if c.get(key):
            kind, target = key, str(c[key])
            break
    ttl = parse_go_duration(c.get("ttl", 0), "TTL")
    interval = parse_go_duration(c.get("interval", 0), "Interval")
    if interval > 0 and ttl > 0:
        raise BadRequest("Invalid check: Interval and TTL cannot both be specified")
    if kind != "ttl" and interval <= 0:
        raise BadRequest("Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or GRPC checks")
    if kind == "ttl" and ttl <= 0:
        raise BadRequest("Invalid check: TTL must be > 0 for TTL checks")
    return CheckDef(
        check_id=str(check_id),
        name=str(c.get("name") or f"Service '{service_name}' check"),
        kind=kind,
        status=status,
        notes=str(c.get("notes") or ""),
        ttl_s=ttl,
        interval_s=interval,
        timeout_s=parse_go_duration(c.get("timeout", 0), "Timeout"),
        target=target,
        grpc_use_tls=bool(c.get("grpcusetls", False)),
        tls_skip_verify=bool(c.get("tlsskipverify", False)),
        method=str(c.get("method") or "GET"),
        deregister_after_s=parse_go_duration(c.get("deregistercriticalserviceafter", 0), "DeregisterCriticalServiceAfter"),
        success_before_passing=_int(c.get("successbeforepassing"), "SuccessBeforePassing"),
        failures_before_critical=_int(c.get("failuresbeforecritical"), "FailuresBeforeCritical"),
        failures_before_warning=_int(c.get("failuresbeforewarning"), "FailuresBeforeWarning"),
    )


def parse_registration(body: Any) -> tuple[Service, list[CheckDef]]:
    b = _keys(body, "service definition")
    name = b.get("name")
    if not name or not isinstance(name, str):
        raise BadRequest("Missing service name")
    service_id = b.get("id") or name
    if not isinstance(service_id, str):
        raise BadRequest("Request decode failed: ID must be a string")
    weights_raw = _keys(b.get("weights"), "Weights")
    weights = {"Passing": _int(weights_raw.get("passing"), "Weights.Passing", 1),
               "Warning": _int(weights_raw.get("warning"), "Weights.Warning", 1)}
    if b.get("weights") is not None and weights["Passing"] < 1:
        raise BadRequest("Passing must be greater than 0")
    service = Service(
        service_id=service_id,
        name=name,
        address=str(b.get("address") or ""),
        port=_int(b.get("port"), "Port"),
        tags=_str_list(b.get("tags"), "Tags"),
        meta=_validate_meta(b.get("meta")),
        weights=weights,
        enable_tag_override=bool(b.get("enabletagoverride", False)),
    )
    raw_checks: list[Any] = []
    if b.get("check"):
        raw_checks.append(b["check"])
    checks_field = b.get("checks") or []
    if not isinstance(checks_field, list):
        raise BadRequest("Request decode failed: Checks must be a list")
    raw_checks.extend(c for c in checks_field if c)  # Consul skips empty check definitions
    defs = [parse_check(raw, service_id, name, i, len(raw_checks)) for i, raw in enumerate(raw_checks)]
    return service, defs


class ConsulEmulator:
    """An in-memory, single-node Consul agent+server speaking the HTTP API over aiohttp."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        control_port: int = 0,
        *,
        node_name: str = "consul-emulator",
        reap_interval_s: float = 30.0,
        min_deregister_after_s: float = 60.0,
        min_check_interval_s: float = 1.0,
        blocking_backend: str = "streaming",
        strip_index: bool = False,
        acl_default_policy: str | None = None,
        acl_management_token: str | None = None,
    ) -> None:
        if blocking_backend not in BLOCKING_BACKENDS:
            raise ValueError(f"blocking_backend must be one of {', '.join(BLOCKING_BACKENDS)}")
        self.blocking_backend = blocking_backend
        self.strip_index = strip_index
        self.acl = AclStore(acl_default_policy, acl_management_token)
        self.host = host
        self.port = port
        self.control_port = control_port
        self.state = AgentState(node_name=node_name, node_address=host)
        self.runners = CheckRunners(self.state, reap_interval_s=reap_interval_s,
                                    min_deregister_after_s=min_deregister_after_s,
                                    min_check_interval_s=min_check_interval_s, on_reap=self._reap)
        self.pause_mode: str | None = None
        self._pause_event = asyncio.Event()  # set (and replaced) whenever a pause starts
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._control_runner: web.AppRunner | None = None
        self._control_app: web.Application | None = None
        self._pending_pause: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.runners.start()
        app = web.Application(middlewares=[self._errors, self._faults])
        app.add_routes(self._consul_routes() + self._control_routes())
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        self.port = self._runner.addresses[0][1]
        control = self._control_app = web.Application(middlewares=[self._errors])
        control.add_routes(self._control_routes())
        self._control_runner = web.AppRunner(control, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._control_runner.setup()
        await web.TCPSite(self._control_runner, self.host, self.control_port, reuse_address=True).start()
        self.control_port = self._control_runner.addresses[0][1]

    async def close(self) -> None:
        self._closing = True
        self._resumed.set()
        self._pause_event.set()  # wakes blocking queries so shutdown is prompt
        await self.runners.close()
        for runner in (self._runner, self._control_runner):
            if runner is not None:
                await runner.cleanup()

    # -- faults ------------------------------------------------------------------------------------
    async def pause(self, mode: str) -> None:
        if mode not in PAUSE_MODES:
            raise BadRequest(f"mode must be one of {', '.join(PAUSE_MODES)}")
        if self.pause_mode is not None:
            await self.resume()
        self.pause_mode = mode
        self._resumed = asyncio.Event()
        event, self._pause_event = self._pause_event, asyncio.Event()
        event.set()
        if mode == "refuse" and self._site is not None and self._runner is not None:
            await self._site.stop()
            self._site = None
            for conn in list(self._runner.server.connections if self._runner.server else []):
                if conn.transport is not None:
                    conn.transport.close()
        log.info("paused (%s)", mode)

    async def resume(self) -> None:
        if self._site is None and self._runner is not None:
            self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            await self._site.start()
        self.pause_mode = None
        self._resumed.set()
        log.info("resumed")

    @web.middleware
    async def _faults(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path.startswith("/_emulator/"):
            return await handler(request)
        if self.pause_mode is None:
            response = await handler(request)
            if self.pause_mode is None:
                return response
        mode = self.pause_mode
        if mode == "error":
            return web.Response(status=500, text="No cluster leader")
        if mode == "hang":
            await self._resumed.wait()
        if request.transport is not None:
            request.transport.close()  # the client sees the connection drop, never an answer
        return web.Response(status=503)

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (BadRequest, InvalidPolicy) as exc:
            return web.Response(status=400, text=str(exc))
        except (AclNotFound, PermissionDenied) as exc:
            return web.Response(status=403, text=str(exc))

    # -- ACLs --------------------------------------------------------------------------------------
    @staticmethod
    def _token(request: web.Request) -> str:
        """Consul's order: ``?token=``, then ``X-Consul-Token``, then ``Authorization: Bearer``."""
        if request.query.get("token"):
            return request.query["token"]
        if request.headers.get("X-Consul-Token"):
            return request.headers["X-Consul-Token"]
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return value.strip().split(" ")[0] if scheme.lower() == "bearer" and value.strip() else ""

    def _authz(self, request: web.Request) -> Authorizer:
        return self.acl.resolve(self._token(request))

    def _service_visible(self, authz: Authorizer, service_name: str) -> bool:
        return authz.allowed("service", service_name, "read") and authz.allowed("node", self.state.node_name, "read")

    # -- helpers -----------------------------------------------------------------------------------
    @staticmethod
    async def _json_body(request: web.Request) -> Any:
        raw = await request.read()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"Request decode failed: {exc}") from None

    async def _blocking(self, request: web.Request, compute: Callable[[], tuple[int, Any, bool]],
                        streams: bool = False) -> web.Response:
        """Consul's blockingQuery: return at once without ``index``; else when the result's index
        exceeds it, a restore happens, or ``wait`` (+ jitter) passes. ``compute`` returns (index, body,
        filtered by ACLs). With the streaming backend (``streams`` endpoints only) neither a restore nor a
        leader loss wakes the query: only an index above ``index`` or the end of ``wait`` does."""
        query = request.query
        try:
            min_index = int(query.get("index", "0"))
            if min_index < 0:
                raise ValueError
        except ValueError:
            raise BadRequest("Invalid index") from None
        wait_s = DEFAULT_WAIT_S
        if query.get("wait"):
            try:
                wait_s = parse_go_duration(query["wait"], "wait")
            except BadRequest:
                raise BadRequest("Invalid wait time") from None
        wait_s = DEFAULT_WAIT_S if wait_s <= 0 else min(wait_s, MAX_WAIT_S)
        streaming = streams and self.blocking_backend == "streaming" and min_index > 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s + random.uniform(0, wait_s / 16)
        while True:
            changed, abandoned = self.state.watch()
            pause_event = self._pause_event
            index, body, filtered = compute()
            index = max(index, 1)  # Consul never answers 0, or clients would spin
            remaining = deadline - loop.time()
            if min_index == 0 or index > min_index or remaining <= 0 or self._closing:
                break
            waiters = [asyncio.ensure_future(e.wait()) for e in (changed, abandoned, pause_event)]
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if (abandoned.is_set() or pause_event.is_set()) and not streaming:
                index, body, filtered = compute()
                index = max(index, 1)
                break
        return self._json(body, index, filtered=filtered, backend="streaming" if streaming else "blocking-query")

    def _json(self, body: Any, index: int | None = None, *, filtered: bool = False, backend: str = "") -> web.Response:
        headers = {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
        if index is not None and not self.strip_index:
            headers["X-Consul-Index"] = str(index)
            headers["X-Consul-Effective-Consistency"] = "leader"
        if backend:
            headers["X-Consul-Query-Backend"] = backend
        if filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        headers["X-Consul-Default-ACL-Policy"] = self.acl.default_policy  # "allow" with ACLs off, as Consul sends
        return web.json_response(body, headers=headers)

    def _reap(self, service_id: str) -> None:
        if service_id in self.state.services:
            for check_id in self.state.deregister(service_id):
                self.runners.stop_check(check_id)

    # -- Consul endpoints ----------------------------------------------------------------------------
    def _consul_routes(self) -> list[web.RouteDef]:
        return [
            web.put("/v1/agent/service/register", self.register),
            web.put("/v1/agent/service/deregister/{service_id:.+}", self.deregister),
            web.get("/v1/agent/services", self.agent_services),
            web.get("/v1/agent/service/{service_id:.+}", self.agent_service),
            web.get("/v1/agent/checks", self.agent_checks),
            web.get("/v1/agent/self", self.agent_self),
            web.put("/v1/agent/check/pass/{check_id:.+}", self.check_pass),
            web.put("/v1/agent/check/warn/{check_id:.+}", self.check_warn),
            web.put("/v1/agent/check/fail/{check_id:.+}", self.check_fail),
            web.put("/v1/agent/check/update/{check_id:.+}", self.check_update),
            web.put("/v1/agent/check/deregister/{check_id:.+}", self.check_deregister),
            web.get("/v1/health/service/{name}", self.health_service),
            web.get("/v1/catalog/service/{name}", self.catalog_service),
            web.get("/v1/catalog/services", self.catalog_services),
            web.get("/v1/status/leader", self.status_leader),
            web.get("/v1/status/peers", self.status_peers),
            web.put("/v1/acl/policy", self.acl_policy_create),
            web.delete("/v1/acl/policy/{policy_id}", self.acl_policy_delete),
            web.put("/v1/acl/token", self.acl_token_create),
            web.get("/v1/acl/token/self", self.acl_token_self),
            web.delete("/v1/acl/token/{accessor_id}", self.acl_token_delete),
        ]

    async def register(self, request: web.Request) -> web.Response:
        replace = _go_bool(request.query["replace-existing-checks"], "replace-existing-checks") \
            if "replace-existing-checks" in request.query else False
        authz = self._authz(request)
        service, defs = parse_registration(await self._json_body(request))
        authz.require("service", service.name, "write")
        old = self.state.services.get(service.service_id)
        if old is not None and old.name != service.name:
            authz.require("service", old.name, "write")
        started, removed = self.state.register(service, defs, replace)
        for check_id in removed:
            self.runners.stop_check(check_id)
        for check in started:
            self.runners.start_check(check)
        return web.Response(status=200)

    async def deregister(self, request: web.Request) -> web.Response:
        authz = self._authz(request)
        service_id = request.match_info["service_id"]
        if service_id not in self.state.services:
            return web.Response(status=404, text=f'Unknown service ID "{service_id}"')
        authz.require("service", self.state.services[service_id].name, "write")
        self._reap(service_id)
        return web.Response(status=200)

    async def agent_services(self, request: web.Request) -> web.Response:
        authz = self._authz(request)
        everything = sorted(self.state.services.items())
        visible = {sid: self.state.agent_service_json(s) for sid, s in everything
                   if authz.allowed("service", s.name, "read")}
        return self._json(visible, filtered=len(visible) < len(everything) and not authz.anonymous)

    async def agent_service(self, request: web.Request) -> web.Response:
        authz = self._authz(request)
        svc = self.state.services.get(request.match_info["service_id"])
        if svc is None:
            return web.Response(status=404, text=f'unknown service ID: {request.match_info["service_id"]}')
        authz.require("service", svc.name, "read")
        body = self.state.agent_service_json(svc)
        body["ContentHash"] = f"{hash(json.dumps(body, sort_keys=True)) & 0xFFFFFFFFFFFFFFFF:016x}"
        return self._json(body)

    async def agent_checks(self, request: web.Request) -> web.Response:
        authz = self._authz(request)
        everything = sorted(self.state.checks.items())
        visible = {cid: self.state.check_json(c) for cid, c in everything
                   if (authz.allowed("service", c.service_name, "read") if c.service_id
                       else authz.allowed("node", self.state.node_name, "read"))}
        return self._json(visible, filtered=len(visible) < len(everything) and not authz.anonymous)

    async def agent_self(self, request: web.Request) -> web.Response:
        self._authz(request).require("agent", self.state.node_name, "read")
        return self._json({
            "Config": {"Datacenter": "dc1", "NodeName": self.state.node_name, "NodeID": self.state.node_id,
                       "Server": True, "Version": "emulator"},
            "Member": {"Name": self.state.node_name, "Addr": self.state.node_address, "Status": 1},
        })

    def _require_check_write(self, authz: Authorizer, service_name: str) -> None:
        if service_name:
            authz.require("service", service_name, "write")
        else:
            authz.require("node", self.state.node_name, "write")

    async def _ttl_update(self, request: web.Request, check_id: str, status: str, output: str) -> web.Response:
        authz = self._authz(request)
        check = self.state.checks.get(check_id)
        if check is None:
            return web.Response(status=404, text=f'Unknown check ID "{check_id}"')
        self._require_check_write(authz, check.service_name)
        if check.definition.kind != "ttl":
            return web.Response(status=500, text=f'CheckID "{check_id}" does not have associated TTL')
        check.ttl_deadline = time.monotonic() + check.definition.ttl_s
        check.last_ttl_output = output
        self.state.update_check(check_id, status, output)
        return web.Response(status=200)

    async def check_pass(self, request: web.Request) -> web.Response:
        return await self._ttl_update(request, request.match_info["check_id"], PASSING, request.query.get("note", ""))

    async def check_warn(self, request: web.Request) -> web.Response:
        return await self._ttl_update(request, request.match_info["check_id"], WARNING, request.query.get("note", ""))

    async def check_fail(self, request: web.Request) -> web.Response:
        return await self._ttl_update(request, request.match_info["check_id"], CRITICAL, request.query.get("note", ""))

    async def check_update(self, request: web.Request) -> web.Response:
        body = _keys(await self._json_body(request), "check update")
        status = body.get("status")
        if status not in STATUSES:
            raise BadRequest(f'Invalid check status: "{status}"')
        return await self._ttl_update(request, request.match_info["check_id"], status, str(body.get("output") or ""))

    async def check_deregister(self, request: web.Request) -> web.Response:
        authz = self._authz(request)
        check_id = request.match_info["check_id"]
        existing = self.state.checks.get(check_id)
        if existing is None:
            return web.Response(status=404, text=f'Unknown check ID "{check_id}"')
        self._require_check_write(authz, existing.service_name)
        check = self.state.checks.pop(check_id)
        self.runners.stop_check(check_id)
        self.state.touch(check.service_name)
        return web.Response(status=200)

    async def health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        passing = _go_bool(request.query["passing"], "passing") if "passing" in request.query else False
        tags = request.query.getall("tag", [])
        authz = self._authz(request)
        visible = self._service_visible(authz, name)

        def compute() -> tuple[int, Any, bool]:
            entries = self.state.health_entries(name, tags, passing)
            return self.state.index_for_service(name), entries if visible else [], bool(entries) and not visible \
                and not authz.anonymous
        return await self._blocking(request, compute, streams=True)

    async def catalog_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        tags = request.query.getall("tag", [])
        authz = self._authz(request)
        visible = self._service_visible(authz, name)

        def compute() -> tuple[int, Any, bool]:
            entries = self.state.catalog_entries(name, tags)
            return self.state.index_for_service(name), entries if visible else [], bool(entries) and not visible \
                and not authz.anonymous
        return await self._blocking(request, compute)

    async def catalog_services(self, request: web.Request) -> web.Response:
        authz = self._authz(request)

        def compute() -> tuple[int, Any, bool]:
            names: dict[str, list[str]] = {"consul": []}
            for svc in self.state.services.values():
                names[svc.name] = sorted(set(names.get(svc.name, [])) | set(svc.tags))
            visible = {n: t for n, t in names.items() if self._service_visible(authz, n)}
            index = max([*self.state.service_index.values(), self.state.extinction_index, self.state.node_index])
            return index, visible, len(visible) < len(names) and not authz.anonymous
        return await self._blocking(request, compute)

    async def status_leader(self, request: web.Request) -> web.Response:
        return self._json(f"{self.state.node_address}:8300")

    async def status_peers(self, request: web.Request) -> web.Response:
        return self._json([f"{self.state.node_address}:8300"])

    # -- ACL API (subset) ----------------------------------------------------------------------------
    def _acl_write(self, request: web.Request) -> None:
        if not self.acl.enabled:
            raise web.HTTPUnauthorized(text="ACL support disabled")
        self._authz(request).require("acl", None, "write")

    async def acl_policy_create(self, request: web.Request) -> web.Response:
        self._acl_write(request)
        body = _keys(await self._json_body(request), "policy")
        policy = self.acl.add_policy(str(body.get("name") or ""), str(body.get("rules") or ""),
                                     str(body.get("description") or ""))
        return self._json(policy.json())

    async def acl_policy_delete(self, request: web.Request) -> web.Response:
        self._acl_write(request)
        return self._json(self.acl.delete_policy(request.match_info["policy_id"]))

    async def acl_token_create(self, request: web.Request) -> web.Response:
        self._acl_write(request)
        body = _keys(await self._json_body(request), "token")
        refs = [{str(k): str(v) for k, v in (ref or {}).items()} for ref in body.get("policies") or []]
        token = self.acl.add_token(refs, secret=body.get("secretid") or None, description=str(body.get("description") or ""))
        return self._json(token.json(self.acl.policies))

    async def acl_token_delete(self, request: web.Request) -> web.Response:
        self._acl_write(request)
        return self._json(self.acl.delete_token(request.match_info["accessor_id"]))

    async def acl_token_self(self, request: web.Request) -> web.Response:
        if not self.acl.enabled:
            raise web.HTTPUnauthorized(text="ACL support disabled")
        secret = self._token(request)
        self.acl.resolve(secret)  # 403 ACL not found for an unknown one
        token = self.acl.tokens.get(secret)
        if token is None:
            raise AclNotFound()
        return self._json(token.json(self.acl.policies))

    # -- controls ------------------------------------------------------------------------------------
    def _control_routes(self) -> list[web.RouteDef]:
        return [
            web.post("/_emulator/forget", self.ctl_forget),
            web.post("/_emulator/mode", self.ctl_mode),
            web.post("/_emulator/pause", self.ctl_pause),
            web.post("/_emulator/resume", self.ctl_resume),
            web.post("/_emulator/restore", self.ctl_restore),
            web.post("/_emulator/touch", self.ctl_touch),
            web.get("/_emulator/state", self.ctl_state),
        ]

    async def ctl_pause(self, request: web.Request) -> web.Response:
        mode = request.query.get("mode", "refuse")
        if mode not in PAUSE_MODES:
            raise BadRequest(f"mode must be one of {', '.join(PAUSE_MODES)}")
        if request.app is self._control_app:
            await self.pause(mode)  # done before answering: the caller may rely on it at once
        else:
            # Asked on the main port, which "refuse" drops: apply it once this answer is on its way.
            self._pending_pause = asyncio.create_task(self._pause_soon(mode))
        return self._json({"paused": mode})

    async def _pause_soon(self, mode: str) -> None:
        await asyncio.sleep(0.05)
        await self.pause(mode)

    async def ctl_resume(self, request: web.Request) -> web.Response:
        await self.resume()
        return self._json({"paused": None})

    async def ctl_restore(self, request: web.Request) -> web.Response:
        try:
            to_index = int(request.query.get("index", "1"))
        except ValueError:
            raise BadRequest("index must be an integer") from None
        if not 1 <= to_index < self.state.index:
            raise BadRequest(f"index must be in [1, {self.state.index}) to go backwards")
        self.state.restore(to_index)
        return self._json({"index": self.state.index})

    async def ctl_touch(self, request: web.Request) -> web.Response:
        name = request.query.get("service")
        if not name:
            raise BadRequest("service is required")
        return self._json({"index": self.state.touch(name)})

    async def ctl_forget(self, request: web.Request) -> web.Response:
        """The agent restarted without its data: its services and checks are gone from it and the catalog."""
        forgotten = sorted(self.state.services)
        for service_id in forgotten:
            self._reap(service_id)
        return self._json({"forgotten": forgotten, "index": self.state.index})

    async def ctl_mode(self, request: web.Request) -> web.Response:
        blocking = request.query.get("blocking")
        if blocking is not None:
            if blocking not in BLOCKING_BACKENDS:
                raise BadRequest(f"blocking must be one of {', '.join(BLOCKING_BACKENDS)}")
            self.blocking_backend = blocking
        if "strip_index" in request.query:
            self.strip_index = _go_bool(request.query["strip_index"], "strip_index")
        return self._json({"blocking": self.blocking_backend, "strip_index": self.strip_index})

    async def ctl_state(self, request: web.Request) -> web.Response:
        return self._json({
            "blocking": self.blocking_backend, "strip_index": self.strip_index, "acl": self.acl.enabled,
            "index": self.state.index, "paused": self.pause_mode,
            "services": sorted(self.state.services), "checks": {c: k.status for c, k in self.state.checks.items()},
            "service_index": self.state.service_index,
        })

