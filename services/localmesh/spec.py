"""The ``shardmesh up`` YAML file, parsed into a frozen spec. Pure: no processes, no sockets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.errors import ConfigError
from services.layers import LayerSpan
from services.net import split_host_port

_TOP_KEYS = {"model", "router", "workers", "mode", "discovery", "consul", "worker_args", "router_args"}
_ROUTER_KEYS = {"listen"}
_WORKER_KEYS = {"layers", "listen", "replicas", "args", "capacity", "memory_mb"}
AUTO = "auto"  # layers: auto = planned from measured costs and capacities (services/localmesh/auto.py)
_DISCOVERY = {"static", "consul"}


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    span: LayerSpan | None  # None = layers: auto, until services.localmesh.auto.place_auto plans it
    listen: str  # "127.0.0.1:0" when omitted: the worker binds a free port and reports it
    args: tuple[str, ...] = ()
    capacity: float = 0.0  # declared relative speed (passed as --capacity); 0 = calibrated by the worker
    memory_mb: float = 0.0  # declared memory for weights (--capacity-memory-mb); 0 = unbounded


@dataclass(frozen=True)
class MeshSpec:
    model: str
    router_listen: str
    workers: tuple[WorkerSpec, ...]
    mode: str = "direct"
    discovery: str = "static"
    consul_address: str = ""  # "" = $CONSUL_HTTP_ADDR
    consul_service: str = "shardmesh-worker"
    worker_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()

    @property
    def needs_placement(self) -> bool:
        return any(w.span is None for w in self.workers)


def _number(value: Any, where: str, key: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _check_keys(where: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _listen(value: Any, where: str) -> str:
    if value is None:
        return "127.0.0.1:0"
    split_host_port(str(value), what=f"{where}.listen")
    return str(value)


def _args(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, (str, int, float)) for a in value):
        raise ConfigError(f"{where}: expected a list of command-line arguments")
    return tuple(str(a) for a in value)


def parse_spec(data: Any, *, source: str = "config") -> MeshSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with keys model, router, workers")
    _check_keys(source, data, _TOP_KEYS)
    if "model" not in data:
        raise ConfigError(f"{source}: missing key 'model' (e.g. model: minilm)")
    router = data.get("router") or {}
    if not isinstance(router, dict):
        raise ConfigError(f"{source}: router must be a mapping like {{listen: 127.0.0.1:50050}}")
    _check_keys(f"{source}: router", router, _ROUTER_KEYS)
    raw_workers = data.get("workers")
    if not isinstance(raw_workers, list) or not raw_workers:
        raise ConfigError(f'{source}: workers must be a non-empty list like [{{layers: "0:2"}}, {{layers: "2:6"}}]')
    mode = str(data.get("mode", "direct"))
    if mode not in ("direct", "relay"):
        raise ConfigError(f"{source}: mode must be direct or relay, got {mode!r}")
    discovery = str(data.get("discovery", "static"))
    if discovery not in _DISCOVERY:
        raise ConfigError(f"{source}: discovery must be one of {sorted(_DISCOVERY)}, got {discovery!r}")
    workers: list[WorkerSpec] = []
    for index, raw in enumerate(raw_workers):
        where = f"{source}: workers[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f'{where}: expected a mapping like {{layers: "0:2"}}')
        _check_keys(where, raw, _WORKER_KEYS)
        if "layers" not in raw:
            raise ConfigError(f'{where}: missing key layers (e.g. layers: "0:2")')
        span = None if str(raw["layers"]).strip() == AUTO else LayerSpan.parse(str(raw["layers"]))
        capacity, memory_mb = _number(raw.get("capacity"), where, "capacity"), _number(raw.get("memory_mb"), where, "memory_mb")
        replicas = raw.get("replicas", 1)
        if not isinstance(replicas, int) or replicas < 1:
            raise ConfigError(f"{where}: replicas must be an integer >= 1, got {replicas!r}")
        if replicas > 1 and raw.get("listen") and not str(raw["listen"]).endswith(":0"):
            raise ConfigError(f"{where}: a fixed listen address cannot be shared by {replicas} replicas; omit listen")
        for r in range(replicas):
            name = f"w{index}" + (f"r{r}" if replicas > 1 else "")
            workers.append(WorkerSpec(name, span, _listen(raw.get("listen"), where), _args(raw.get("args"), where),
                                      capacity, memory_mb))
    _check_layout(workers, source)
    consul = data.get("consul") or {}
    if not isinstance(consul, dict):
        raise ConfigError(f"{source}: consul must be a mapping like {{address: 127.0.0.1:8500, service: shardmesh-worker}}")
    _check_keys(f"{source}: consul", consul, {"address", "service"})
    return MeshSpec(
        model=str(data["model"]),
        router_listen=_listen(router.get("listen"), f"{source}: router") if router.get("listen") else "127.0.0.1:0",
        workers=tuple(workers),
        mode=mode,
        discovery=discovery,
        consul_address=str(consul.get("address", "")),
        consul_service=str(consul.get("service", "shardmesh-worker")),
        worker_args=_args(data.get("worker_args"), f"{source}: worker_args"),
        router_args=_args(data.get("router_args"), f"{source}: router_args"),
    )


def _check_layout(workers: list[WorkerSpec], source: str) -> None:
    """Local meshes must tile the layers: distinct spans may not overlap (replicas share a span).
    ``layers: auto`` is all or nothing: the planner tiles the layers itself."""
    autos = sum(w.span is None for w in workers)
    if autos and autos != len(workers):
        raise ConfigError(f"{source}: layers: auto must be used by every worker or by none (the planner places them all)")
    if autos:
        return
    spans = sorted({w.span for w in workers if w.span is not None})
    for a, b in zip(spans, spans[1:]):
        if a.overlaps(b):
            raise ConfigError(f"{source}: worker layer ranges {a} and {b} overlap; stages must meet at one layer")
    expected = 0
    for span in spans:
        if span.start != expected:
            raise ConfigError(f"{source}: no worker holds layers {expected}:{span.start}")
        expected = span.end


def read_yaml(path: Path) -> Any:
    """A YAML file's data; unreadable or malformed files are ConfigErrors naming the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_spec(path: str | Path) -> MeshSpec:
    path = Path(path)
    return parse_spec(read_yaml(path), source=str(path))
