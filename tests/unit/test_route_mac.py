"""Route signatures (services/security/route_mac.py) and the mesh key loader (services/security/mesh_key.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.errors import ConfigError, PermissionDenied
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2
from services.security.mesh_key import load_mesh_key
from services.security.route_mac import MAC_BYTES, downstream_mac, sign_route, verify_route

KEY = bytes(range(32))
NOW = 1_700_000_000_000


def _hop(i: int, start: int, end: int) -> tensor_pb2.RouteHop:
    return tensor_pb2.RouteHop(worker_id=f"w{i}", address=f"127.0.0.1:{5000 + i}", layers=tensor_pb2.LayerRange(start=start, end=end))


ROUTE = [_hop(0, 0, 2), _hop(1, 2, 4), _hop(2, 4, 6)]


def _request_at(j: int, mac: bytes, expires: int = NOW + 5000, request_id: str = "r1") -> worker_pb2.ForwardRequest:
    """The request hop ``j`` receives when relaying follows ROUTE (each hop strips its own MAC)."""
    req = worker_pb2.ForwardRequest(request_id=request_id, layers=ROUTE[j].layers, route_expires_ms=expires)
    req.downstream.extend(ROUTE[j + 1 :])
    req.route_mac = mac
    return req


def test_every_relaying_hop_verifies_its_suffix() -> None:
    mac = sign_route(KEY, "r1", ROUTE, NOW + 5000)
    assert len(mac) == MAC_BYTES * 2
    first = _request_at(0, mac)
    verify_route(KEY, first, now_ms=NOW)
    second = _request_at(1, downstream_mac(first))
    verify_route(KEY, second, now_ms=NOW)
    assert sign_route(KEY, "r1", ROUTE[:1], NOW) == b""  # direct: nothing to sign


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: r.downstream[0].__setattr__("address", "10.1.2.3:22"),  # SSRF: another address
        lambda r: r.downstream[0].__setattr__("worker_id", "evil"),
        lambda r: r.downstream[1].layers.__setattr__("end", 5),
        lambda r: r.downstream.add(worker_id="extra", address="127.0.0.1:1"),
        lambda r: r.__setattr__("request_id", "r2"),  # replay for another request
        lambda r: r.__setattr__("route_expires_ms", NOW + 999_999),  # extended expiry
        lambda r: r.layers.__setattr__("start", 1),
        lambda r: r.__setattr__("route_mac", r.route_mac[:MAC_BYTES]),
    ],
)
def test_forged_routes_are_denied(tamper) -> None:  # type: ignore[no-untyped-def]
    req = _request_at(0, sign_route(KEY, "r1", ROUTE, NOW + 5000))
    tamper(req)
    with pytest.raises(PermissionDenied, match="route signature does not match"):
        verify_route(KEY, req, now_ms=NOW)


def test_unsigned_expired_and_wrong_key_are_denied() -> None:
    with pytest.raises(PermissionDenied, match="the route is not signed"):
        verify_route(KEY, _request_at(0, b""), now_ms=NOW)
    with pytest.raises(PermissionDenied, match="expired 1 ms ago"):
        verify_route(KEY, _request_at(0, sign_route(KEY, "r1", ROUTE, NOW - 1), expires=NOW - 1), now_ms=NOW)
    with pytest.raises(PermissionDenied, match="does not match"):
        verify_route(bytes(32), _request_at(0, sign_route(KEY, "r1", ROUTE, NOW + 5000)), now_ms=NOW)
    verify_route(KEY, worker_pb2.ForwardRequest(request_id="direct"), now_ms=NOW)  # no downstream: nothing to check


def test_mesh_key_file_hex_raw_and_env(tmp_path: Path) -> None:
    hex_file = tmp_path / "hex.key"
    hex_file.write_text(KEY.hex() + "\n")
    raw_file = tmp_path / "raw.key"
    raw_file.write_bytes(b" \n" + bytes(range(40)))  # raw bytes are kept as they are, whitespace included
    assert load_mesh_key(str(hex_file), {}) == KEY
    assert load_mesh_key(str(raw_file), {}) == b" \n" + bytes(range(40))
    assert load_mesh_key(None, {"SHARDMESH_MESH_KEY_FILE": str(hex_file)}) == KEY
    assert load_mesh_key(str(raw_file), {"SHARDMESH_MESH_KEY_FILE": str(hex_file)}) != KEY  # the flag wins
    assert load_mesh_key(None, {}) is None


def test_mesh_key_errors_say_what_to_fix(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text("abcd")
    with pytest.raises(ConfigError, match=r"--mesh-key-file .*short.key holds a 2-byte key; use at least 32"):
        load_mesh_key(str(short), {})
    with pytest.raises(ConfigError, match=r"\$SHARDMESH_MESH_KEY_FILE .*missing.key does not exist"):
        load_mesh_key(None, {"SHARDMESH_MESH_KEY_FILE": str(tmp_path / "missing.key")})
    with pytest.raises(ConfigError, match="is a directory|not a regular file"):
        load_mesh_key(str(tmp_path), {})
    if os.geteuid() != 0:  # root reads anything
        unreadable = tmp_path / "unreadable.key"
        unreadable.write_bytes(os.urandom(32))
        unreadable.chmod(0)
        with pytest.raises(ConfigError, match="not readable"):
            load_mesh_key(str(unreadable), {})


def test_mesh_key_warns_only_when_other_users_can_read_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Kubernetes mounts Secrets 0440 under an fsGroup: group read is expected, world read is a leak."""
    key = tmp_path / "mesh.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o440)
    with caplog.at_level("WARNING"):
        load_mesh_key(str(key), {})
    assert not caplog.records
    key.chmod(0o444)
    with caplog.at_level("WARNING"):
        load_mesh_key(str(key), {})
    assert any("every user" in r.getMessage() for r in caplog.records)
