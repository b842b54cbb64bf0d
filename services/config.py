"""Typed, frozen configuration objects, built once in main() from flags and an injected environment."""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.discovery.consul_client import ConsulAddress, parse_consul_address
from services.errors import ConfigError
from services.layers import LayerSpan
from services.net import TlsFiles, split_host_port
from services.tracing import TracingSettings

MIB = 1024 * 1024


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def _non_negative(name: str, value: float) -> float:
    if value < 0:
        raise ConfigError(f"{name} must be 0 (off) or positive, got {value}")
    return value


def _coalesce_rows(value: int) -> int:
    if value == 1 or value < 0:
        raise ConfigError(f"--coalesce must be 0 (off) or at least 2 (requests per batch), got {value}")
    return value


def _positive_int(name: str, value: int) -> int:
    _positive(name, value)
    return value


@dataclass(frozen=True)
class ConsulRegistration:
    """How a worker registers itself with its Consul agent (absent with --no-consul-register)."""

    agent: ConsulAddress
    service: str
    check: str  # "grpc" | "ttl"
    tags: tuple[str, ...]


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    span: LayerSpan
    listen: str
    advertise: str | None
    worker_id: str | None
    max_inflight: int
    max_tensor_bytes: int
    grace_s: float
    threads: int
    wire_dtype: str
    use_shm: bool
    cache_budget_bytes: int
    session_ttl_s: float
    no_batching: bool
    consul: ConsulRegistration | None
    tls: TlsFiles
    metrics_listen: str | None
    log_level: str
    health_listen: str | None = None
    log_format: str = "text"  # --log-format: text | json (services/logging_json.py)
    max_batch_tokens: int = 32768  # batch x tokens of one request; larger is refused before compute
    mesh_key_file: str | None = None  # --mesh-key-file or $SHARDMESH_MESH_KEY_FILE (services/security/mesh_key.py)
    capacity_speed: float = 0.0  # --capacity: declared relative speed; 0 = calibrate at start
    capacity_memory_bytes: int = 0  # --capacity-memory-mb; 0 = what the OS reports available
    auto_layers: bool = False  # --layers auto: span chosen at start (shard_worker/placement.py); span is a placeholder
    rebalance_interval_s: float = 10.0  # --layers auto: coverage check period and least time between moves
    max_batch_size: int = 1  # dynamic batching: sequences in one forward (1 = off, bit-exact)
    max_queue_delay_us: int = 0  # dynamic batching: how long a request may wait for batch-mates
    prefix_cache: bool = True  # --no-prefix-cache turns automatic prefix caching off
    prefix_block_tokens: int = 16  # --prefix-block-tokens
    tracing: TracingSettings = field(default_factory=TracingSettings)  # --trace-sample-ratio, --otlp-endpoint

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> WorkerConfig:
        env = os.environ if env is None else env
        split_host_port(args.listen, what="--listen")
        if args.advertise:
            split_host_port(args.advertise, what="--advertise")
        for name in ("max_inflight", "max_tensor_mb", "grace_s", "cache_budget_mb", "session_ttl_s", "max_batch_tokens"):
            _positive("--" + name.replace("_", "-"), getattr(args, name))
        consul = None
        if not args.no_consul_register and (args.consul or env.get("CONSUL_HTTP_ADDR")):
            consul = ConsulRegistration(
                agent=parse_consul_address(args.consul, env),
                service=args.consul_service,
                check=args.consul_check,
                tags=tuple(args.consul_tag),
            )
        auto_layers = args.layers.strip() == "auto"
        if auto_layers and consul is None:
            raise ConfigError("--layers auto needs Consul (--consul or $CONSUL_HTTP_ADDR) to see the other workers; "
                              "for a local mesh use `shardmesh up` with layers: auto, or `shardmesh plan`")
        if auto_layers:
            _positive("--rebalance-interval-s", getattr(args, "rebalance_interval_s", 10.0))
        return cls(
            model=args.model,
            span=LayerSpan(0, 1) if auto_layers else LayerSpan.parse(args.layers),
            capacity_speed=_non_negative("--capacity", getattr(args, "capacity", 0.0)),
            capacity_memory_bytes=int(_non_negative("--capacity-memory-mb", getattr(args, "capacity_memory_mb", 0.0)) * MIB),
            auto_layers=auto_layers,
            rebalance_interval_s=getattr(args, "rebalance_interval_s", 10.0),
            listen=args.listen,
            advertise=args.advertise,
            worker_id=args.worker_id,
            max_inflight=args.max_inflight,
            max_tensor_bytes=args.max_tensor_mb * MIB,
            grace_s=args.grace_s,
            threads=args.threads,
            wire_dtype=args.wire_dtype,
            use_shm=not args.no_shm,
            cache_budget_bytes=args.cache_budget_mb * MIB,
            session_ttl_s=args.session_ttl_s,
            no_batching=args.no_batching,
            prefix_cache=not getattr(args, "no_prefix_cache", False),
            prefix_block_tokens=_positive_int("--prefix-block-tokens", getattr(args, "prefix_block_tokens", 16)),
            consul=consul,
            tls=TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca),
            metrics_listen=args.metrics_listen,
            log_level=args.log_level,
            log_format=getattr(args, "log_format", "text"),
            health_listen=args.health_listen,
            max_batch_tokens=args.max_batch_tokens,
            mesh_key_file=getattr(args, "mesh_key_file", None),
            max_batch_size=_positive_int("--max-batch-size", getattr(args, "max_batch_size", 1)),
            max_queue_delay_us=int(_non_negative("--max-queue-delay-us", getattr(args, "max_queue_delay_us", 0))),
            tracing=TracingSettings.from_args(args, env),
        )

    def resolved_worker_id(self, bound_address: str) -> str:
        """A stable, readable id: host-port-layers unless --worker-id is given."""
        if self.worker_id:
            return self.worker_id
        host, port = split_host_port(bound_address)
        name = socket.gethostname() if host in ("127.0.0.1", "localhost", "::1") else host
        if self.auto_layers:  # its range may change: the id must not
            return f"{name}-{port}-auto"
        return f"{name}-{port}-L{self.span.start}-{self.span.end}"


