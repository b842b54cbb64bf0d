"""Who is asking and how urgently: priority level and tenant of a request, from its fields and metadata.

Priority follows Triton's convention: 1 is the highest level, larger numbers are lower, 0 means the
router's default level. The message field wins over the ``x-shardmesh-priority`` metadata when both
are set (the field is the more specific statement; metadata serves clients that cannot change
messages). An authenticated tenant (client auth) wins over ``x-shardmesh-tenant`` metadata, so a
caller cannot claim another tenant's fair share.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from services.errors import InvalidArgument

PRIORITY_METADATA = "x-shardmesh-priority"
TENANT_METADATA = "x-shardmesh-tenant"
DEFAULT_TENANT = "default"
MAX_TENANT_CHARS = 64
_TENANT_RE = re.compile(r"^[A-Za-z0-9._:@/+-]+$")


@dataclass(frozen=True)
class CallerInfo:
    """What the transport knows about a request's caller (gRPC metadata, authentication)."""

    priority_metadata: str | None = None
    tenant_metadata: str | None = None
    authenticated_tenant: str | None = None  # set only when client auth named the caller

    @classmethod
    def from_metadata(cls, metadata: object, authenticated_tenant: str | None = None) -> CallerInfo:
        """From gRPC invocation metadata (pairs of key, value); the first value of each key counts."""
        found: dict[str, str] = {}
        for key, value in metadata or ():  # type: ignore[attr-defined]
            if key in (PRIORITY_METADATA, TENANT_METADATA) and key not in found:
                found[key] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        return cls(found.get(PRIORITY_METADATA), found.get(TENANT_METADATA), authenticated_tenant)


def resolve_priority(field: int, metadata: str | None, levels: int, default_level: int) -> int:
    """The level (1..levels) a request runs at; raises InvalidArgument naming what to fix."""
    value = field
    source = "priority"
    if not value and metadata is not None and metadata.strip():
        source = f"metadata {PRIORITY_METADATA}"
        try:
            value = int(metadata.strip())
        except ValueError:
            raise InvalidArgument(f"{source}: {metadata[:32]!r} is not an integer; send 1 (highest) .. {levels}") from None
    if value == 0:
        return default_level
    if not 1 <= value <= levels:
        raise InvalidArgument(
            f"{source}: {value} is out of range; send 1 (highest) .. {levels} (lowest, router --priority-levels), "
            f"or 0 for the default level {default_level}"
        )
    return value


def resolve_tenant(authenticated: str | None, metadata: str | None) -> str:
    """The tenant fair queuing charges: the authenticated one, else the metadata's, else ``default``."""
    if authenticated:
        return authenticated
    if metadata is None or not metadata.strip():
        return DEFAULT_TENANT
    name = metadata.strip()
    if len(name) > MAX_TENANT_CHARS or not _TENANT_RE.match(name):
        raise InvalidArgument(
            f"metadata {TENANT_METADATA}: {name[:32]!r} is not a tenant name; use at most {MAX_TENANT_CHARS} "
            "letters, digits or . _ : @ / + -"
        )
    return name


def weight_of(weights: Mapping[str, float], tenant: str) -> float:
    """Tenants not named in the weights get weight 1."""
    return weights.get(tenant, 1.0)
