"""Who may call a worker's mesh methods (Forward, ForwardStream, CloseSession).

Routers and workers started with the same ``--mesh-key-file`` send a mesh token derived from the key
with every call to a worker; workers check it. The key itself never travels: the token is an HMAC of a
fixed label, so one leaked token does not reveal the key that also signs relay routes.

Policy, in order (see docs/security.md):
1. a mesh key is configured: the call must carry the mesh token;
2. no mesh key, mutual TLS on: the TLS handshake proved a certificate of the mesh's CA;
3. neither: only loopback peers (a local mesh; any remote caller is refused).
Describe, health and reflection stay open for probes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import urllib.parse

import grpc

from services.errors import PermissionDenied, Unauthenticated
from services.security.guard import GuardInterceptor

MESH_TOKEN_HEADER = "x-shardmesh-mesh-token"
_MESH_TOKEN_LABEL = b"shardmesh-mesh-token-v1"
WORKER_SERVICE = "shardmesh.v1.ShardWorker"
OPEN_WORKER_METHODS = frozenset({"Describe"})


def mesh_token(mesh_key: bytes) -> str:
    return hmac.new(mesh_key, _MESH_TOKEN_LABEL, hashlib.sha256).hexdigest()


def mesh_call_metadata(mesh_key: bytes | None) -> tuple[tuple[str, str], ...]:
    """Metadata a mesh member sends on every call to a worker (none without a mesh key)."""
    return () if mesh_key is None else ((MESH_TOKEN_HEADER, mesh_token(mesh_key)),)


def is_loopback_peer(peer: str) -> bool:
    """``context.peer()`` forms: ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000`` (or ``%5B::1%5D``), ``unix:/path``."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")  # gRPC may percent-encode the brackets
    if kind == "unix":
        return True
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
    else:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item[0] == key:
            value = item[1]
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


def has_verified_certificate(context: grpc.aio.ServicerContext) -> bool:
    auth = context.auth_context()
    return bool(auth.get("x509_common_name") or auth.get("x509_subject_alternative_name") or auth.get("x509_pem_cert"))


class MeshAuthInterceptor(GuardInterceptor):
    """A worker's server interceptor: mesh methods only for members of this mesh."""

    def __init__(self, mesh_key: bytes | None, mutual_tls: bool) -> None:
        self._token = mesh_token(mesh_key).encode() if mesh_key is not None else None
        self._mutual_tls = mutual_tls

    def guards(self, service: str, method: str) -> bool:
        return service == WORKER_SERVICE and method not in OPEN_WORKER_METHODS

    async def check(self, context: grpc.aio.ServicerContext, method: str) -> None:
        what = f"ShardWorker/{method} is only for the router and workers of this mesh"
        if self._token is not None:
            sent = metadata_value(context, MESH_TOKEN_HEADER)
            if sent is None:
                raise Unauthenticated(
                    f"{what}: the call carries no mesh token ({MESH_TOKEN_HEADER}); mesh members send it when "
                    "started with the same --mesh-key-file as this worker"
                )
            if not hmac.compare_digest(sent.encode(), self._token):
                raise Unauthenticated(
                    f"{what}: the mesh token does not match this worker's mesh key; give every router and worker "
                    "of the mesh the same --mesh-key-file"
                )
            return
        if self._mutual_tls and has_verified_certificate(context):
            return
        peer = context.peer()
        if not is_loopback_peer(peer):
            raise PermissionDenied(
                f"{what}: this worker has no --mesh-key-file, so it accepts mesh calls only from loopback, "
                f"not from {peer}; start the router and every worker with the same --mesh-key-file"
            )


mesh_metadata = mesh_call_metadata  # the name some callers use