def parse_tenant_weights(spec: str) -> dict[str, float]:
    """``a=3,b=1`` (or a file's text: one ``TENANT=WEIGHT`` per line, ``#`` comments) -> weights."""
    weights: dict[str, float] = {}
    for item in re.split(r"[,\n]", spec):
        item = item.split("#", 1)[0].strip()
        if not item:
            continue
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--tenant-weights: {item!r} is not TENANT=WEIGHT (e.g. a=3,b=1)")
        try:
            weight = float(raw)
        except ValueError:
            raise ConfigError(f"--tenant-weights: weight of {name!r} is {raw.strip()!r}, not a number") from None
        if not 0 < weight < float("inf"):
            raise ConfigError(f"--tenant-weights: weight of {name!r} must be a positive number, got {raw.strip()}")
        if name in weights:
            raise ConfigError(f"--tenant-weights: tenant {name!r} is named twice")
        weights[name] = weight
    return weights


@dataclass(frozen=True)
class RouterSchedule:
    """The router's scheduling flags (router/scheduling, docs/scheduling.md)."""

    schedule: str = "fcfs"  # fcfs | priority | mlfq | fair
    max_concurrency: int = 0  # 0 = automatic (router/core.py auto_concurrency)
    priority_levels: int = 3
    default_priority: int = 2
    queue_size: int = 128
    queue_timeout_s: float = 0.0  # 0 = up to the request's deadline
    deadline_admission: bool = True
    tenant_weights: tuple[tuple[str, float], ...] = ()
    mlfq_quantum: int = 8
    mlfq_levels: int = 4
    mlfq_boost_s: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RouterSchedule:
        if not hasattr(args, "schedule"):
            return cls()
        for name in ("priority_levels", "queue_size", "mlfq_quantum", "mlfq_levels"):
            _positive("--" + name.replace("_", "-"), getattr(args, name))
        for name in ("max_concurrency", "queue_timeout_ms", "mlfq_boost_ms"):
            _non_negative("--" + name.replace("_", "-"), getattr(args, name))
        if not 1 <= args.default_priority <= args.priority_levels:
            raise ConfigError(
                f"--default-priority {args.default_priority} must be within 1 .. --priority-levels {args.priority_levels}"
            )
        spec = args.tenant_weights or ""
        if spec and "=" not in spec:  # a file
            try:
                with open(spec, encoding="utf-8") as f:
                    spec = f.read()
            except OSError as exc:
                raise ConfigError(f"--tenant-weights: cannot read {args.tenant_weights}: {exc.strerror}") from None
        return cls(
            schedule=args.schedule,
            max_concurrency=args.max_concurrency,
            priority_levels=args.priority_levels,
            default_priority=args.default_priority,
            queue_size=args.queue_size,
            queue_timeout_s=args.queue_timeout_ms / 1000.0,
            deadline_admission=not args.no_deadline_admission,
            tenant_weights=tuple(parse_tenant_weights(spec).items()),
            mlfq_quantum=args.mlfq_quantum,
            mlfq_levels=args.mlfq_levels,
            mlfq_boost_s=args.mlfq_boost_ms / 1000.0,
        )


