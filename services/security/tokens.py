"""The router's client tokens file: bearer token -> tenant, with optional per-tenant settings.

Pure parsing (no I/O here but :func:`load_token_file`). The file is what a Kubernetes Secret mounts::

    tokens:                       # bearer token -> tenant
      "6f0c1e...": team-a
      "9a7d44...": team-b
    tenants:                      # optional, per tenant (also for mTLS tenants, named by certificate CN)
      team-b: {rate_limit_rps: 5, burst: 10, methods: [Infer, InferStream]}

Tokens are kept only as SHA-256 digests, so a lookup's timing says nothing about a token's bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.errors import ConfigError

MIN_TOKEN_CHARS = 16
_TENANT_KEYS = {"rate_limit_rps", "burst", "methods"}


@dataclass(frozen=True)
class TenantPolicy:
    """What one tenant may do. ``None`` = the router's default (all methods; ``--rate-limit-rps``)."""

    name: str
    rate_limit_rps: float | None = None
    burst: float | None = None
    methods: frozenset[str] | None = None

    def allows(self, method: str) -> bool:
        return self.methods is None or method in self.methods


@dataclass(frozen=True)
class TokenTable:
    by_digest: Mapping[bytes, str] = field(default_factory=dict)  # sha256(token) -> tenant
    tenants: Mapping[str, TenantPolicy] = field(default_factory=dict)

    def tenant_of(self, token: str) -> str | None:
        return self.by_digest.get(token_digest(token))

    def policy(self, tenant: str) -> TenantPolicy:
        return self.tenants.get(tenant) or TenantPolicy(tenant)

    def __len__(self) -> int:
        return len(self.by_digest)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where}: expected a number >= 0, got {value!r}")
    return float(value)


def _tenant_policy(name: str, raw: Any, where: str, known_methods: Collection[str]) -> TenantPolicy:
    if raw is None:
        return TenantPolicy(name)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping like {{rate_limit_rps: 5, methods: [Infer]}}")
    unknown = sorted(set(raw) - _TENANT_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TENANT_KEYS))}")
    methods = None
    if "methods" in raw:
        listed = raw["methods"]
        if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
            raise ConfigError(f"{where}.methods: expected a list of method names, e.g. [Infer, InferStream]")
        bad = sorted(set(listed) - set(known_methods))
        if bad:
            raise ConfigError(f"{where}.methods: unknown method(s) {', '.join(bad)}; known: {', '.join(sorted(known_methods))}")
        methods = frozenset(listed)
    return TenantPolicy(
        name,
        rate_limit_rps=_number(raw["rate_limit_rps"], f"{where}.rate_limit_rps") if "rate_limit_rps" in raw else None,
        burst=_number(raw["burst"], f"{where}.burst") if "burst" in raw else None,
        methods=methods,
    )


def parse_token_file(data: Any, *, source: str, known_methods: Collection[str]) -> TokenTable:
    """Validates the parsed YAML/JSON; every error names the key to fix."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with keys tokens (token -> tenant) and, optionally, tenants")
    unknown = sorted(set(data) - {"tokens", "tenants"})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: tenants, tokens")
    tokens = data.get("tokens")
    if not isinstance(tokens, dict) or not tokens:
        raise ConfigError(f"{source}: tokens must be a non-empty mapping of bearer token -> tenant name")
    by_digest: dict[bytes, str] = {}
    for token, tenant in tokens.items():
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"{source}: tokens: every token must be a string of at least {MIN_TOKEN_CHARS} characters "
                f"(e.g. from `openssl rand -hex 32`); one is {len(str(token))} characters"
            )
        if not isinstance(tenant, str) or not tenant:
            raise ConfigError(f"{source}: tokens: the tenant of a token must be a non-empty name, got {tenant!r}")
        by_digest[token_digest(token)] = tenant
    raw_tenants = data.get("tenants") or {}
    if not isinstance(raw_tenants, dict):
        raise ConfigError(f"{source}: tenants must be a mapping of tenant name -> settings")
    tenants = {
        str(name): _tenant_policy(str(name), raw, f"{source}: tenants.{name}", known_methods)
        for name, raw in raw_tenants.items()
    }
    return TokenTable(by_digest, tenants)


def load_token_file(path: Path, known_methods: Collection[str]) -> TokenTable:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--auth-tokens-file {path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"--auth-tokens-file {path}: not valid YAML/JSON: {exc}") from None
    return parse_token_file(data, source=f"--auth-tokens-file {path}", known_methods=known_methods)
