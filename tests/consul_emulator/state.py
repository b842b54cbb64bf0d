"""The emulated agent's state: one node, its services and checks, and a raft-like index.

Semantics follow Consul's agent and state store (agent/agent.go, agent/consul/state):
- every write that changes something takes the next index; a write that changes nothing (re-registering
  an identical service, a TTL pass on a passing check) takes none, as the state store skips no-op writes;
- each service name has its own index (the last change touching it), which is what
  ``/v1/health/service/:name`` reports, so unrelated changes do not wake its watchers;
- the index is never 0; a "restore" may move it backwards (as a snapshot restore does) and wakes every
  blocking query at once, like the state store's abandon channel;
- new checks start critical unless ``Status`` is given, re-registering a check keeps its status and
  output, and check IDs default to ``service:<id>`` (``service:<id>:<n>`` when there are several).
- Only check *status* changes move the index: Consul defers output-only changes (check_update_interval).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
DATACENTER = "dc1"

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


class BadRequest(Exception):
    """Maps to HTTP 400 with this message, as Consul answers invalid input."""


def parse_go_duration(value: Any, what: str = "duration") -> float:
    """Seconds from a Go duration string (``"10s"``, ``"1m30s"``) or integer nanoseconds, as Consul accepts."""
    if isinstance(value, bool):
        raise BadRequest(f"invalid {what}: {value!r}")
    if isinstance(value, (int, float)):
        return float(value) / 1e9
    if not isinstance(value, str):
        raise BadRequest(f"invalid {what}: {value!r}")
    text = value.strip()
    if text in ("", "0"):
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_NS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise BadRequest(f"time: invalid duration {value!r} for {what}")
    return sign * total / 1e9


def go_duration(seconds: float) -> str:
    """Formats like Go's ``time.Duration.String()``: ``1s``, ``1m0s``, ``500ms``, ``1.5s``."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign, ns = ("-" if ns < 0 else ""), abs(ns)

    def frac(value: int, unit: int) -> str:
        whole, rest = divmod(value, unit)
        if not rest:
            return str(whole)
        return f"{whole}.{str(rest).zfill(len(str(unit)) - 1).rstrip('0')}"

    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{frac(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{frac(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    secs = frac(rest, 10**9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return sign + secs


@dataclass
class CheckDef:
    """A check as registered (Consul's CheckType), before the agent turns it into a HealthCheck."""

    check_id: str
    name: str
    kind: str  # "ttl" | "grpc" | "tcp" | "http"
    status: str | None = None  # initial status; None = critical
    notes: str = ""
    ttl_s: float = 0.0
    interval_s: float = 0.0
    timeout_s: float = 0.0
    target: str = ""  # GRPC "host:port[/service]", TCP "host:port" or HTTP URL
    grpc_use_tls: bool = False
    tls_skip_verify: bool = False
    method: str = "GET"
    deregister_after_s: float = 0.0
    success_before_passing: int = 0
    failures_before_critical: int = 0
    failures_before_warning: int = 0

    def same_config(self, other: CheckDef) -> bool:
        mine = {k: v for k, v in self.__dict__.items() if k != "status"}
        theirs = {k: v for k, v in other.__dict__.items() if k != "status"}
        return mine == theirs


@dataclass
class Check:
    definition: CheckDef
    service_id: str
    service_name: str
    service_tags: list[str]
    status: str
    output: str = ""
    create_index: int = 0
    modify_index: int = 0
    critical_since: float | None = None  # monotonic; drives DeregisterCriticalServiceAfter
    ttl_deadline: float | None = None  # monotonic; TTL checks only
    last_ttl_output: str = ""

    @property
    def check_id(self) -> str:
        return self.definition.check_id


@dataclass
class Service:
    service_id: str
    name: str
    address: str = ""
    port: int = 0
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    create_index: int = 0
    modify_index: int = 0

    def same(self, other: Service) -> bool:
        keys = ("service_id", "name", "address", "port", "tags", "meta", "weights", "enable_tag_override")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


class AgentState:
    """Services and checks of the single emulated node, with Consul's index and wake-up rules."""

    def __init__(self, node_name: str = "consul-emulator", node_address: str = "127.0.0.1", start_index: int = 10) -> None:
        self.node_name = node_name
        self.node_address = node_address
        self.node_id = str(uuid.uuid4())
        self.index = max(start_index, 1)
        self.node_index = self.index  # node and serfHealth were written at start
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self.service_index: dict[str, int] = {}
        self.extinction_index = 0
        self._changed = asyncio.Event()
        self._abandoned = asyncio.Event()

    # -- change notification ---------------------------------------------------------------------
    def watch(self) -> tuple[asyncio.Event, asyncio.Event]:
        """Events set by the next change and by the next restore; grab them before reading state."""
        return self._changed, self._abandoned

    def _commit(self, names: set[str]) -> int:
        self.index += 1
        for name in names:
            self.service_index[name] = self.index
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return self.index

    def restore(self, to_index: int) -> None:
        """Moves the index backwards as a snapshot restore does, and wakes every blocking query."""
        to_index = max(1, to_index)
        self.index = to_index
        self.node_index = min(self.node_index, to_index)
        self.extinction_index = min(self.extinction_index, to_index)
        for name in self.service_index:
            self.service_index[name] = min(self.service_index[name], to_index)
        for svc in self.services.values():
            svc.create_index, svc.modify_index = min(svc.create_index, to_index), min(svc.modify_index, to_index)
        for chk in self.checks.values():
            chk.create_index, chk.modify_index = min(chk.create_index, to_index), min(chk.modify_index, to_index)
        abandoned, self._abandoned = self._abandoned, asyncio.Event()
        changed, self._changed = self._changed, asyncio.Event()
        abandoned.set()
        changed.set()

    def touch(self, name: str) -> int:
        """An idempotent write that still takes an index (tests: a blocking query returns, nothing changed)."""
        return self._commit({name})

    def index_for_service(self, name: str) -> int:
        if name in self.service_index:
            return max(self.service_index[name], 1)
        return max(self.extinction_index, self.node_index, 1)

    # -- writes ------------------------------------------------------------------------------------
    def register(self, service: Service, defs: list[CheckDef], replace_existing_checks: bool) -> tuple[list[Check], list[str]]:
        """Adds or updates a service with its checks; returns (checks to (re)start, check IDs removed)."""
        names = {service.name}
        changed = False
        old = self.services.get(service.service_id)
        if old is not None:
            names.add(old.name)
        if old is None or not old.same(service):
            changed = True
            service.create_index = old.create_index if old else 0
            self.services[service.service_id] = service
        else:
            service = old
        now = time.monotonic()
        started: list[Check] = []
        for definition in defs:
            prev = self.checks.get(definition.check_id)
            status = definition.status or CRITICAL
            check = Check(definition, service.service_id, service.name, list(service.tags), status)
            if prev is not None:
                # Consul restores status and output from the snapshot taken before re-registration.
                check.status, check.output = prev.status, prev.output
                check.create_index, check.modify_index = prev.create_index, prev.modify_index
                check.critical_since = prev.critical_since
                check.last_ttl_output = prev.last_ttl_output
                if not (prev.definition.same_config(definition) and prev.service_id == check.service_id
                        and prev.service_name == check.service_name and prev.service_tags == check.service_tags):
                    changed = True
            else:
                changed = True
            if check.status == CRITICAL and check.critical_since is None:
                check.critical_since = now
            if definition.kind == "ttl":
                check.ttl_deadline = now + definition.ttl_s
            self.checks[definition.check_id] = check
            started.append(check)
        removed: list[str] = []
        if replace_existing_checks:
            keep = {d.check_id for d in defs}
            removed = [cid for cid, c in self.checks.items() if c.service_id == service.service_id and cid not in keep]
            for cid in removed:
                del self.checks[cid]
            changed = changed or bool(removed)
        if changed:
            index = self._commit(names)
            if service.create_index == 0:
                service.create_index = index
            service.modify_index = index
            for check in started:
                if check.create_index == 0:
                    check.create_index = index
                check.modify_index = index
        return started, removed

    def deregister(self, service_id: str) -> list[str]:
        """Removes a service and its checks; returns the removed check IDs."""
        service = self.services.pop(service_id)
        removed = [cid for cid, c in self.checks.items() if c.service_id == service_id]
        for cid in removed:
            del self.checks[cid]
        index = self._commit({service.name})
        if not any(s.name == service.name for s in self.services.values()):
            self.extinction_index = index
        return removed

    def update_check(self, check_id: str, status: str, output: str) -> bool:
        """Sets a check's status and output; takes an index only when the status changes."""
        check = self.checks.get(check_id)
        if check is None:
            return False
        check.output = output
        if check.status == status:
            return False
        check.status = status
        check.critical_since = time.monotonic() if status == CRITICAL else None
        check.modify_index = self._commit({check.service_name})
        return True

    # -- reads -------------------------------------------------------------------------------------
    def node_json(self) -> dict[str, Any]:
        addr = self.node_address
        return {
            "ID": self.node_id,
            "Node": self.node_name,
            "Address": addr,
            "Datacenter": DATACENTER,
            "TaggedAddresses": {"lan": addr, "lan_ipv4": addr, "wan": addr, "wan_ipv4": addr},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self.node_index,
            "ModifyIndex": self.node_index,
        }

    def serf_check_json(self) -> dict[str, Any]:
        return {
            "Node": self.node_name, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": PASSING,
            "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "",
            "ServiceTags": [], "Type": "", "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {},
            "CreateIndex": self.node_index, "ModifyIndex": self.node_index,
        }

    def check_json(self, check: Check) -> dict[str, Any]:
        d = check.definition
        return {
            "Node": self.node_name,
            "CheckID": d.check_id,
            "Name": d.name,
            "Status": check.status,
            "Notes": d.notes,
            "Output": check.output,
            "ServiceID": check.service_id,
            "ServiceName": check.service_name,
            "ServiceTags": list(check.service_tags),
            "Type": d.kind,
            "Interval": go_duration(d.interval_s) if d.interval_s else "",
            "Timeout": go_duration(d.timeout_s) if d.timeout_s else "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": check.create_index,
            "ModifyIndex": check.modify_index,
        }

    def service_json(self, svc: Service) -> dict[str, Any]:
        return {
            "ID": svc.service_id,
            "Service": svc.name,
            "Tags": list(svc.tags),
            "Address": svc.address,
            "Meta": dict(svc.meta),
            "Port": svc.port,
            "Weights": dict(svc.weights),
            "EnableTagOverride": svc.enable_tag_override,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": svc.create_index,
            "ModifyIndex": svc.modify_index,
        }

    def agent_service_json(self, svc: Service) -> dict[str, Any]:
        return {
            "ID": svc.service_id, "Service": svc.name, "Tags": list(svc.tags), "Meta": dict(svc.meta),
            "Port": svc.port, "Address": svc.address, "Weights": dict(svc.weights),
            "EnableTagOverride": svc.enable_tag_override, "Datacenter": DATACENTER,
        }

    def instances(self, name: str, tags: list[str]) -> list[Service]:
        found = [s for s in self.services.values() if s.name == name and all(t in s.tags for t in tags)]
        return sorted(found, key=lambda s: s.service_id)

    def health_entries(self, name: str, tags: list[str], passing_only: bool) -> list[dict[str, Any]]:
        entries = []
        for svc in self.instances(name, tags):
            checks = [self.serf_check_json()] + [
                self.check_json(c) for c in sorted(self.checks.values(), key=lambda c: c.check_id)
                if c.service_id == svc.service_id
            ]
            if passing_only and any(c["Status"] != PASSING for c in checks):
                continue
            entries.append({"Node": self.node_json(), "Service": self.service_json(svc), "Checks": checks})
        return entries

    def catalog_entries(self, name: str, tags: list[str]) -> list[dict[str, Any]]:
        node = self.node_json()
        return [{
            "ID": node["ID"], "Node": node["Node"], "Address": node["Address"], "Datacenter": DATACENTER,
            "TaggedAddresses": node["TaggedAddresses"], "NodeMeta": node["Meta"], "ServiceKind": "",
            "ServiceID": s.service_id, "ServiceName": s.name, "ServiceTags": list(s.tags),
            "ServiceAddress": s.address, "ServiceWeights": dict(s.weights), "ServiceMeta": dict(s.meta),
            "ServicePort": s.port, "ServiceEnableTagOverride": s.enable_tag_override, "ServiceProxy": {},
            "ServiceConnect": {}, "CreateIndex": s.create_index, "ModifyIndex": s.modify_index,
        } for s in self.instances(name, tags)]
