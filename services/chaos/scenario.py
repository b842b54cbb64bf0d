"""A ``shardmesh chaos`` scenario file, validated strictly into frozen dataclasses. Pure: no I/O beyond
reading the file. Every unknown key and every bad value is a :class:`ConfigError` naming the key's path,
so a typo in a fault never silently turns a chaos run into a fault-free one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.errors import ConfigError
from services.layers import LayerSpan
from services.localmesh.spec import read_yaml

PROCESS_FAULTS = frozenset({"kill", "hang", "restart", "slow"})
ERROR_FAULTS = frozenset({"error"})
NETWORK_FAULTS = frozenset({"delay", "bandwidth", "blackhole", "reset", "partition", "flap"})
CONSUL_FAULTS = frozenset({"consul-down", "consul-flap", "consul-forget", "deregister"})
FAULT_KINDS = PROCESS_FAULTS | ERROR_FAULTS | NETWORK_FAULTS | CONSUL_FAULTS
# Faults that last: they need duration_s (the others act at one instant).
WINDOWED = frozenset({"hang", "slow", "error", "delay", "bandwidth", "blackhole", "partition", "flap",
                      "consul-down", "consul-flap"})
STATUS_NAMES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN",
                          "CANCELLED", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS", "ABORTED"})
MODELS_WITH_GENERATION = ("tiny-llama", "tiny-llama-wide", "smollm2")

_TOP = {"name", "description", "mesh", "load", "faults", "expect"}
_MESH = {"model", "mode", "stages", "replicas", "discovery", "consul", "router_args", "worker_args"}
_LOAD = {"clients", "rate", "requests", "duration_s", "timeout_s", "mix", "max_new_tokens", "seed"}
_MIX = {"infer", "generate"}
_EXPECT = {"allowed_statuses", "must_hit", "max_extra_ms", "max_detect_ms", "min_avoid_share", "recover_within_s"}
_FAULT_COMMON = {"kind", "target", "at_s", "duration_s", "observe_s"}
_FAULT_EXTRA: dict[str, set[str]] = {
    "kill": set(), "restart": {"signal"}, "hang": set(), "slow": {"period_ms", "stopped_share"},
    "error": {"code", "percent"},
    "delay": {"delay_ms", "jitter_ms", "direction"}, "bandwidth": {"kbps", "direction"},
    "blackhole": {"direction"}, "reset": set(), "partition": set(), "flap": {"period_ms", "down_share"},
    "consul-down": {"mode"}, "consul-flap": {"period_ms", "down_share", "mode"}, "consul-forget": set(),
    "deregister": set(),
}


@dataclass(frozen=True)
class MeshPlan:
    model: str = "tiny-llama"
    mode: str = "direct"
    stages: tuple[LayerSpan, ...] = ()
    replicas: int = 2
    discovery: str = "static"
    consul: str = "emulator"  # emulator | agent ($CONSUL_HTTP_ADDR)
    router_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()

    @property
    def threads(self) -> int:
        """The workers' ``--threads`` (0 = torch's default), which the oracle must match."""
        args = list(self.worker_args)
        for i, a in enumerate(args):
            if a == "--threads" and i + 1 < len(args):
                return int(args[i + 1])
            if a.startswith("--threads="):
                return int(a.split("=", 1)[1])
        return 0

    def worker_names(self) -> list[str]:
        """The names :func:`services.localmesh.spec.parse_spec` gives: w<stage>r<replica>."""
        return [f"w{s}" + (f"r{r}" if self.replicas > 1 else "") for s in range(len(self.stages)) for r in range(self.replicas)]


@dataclass(frozen=True)
class LoadPlan:
    clients: int = 4  # closed loop: each client sends its next request when the last one ended
    rate: float = 0.0  # > 0: open loop at this many requests per second (clients = concurrency cap)
    requests: int = 120  # bound on the number of requests
    duration_s: float = 30.0  # bound on the time spent issuing requests
    timeout_s: float = 10.0  # the client's deadline per request
    infer_share: float = 1.0
    generate_share: float = 0.0
    max_new_tokens: int = 8
    seed: int = 0


@dataclass(frozen=True)
class FaultPlan:
    kind: str
    target: tuple[str, ...]  # () for Consul-wide faults; (worker,) or (source, worker) for a pair
    at_s: float
    duration_s: float = 0.0
    observe_s: float = 2.0  # instant faults: requests this long after injection count as exposed to it
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def worker(self) -> str:
        return self.target[-1] if self.target else ""

    @property
    def window_s(self) -> float:
        return self.duration_s if self.kind in WINDOWED else self.observe_s

    @property
    def label(self) -> str:
        return f"{self.kind}@{'->'.join(self.target) or 'consul'}"


@dataclass(frozen=True)
class Expectations:
    allowed_statuses: frozenset[str] = frozenset()
    must_hit: bool = True
    max_extra_ms: float | None = None
    max_detect_ms: float | None = None
    min_avoid_share: float | None = None
    recover_within_s: float | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    mesh: MeshPlan
    load: LoadPlan
    faults: tuple[FaultPlan, ...]
    expect: Expectations

    @property
    def needs_fault_injection(self) -> bool:
        return any(f.kind in ERROR_FAULTS for f in self.faults)

    @property
    def proxied_workers(self) -> frozenset[str]:
        return frozenset(f.worker for f in self.faults if f.kind in NETWORK_FAULTS)


def _keys(where: str, data: Any, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(sorted(allowed))}")
    unknown = sorted(str(k) for k in set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return data


def _num(where: str, value: Any, *, low: float, high: float = float("inf"), integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        bound = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
        raise ConfigError(f"{where}: expected {what} {bound}, got {value!r}")
    return value


def _choice(where: str, value: Any, options: set[str] | frozenset[str] | tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(f"{where}: expected one of {', '.join(sorted(options))}, got {value!r}")
    return str(value)


def _args(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value):
        raise ConfigError(f"{where}: expected a list of command-line arguments")
    return tuple(str(a) for a in value)


def _mesh(where: str, data: Any) -> MeshPlan:
    raw = _keys(where, data, _MESH)
    model = raw.get("model", "tiny-llama")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}.model: expected a model name like tiny-llama, got {model!r}")
    stages_raw = raw.get("stages", ["0:3", "3:6"])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f'{where}.stages: expected a list of layer ranges like ["0:3", "3:6"]')
    stages: list[LayerSpan] = []
    for i, s in enumerate(stages_raw):
        try:
            stages.append(LayerSpan.parse(str(s)))
        except Exception as exc:  # noqa: BLE001 - LayerSpan's message says what is wrong
            raise ConfigError(f"{where}.stages[{i}]: {exc}") from None
    expected = 0
    for i, span in enumerate(stages):
        if span.start != expected:
            raise ConfigError(f"{where}.stages[{i}]: {span} does not start where the previous stage ended ({expected})")
        expected = span.end
    discovery = _choice(f"{where}.discovery", raw.get("discovery", "static"), {"static", "consul"})
    plan = MeshPlan(
        model=model,
        mode=_choice(f"{where}.mode", raw.get("mode", "direct"), {"direct", "relay"}),
        stages=tuple(stages),
        replicas=_num(f"{where}.replicas", raw.get("replicas", 2), low=1, high=4, integer=True),
        discovery=discovery,
        consul=_choice(f"{where}.consul", raw.get("consul", "emulator"), {"emulator", "agent"}),
        router_args=_args(f"{where}.router_args", raw.get("router_args")),
        worker_args=_args(f"{where}.worker_args", raw.get("worker_args")),
    )
    try:
        if plan.threads < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{where}.worker_args: --threads takes an integer >= 0") from None
    return plan


def _load(where: str, data: Any, mesh: MeshPlan) -> LoadPlan:
    raw = _keys(where, data or {}, _LOAD)
    mix = _keys(f"{where}.mix", raw.get("mix", {"infer": 1.0}), _MIX)
    infer = _num(f"{where}.mix.infer", mix.get("infer", 0.0), low=0.0)
    generate = _num(f"{where}.mix.generate", mix.get("generate", 0.0), low=0.0)
    if infer + generate <= 0:
        raise ConfigError(f"{where}.mix: give infer and/or generate a positive weight")
    if generate and mesh.model not in MODELS_WITH_GENERATION:
        raise ConfigError(f"{where}.mix.generate: model {mesh.model} cannot generate; use one of {', '.join(MODELS_WITH_GENERATION)}")
    return LoadPlan(
        clients=_num(f"{where}.clients", raw.get("clients", 4), low=1, high=256, integer=True),
        rate=float(_num(f"{where}.rate", raw.get("rate", 0), low=0.0, high=10000.0)),
        requests=_num(f"{where}.requests", raw.get("requests", 120), low=1, high=100000, integer=True),
        duration_s=float(_num(f"{where}.duration_s", raw.get("duration_s", 30.0), low=0.1, high=3600.0)),
        timeout_s=float(_num(f"{where}.timeout_s", raw.get("timeout_s", 10.0), low=0.001, high=600.0)),
        infer_share=infer / (infer + generate),
        generate_share=generate / (infer + generate),
        max_new_tokens=_num(f"{where}.max_new_tokens", raw.get("max_new_tokens", 8), low=1, high=512, integer=True),
        seed=_num(f"{where}.seed", raw.get("seed", 0), low=0, integer=True),
    )


def _target(where: str, kind: str, value: Any, workers: list[str]) -> tuple[str, ...]:
    if kind in CONSUL_FAULTS and kind != "deregister":
        if value not in (None, "consul"):
            raise ConfigError(f"{where}.target: {kind} acts on the Consul agent; omit target or write consul")
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}.target: expected a worker name ({', '.join(workers)}) or a pair [source, worker]")
    if len(names) > 2 or (len(names) == 2 and kind not in NETWORK_FAULTS):
        raise ConfigError(f"{where}.target: only network faults take a pair [source, worker]; {kind} takes one worker")
    if names[-1] not in workers:
        raise ConfigError(f"{where}.target: no worker named {names[-1]!r}; the mesh has {', '.join(workers)}")
    if len(names) == 2 and names[0] not in ("router", *workers):
        raise ConfigError(f"{where}.target[0]: source must be router or a worker, got {names[0]!r}")
    if len(names) == 2 and names[0] == names[1]:
        raise ConfigError(f"{where}.target: a pair needs two different processes")
    return tuple(names)


def _fault_params(where: str, kind: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if kind == "restart":
        p["signal"] = _choice(f"{where}.signal", raw.get("signal", "TERM"), {"TERM", "KILL"})
    if kind in ("slow", "flap", "consul-flap"):
        p["period_ms"] = _num(f"{where}.period_ms", raw.get("period_ms", 200), low=10, high=60000)
    if kind == "slow":
        p["stopped_share"] = _num(f"{where}.stopped_share", raw.get("stopped_share", 0.5), low=0.01, high=0.99)
    if kind in ("flap", "consul-flap"):
        p["down_share"] = _num(f"{where}.down_share", raw.get("down_share", 0.5), low=0.01, high=0.99)
    if kind == "error":
        p["code"] = _choice(f"{where}.code", raw.get("code", "UNAVAILABLE"), {"UNAVAILABLE", "INTERNAL", "UNKNOWN"})
        p["percent"] = _num(f"{where}.percent", raw.get("percent", 50), low=0, high=100)
    if kind == "delay":
        p["delay_ms"] = _num(f"{where}.delay_ms", raw.get("delay_ms", 200), low=0, high=60000)
        p["jitter_ms"] = _num(f"{where}.jitter_ms", raw.get("jitter_ms", 0), low=0, high=60000)
    if kind == "bandwidth":
        p["kbps"] = _num(f"{where}.kbps", raw.get("kbps", 64), low=1, high=10_000_000)
    if kind in ("delay", "bandwidth", "blackhole"):
        p["direction"] = _choice(f"{where}.direction", raw.get("direction", "both"), {"to", "from", "both"})
    if kind in ("consul-down", "consul-flap"):
        p["mode"] = _choice(f"{where}.mode", raw.get("mode", "refuse"), {"refuse", "error", "hang"})
    return p


def _fault(where: str, data: Any, workers: list[str]) -> FaultPlan:
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"{where}: expected a mapping with kind ({', '.join(sorted(FAULT_KINDS))}), target, at_s")
    kind = _choice(f"{where}.kind", data["kind"], FAULT_KINDS)
    raw = _keys(where, data, _FAULT_COMMON | _FAULT_EXTRA[kind])
    if "at_s" not in raw:
        raise ConfigError(f"{where}.at_s: missing (seconds after the load starts)")
    duration = float(_num(f"{where}.duration_s", raw.get("duration_s", 0.0), low=0.0, high=600.0))
    if kind in WINDOWED and duration <= 0:
        raise ConfigError(f"{where}.duration_s: {kind} lasts a while; give duration_s > 0")
    if kind not in WINDOWED and kind != "reset" and "duration_s" in raw:
        raise ConfigError(f"{where}.duration_s: {kind} acts at one instant; use observe_s for the window to watch")
    return FaultPlan(
        kind=kind,
        target=_target(where, kind, raw.get("target"), workers),
        at_s=float(_num(f"{where}.at_s", raw["at_s"], low=0.0, high=3600.0)),
        duration_s=duration,
        observe_s=float(_num(f"{where}.observe_s", raw.get("observe_s", 2.0), low=0.1, high=600.0)),
        params=_fault_params(where, kind, raw),
    )


def _expect(where: str, data: Any) -> Expectations:
    raw = _keys(where, data or {}, _EXPECT)
    statuses = raw.get("allowed_statuses", [])
    if not isinstance(statuses, list):
        raise ConfigError(f"{where}.allowed_statuses: expected a list of gRPC status names like [UNAVAILABLE]")
    for i, s in enumerate(statuses):
        _choice(f"{where}.allowed_statuses[{i}]", s, STATUS_NAMES)
    must_hit = raw.get("must_hit", True)
    if not isinstance(must_hit, bool):
        raise ConfigError(f"{where}.must_hit: expected true or false, got {must_hit!r}")

    def opt(key: str, high: float = float("inf")) -> float | None:
        return None if raw.get(key) is None else float(_num(f"{where}.{key}", raw[key], low=0.0, high=high))

    return Expectations(
        allowed_statuses=frozenset(statuses), must_hit=must_hit, max_extra_ms=opt("max_extra_ms"),
        max_detect_ms=opt("max_detect_ms"), min_avoid_share=opt("min_avoid_share", 1.0),
        recover_within_s=opt("recover_within_s"),
    )


def parse_scenario(data: Any, *, source: str = "scenario") -> Scenario:
    raw = _keys(source, data, _TOP)
    mesh = _mesh(f"{source}: mesh", raw.get("mesh", {}))
    load = _load(f"{source}: load", raw.get("load"), mesh)
    faults_raw = raw.get("faults", [])
    if not isinstance(faults_raw, list):
        raise ConfigError(f"{source}: faults: expected a list of faults")
    workers = mesh.worker_names()
    faults = tuple(_fault(f"{source}: faults[{i}]", f, workers) for i, f in enumerate(faults_raw))
    for i, f in enumerate(faults):
        if f.kind in CONSUL_FAULTS and mesh.discovery != "consul":
            raise ConfigError(f"{source}: faults[{i}].kind: {f.kind} needs mesh.discovery: consul")
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: name: expected a non-empty string")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{source}: description: expected a string")
    return Scenario(name, description, mesh, load, faults, _expect(f"{source}: expect", raw.get("expect")))


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    return parse_scenario(read_yaml(path), source=str(path))
