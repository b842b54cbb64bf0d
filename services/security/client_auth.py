"""The router's caller identity: bearer tokens and/or mTLS certificates, per-tenant method lists and
rate limits, as one grpc.aio server interceptor. Health and reflection stay open.

Missing or unknown credentials -> UNAUTHENTICATED; a known tenant calling a method it may not ->
PERMISSION_DENIED; a tenant over its rate -> RESOURCE_EXHAUSTED naming the tenant and the limit.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.errors import ConfigError, PermissionDenied, ResourceExhausted, Unauthenticated
from services.security.guard import GuardInterceptor
from services.security.mesh_auth import metadata_value
from services.security.ratelimit import TenantRateLimiter
from services.security.tokens import TenantPolicy, TokenTable, load_token_file

log = logging.getLogger(__name__)

OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
AUTHORIZATION_HEADER = "authorization"
ANONYMOUS = "anonymous"  # the one tenant of a router without authentication (shares one rate bucket)
RELOAD_POLL_S = 1.0

CURRENT_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("shardmesh_tenant", default=ANONYMOUS)


class TokenFileWatcher:
    """The tokens file, reloaded when it changes (mtime, inode or size; checked at most once a second).

    A Kubernetes Secret update swaps a symlink, which changes the inode. A reload that fails keeps the
    previous table and logs why, so a half-written file never locks every client out.
    """

    def __init__(self, path: Path, known_methods: Collection[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._known = known_methods
        self._clock = clock
        self._stamp = self._stat()
        self._table = load_token_file(path, known_methods)
        self._checked = clock()

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise ConfigError(f"--auth-tokens-file {self.path}: cannot read: {exc.strerror}") from None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def table(self) -> TokenTable:
        now = self._clock()
        if now - self._checked >= RELOAD_POLL_S:
            self._checked = now
            self._reload_if_changed()
        return self._table

    def _reload_if_changed(self) -> None:
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return
            table = load_token_file(self.path, self._known)
        except ConfigError as exc:
            log.error("keeping the previous client tokens: %s", exc)
            return
        self._stamp, self._table = stamp, table
        log.info("reloaded %s: %d tokens", self.path, len(table))


@dataclass(frozen=True)
class ClientAuthSettings:
    tokens: TokenFileWatcher | None  # --auth-tokens-file
    mutual_tls: bool  # the router verifies client certificates (--tls-ca with --tls-cert/--tls-key)
    default_rate_rps: float  # --rate-limit-rps; 0 = no limit

    @property
    def authenticates(self) -> bool:
        return self.tokens is not None or self.mutual_tls


def bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def certificate_tenant(context: grpc.aio.ServicerContext) -> str | None:
    names = context.auth_context().get("x509_common_name")
    return names[0].decode(errors="replace") if names else None


class ClientAuthInterceptor(GuardInterceptor):
    def __init__(self, settings: ClientAuthSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._limiter = TenantRateLimiter()
        self._clock = clock

    def guards(self, service: str, method: str) -> bool:
        return service not in OPEN_SERVICES

    async def check(self, context: grpc.aio.ServicerContext, method: str) -> None:
        CURRENT_TENANT.set(self.admit(context, method))

    def _table(self) -> TokenTable | None:
        return self._settings.tokens.table() if self._settings.tokens is not None else None

    def authenticate(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant; raises Unauthenticated."""
        table = self._table()
        header = metadata_value(context, AUTHORIZATION_HEADER)
        token = bearer_token(header)
        if token == "":
            raise Unauthenticated("authorization metadata must be 'Bearer TOKEN'")
        if token is not None and table is not None:
            tenant = table.tenant_of(token)
            if tenant is None:
                raise Unauthenticated(
                    "unknown bearer token: it is not in this router's --auth-tokens-file (check --token or $SHARDMESH_TOKEN)"
                )
            return tenant
        if self._settings.mutual_tls:
            tenant = certificate_tenant(context)
            if tenant:
                return tenant
        if self._settings.authenticates:
            raise Unauthenticated(
                "this router requires a bearer token: send metadata 'authorization: Bearer TOKEN' "
                "(shardmesh infer/generate --token, or $SHARDMESH_TOKEN)"
            )
        return ANONYMOUS

    def policy(self, tenant: str) -> TenantPolicy:
        table = self._table()
        return table.policy(tenant) if table is not None else TenantPolicy(tenant)

    def admit(self, context: grpc.aio.ServicerContext, method: str) -> str:
        """Authenticates, authorises ``method`` and charges one request to the tenant's rate."""
        tenant = self.authenticate(context)
        policy = self.policy(tenant)
        if not policy.allows(method):
            allowed = ", ".join(sorted(policy.methods or ())) or "none"
            raise PermissionDenied(
                f"tenant {tenant!r} may not call {method} (allowed: {allowed}; see tenants.{tenant}.methods in the "
                "router's --auth-tokens-file)"
            )
        self.charge(tenant, policy)
        return tenant

    def charge(self, tenant: str, policy: TenantPolicy | None = None) -> None:
        """One request against the tenant's rate; also called per request on an InferStream."""
        policy = policy or self.policy(tenant)
        rate = policy.rate_limit_rps if policy.rate_limit_rps is not None else self._settings.default_rate_rps
        if not self._limiter.allow(tenant, rate, policy.burst, self._clock()):
            source = f"tenants.{tenant}.rate_limit_rps" if policy.rate_limit_rps is not None else "--rate-limit-rps"
            raise ResourceExhausted(
                f"tenant {tenant!r} is over its rate limit of {rate:g} requests/s ({source}); retry later"
            )


def build_client_auth(
    tokens_file: str | None, mutual_tls: bool, default_rate_rps: float, known_methods: Collection[str]
) -> ClientAuthInterceptor | None:
    """The router's interceptor, or None when there is nothing to check (no tokens, no mTLS, no rate limit)."""
    tokens = TokenFileWatcher(Path(tokens_file), known_methods) if tokens_file else None
    settings = ClientAuthSettings(tokens, mutual_tls, default_rate_rps)
    if not settings.authenticates and default_rate_rps <= 0:
        return None
    log.info(
        "client authentication: %s%s; rate limit %s",
        f"bearer tokens from {tokens_file}" if tokens else "no bearer tokens",
        ", mTLS certificate CN as tenant" if mutual_tls else "",
        f"{default_rate_rps:g} requests/s per tenant" if default_rate_rps > 0 else "per tenant only",
    )
    return ClientAuthInterceptor(settings)
