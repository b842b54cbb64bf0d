"""Typed, frozen configuration objects, built once in main() from flags and an injected environment."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.discovery.consul_client import ConsulAddress, parse_consul_address
from services.errors import ConfigError
from services.layers import LayerSpan
from services.net import TlsFiles, split_host_port

MIB = 1024 * 1024


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def _non_negative(name: str, value: float) -> float:
    if value < 0:
        raise ConfigError(f"{name} must be 0 (off) or positive, got {value}")
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
    max_batch_tokens: int = 32768  # batch x tokens of one request; larger is refused before compute
    mesh_key_file: str | None = None  # --mesh-key-file or $SHARDMESH_MESH_KEY_FILE (services/security/mesh_key.py)

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
        return cls(
            model=args.model,
            span=LayerSpan.parse(args.layers),
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
            consul=consul,
            tls=TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca),
            metrics_listen=args.metrics_listen,
            log_level=args.log_level,
            health_listen=args.health_listen,
            max_batch_tokens=args.max_batch_tokens,
            mesh_key_file=getattr(args, "mesh_key_file", None),
        )

    def resolved_worker_id(self, bound_address: str) -> str:
        """A stable, readable id: host-port-layers unless --worker-id is given."""
        if self.worker_id:
            return self.worker_id
        host, port = split_host_port(bound_address)
        name = socket.gethostname() if host in ("127.0.0.1", "localhost", "::1") else host
        return f"{name}-{port}-L{self.span.start}-{self.span.end}"


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
    env: Mapping[str, str] = field(default_factory=dict)
    auth_tokens_file: str | None = None  # bearer token -> tenant (services/security/tokens.py)
    rate_limit_rps: float = 0.0  # per tenant; 0 = no limit
    max_text_bytes: int = 1024 * 1024
    mesh_key_file: str | None = None  # --mesh-key-file or $SHARDMESH_MESH_KEY_FILE (services/security/mesh_key.py)

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
            health_listen=args.health_listen,
            env=env,
            auth_tokens_file=args.auth_tokens_file,
            rate_limit_rps=_non_negative("--rate-limit-rps", args.rate_limit_rps),
            max_text_bytes=_positive_int("--max-text-bytes", args.max_text_bytes),
            mesh_key_file=getattr(args, "mesh_key_file", None),
        )