@dataclass(frozen=True)
class RouterConfig:
    listen: str
    discovery: str  # "static://a,b" or "consul://..."
    mode: str  # "direct" | "relay"
    model: str | None
    request_timeout_s: float
    hop_timeout_s: float
    max_attempts: int
    retry_budget: float
    hedge_after_s: float
    hedge_fixed: bool
    eject_after_failures: int
    eject_base_s: float
    max_inflight: int
    max_tensor_bytes: int
    wire_dtype: str
    use_shm: bool
    grace_s: float
    tls: TlsFiles
    metrics_listen: str | None
    log_level: str
    health_listen: str | None = None
    log_format: str = "text"  # --log-format: text | json (services/logging_json.py)
    env: Mapping[str, str] = field(default_factory=dict)
    auth_tokens_file: str | None = None  # bearer token -> tenant (services/security/tokens.py)
    rate_limit_rps: float = 0.0  # per tenant; 0 = no limit
    max_text_bytes: int = 1024 * 1024
    mesh_key_file: str | None = None  # --mesh-key-file or $SHARDMESH_MESH_KEY_FILE (services/security/mesh_key.py)
    balancer: str = "p2c"  # --balancer (router/planning/balancers.py)
    result_cache_bytes: int = 0  # --cache-mb; 0 = no Infer result cache (router/result_cache.py)
    scheduling: RouterSchedule = field(default_factory=RouterSchedule)  # --schedule and its group
    tracing: TracingSettings = field(default_factory=TracingSettings)  # --trace-sample-ratio, --otlp-endpoint
    route_wait_s: float = 10.0  # --route-wait-s (router/planning/route_wait.py); 0 = no wait for coverage
    coalesce: int = 0  # --coalesce: most Infer requests sent as one batch (router/coalescing.py); 0 = off
    coalesce_depth: int = 0  # --coalesce-depth: groups in flight before requests wait to coalesce; 0 = auto

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> RouterConfig:
        env = dict(os.environ if env is None else env)
        split_host_port(args.listen, what="--listen")
        for name in ("request_timeout_s", "hop_timeout_ms", "max_attempts", "max_inflight", "max_tensor_mb", "grace_s",
                     "eject_after_failures", "eject_base_s"):
            _positive("--" + name.replace("_", "-"), getattr(args, name))
        discovery = args.discovery or f"static://{args.workers}"
        return cls(
            listen=args.listen,
            discovery=discovery,
            mode=args.mode,
            model=args.model,
            request_timeout_s=args.request_timeout_s,
            hop_timeout_s=args.hop_timeout_ms / 1000.0,
            max_attempts=args.max_attempts,
            retry_budget=args.retry_budget,
            hedge_after_s=args.hedge_after_ms / 1000.0,
            hedge_fixed=getattr(args, "hedge_delay", "p95") == "fixed",
            eject_after_failures=args.eject_after_failures,
            eject_base_s=args.eject_base_s,
            max_inflight=args.max_inflight,
            max_tensor_bytes=args.max_tensor_mb * MIB,
            wire_dtype=args.wire_dtype,
            use_shm=not args.no_shm,
            grace_s=args.grace_s,
            tls=TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca),
            metrics_listen=args.metrics_listen,
            log_level=args.log_level,
            log_format=getattr(args, "log_format", "text"),
            health_listen=args.health_listen,
            env=env,
            auth_tokens_file=args.auth_tokens_file,
            rate_limit_rps=_non_negative("--rate-limit-rps", args.rate_limit_rps),
            max_text_bytes=_positive_int("--max-text-bytes", args.max_text_bytes),
            mesh_key_file=getattr(args, "mesh_key_file", None),
            balancer=getattr(args, "balancer", "p2c"),
            result_cache_bytes=int(_non_negative("--cache-mb", getattr(args, "cache_mb", 0.0)) * MIB),
            scheduling=RouterSchedule.from_args(args),
            tracing=TracingSettings.from_args(args, env),
            route_wait_s=_non_negative("--route-wait-s", getattr(args, "route_wait_s", 10.0)),
            coalesce=_coalesce_rows(getattr(args, "coalesce", 0)),
            coalesce_depth=int(_non_negative("--coalesce-depth", getattr(args, "coalesce_depth", 0))),
        )
