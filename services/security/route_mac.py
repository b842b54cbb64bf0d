"""Relay routes are the router's word: an HMAC-SHA256 over the route, keyed with the mesh key.

Without it a worker dials whatever ``ForwardRequest.downstream`` names (SSRF; issue 15). The router
signs every suffix of the route it planned, so each worker can check its own remaining part:
``route_mac`` is one 32-byte MAC per relaying hop, the first for the receiver. MAC ``j`` covers the
request id, the expiry, the layers of the hop that relays (hop ``j``) and every hop after it
(worker id, address, layer range). A worker verifies the first MAC and passes the rest downstream,
so a route can only be shortened from the front, exactly as relaying does, never changed.

Pure: no I/O; the clock comes in as ``now_ms`` (tests) or ``time.time()``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections.abc import Sequence

from services.errors import PermissionDenied
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2

MAC_BYTES = 32
_LABEL = b"shardmesh-route-v1"


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<I", len(data)) + data


def _message(request_id: str, expires_ms: int, relaying: tensor_pb2.LayerRange, rest: Sequence[tensor_pb2.RouteHop]) -> bytes:
    parts = [_LABEL, _text(request_id), struct.pack("<QII", expires_ms, relaying.start, relaying.end), struct.pack("<I", len(rest))]
    for hop in rest:
        parts += [_text(hop.worker_id), _text(hop.address), struct.pack("<II", hop.layers.start, hop.layers.end)]
    return b"".join(parts)


def sign_route(key: bytes, request_id: str, hops: Sequence[tensor_pb2.RouteHop], expires_ms: int) -> bytes:
    """MACs for a request sent to ``hops[0]`` with ``downstream = hops[1:]``: one per relaying hop (b"" for one hop)."""
    return b"".join(
        hmac.new(key, _message(request_id, expires_ms, hops[j].layers, hops[j + 1 :]), hashlib.sha256).digest()
        for j in range(len(hops) - 1)
    )


def verify_route(key: bytes, request: worker_pb2.ForwardRequest, now_ms: int | None = None) -> None:
    """Raises PermissionDenied unless the router signed ``request.downstream`` for this request and hop."""
    if not request.downstream:
        return
    nxt = request.downstream[0]
    target = f"{nxt.worker_id} ({nxt.address})"
    if not request.route_mac:
        raise PermissionDenied(
            f"relay to {target} refused: the route is not signed; this worker relays only along routes signed by a"
            " router started with the same --mesh-key-file"
        )
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if request.route_expires_ms <= now_ms:
        raise PermissionDenied(
            f"relay to {target} refused: the route signature expired {now_ms - request.route_expires_ms} ms ago;"
            " the request is stale (or the router's and worker's clocks disagree)"
        )
    expected = hmac.new(
        key, _message(request.request_id, request.route_expires_ms, request.layers, request.downstream), hashlib.sha256
    ).digest()
    if len(request.route_mac) != MAC_BYTES * len(request.downstream) or not hmac.compare_digest(
        expected, request.route_mac[:MAC_BYTES]
    ):
        raise PermissionDenied(
            f"relay to {target} refused: the route signature does not match this request's route; only the router"
            " (with this mesh's --mesh-key-file) chooses relay routes"
        )


def downstream_mac(request: worker_pb2.ForwardRequest) -> bytes:
    """What the next hop gets: the signatures of the rest of the route (the first one was this hop's)."""
    return request.route_mac[MAC_BYTES:]
