"""Pure parts of caller identity and limits: token file, rate buckets, peers, mesh tokens, input bounds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from router.inputs import check_text_size, check_token_count
from services.errors import ConfigError, InvalidArgument
from services.localmesh.security import MeshKeyDir, security_line
from services.security.client_auth import TokenFileWatcher, bearer_token
from services.security.mesh_auth import is_loopback_peer, mesh_call_metadata, mesh_token
from services.security.ratelimit import TenantRateLimiter
from services.security.tokens import parse_token_file

METHODS = ("Infer", "InferStream", "Generate", "Topology")
TOKEN_A = "a" * 32
TOKEN_B = "b" * 32


def _parse(data: object):  # type: ignore[no-untyped-def]
    return parse_token_file(data, source="tokens.yaml", known_methods=METHODS)


def test_token_file_maps_tokens_to_tenants_with_policies() -> None:
    table = _parse({
        "tokens": {TOKEN_A: "team-a", TOKEN_B: "team-b"},
        "tenants": {"team-b": {"rate_limit_rps": 5, "burst": 2, "methods": ["Infer"]}},
    })
    assert table.tenant_of(TOKEN_A) == "team-a" and table.tenant_of(TOKEN_B) == "team-b"
    assert table.tenant_of("c" * 32) is None
    assert table.policy("team-a").allows("Generate")
    b = table.policy("team-b")
    assert (b.rate_limit_rps, b.burst) == (5.0, 2.0)
    assert b.allows("Infer") and not b.allows("Generate")
    assert TOKEN_A.encode() not in repr(table).encode()  # only digests are kept


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([], "expected a mapping"),
        ({"tokens": {TOKEN_A: "a"}, "tennants": {}}, "unknown key(s) tennants"),
        ({"tokens": {}}, "tokens must be a non-empty mapping"),
        ({"tokens": {"short": "a"}}, "at least 16 characters"),
        ({"tokens": {TOKEN_A: ""}}, "non-empty name"),
        ({"tokens": {TOKEN_A: "a"}, "tenants": {"a": {"rate": 1}}}, "tenants.a: unknown key(s) rate"),
        ({"tokens": {TOKEN_A: "a"}, "tenants": {"a": {"rate_limit_rps": -1}}}, "tenants.a.rate_limit_rps: expected a number >= 0"),
        ({"tokens": {TOKEN_A: "a"}, "tenants": {"a": {"methods": ["Infr"]}}}, "unknown method(s) Infr"),
    ],
)
def test_token_file_errors_name_the_key(data: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(data)
    assert fragment in str(info.value) and "tokens.yaml" in str(info.value)


def test_token_file_watcher_reloads_on_change_and_keeps_the_old_table_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  {TOKEN_A}: team-a\n")
    now = [0.0]
    watcher = TokenFileWatcher(path, METHODS, clock=lambda: now[0])
    assert watcher.table().tenant_of(TOKEN_A) == "team-a"
    path.write_text(f"tokens:\n  {TOKEN_B}: team-b\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert watcher.table().tenant_of(TOKEN_B) is None  # not polled yet
    now[0] = 1.5
    assert watcher.table().tenant_of(TOKEN_B) == "team-b" and watcher.table().tenant_of(TOKEN_A) is None
    path.write_text("tokens: [not, a, mapping")
    now[0] = 3.0
    assert watcher.table().tenant_of(TOKEN_B) == "team-b"


def test_rate_limiter_is_a_token_bucket_per_tenant() -> None:
    limiter = TenantRateLimiter()
    assert [limiter.allow("a", 2, None, 0.0) for _ in range(3)] == [True, True, False]  # burst = 1 s worth
    assert limiter.allow("b", 2, None, 0.0)  # another tenant has its own bucket
    assert not limiter.allow("a", 2, None, 0.4)
    assert limiter.allow("a", 2, None, 0.5)  # refilled at 2/s
    assert all(limiter.allow("c", 0, None, 0.0) for _ in range(100))  # 0 = off


def test_bearer_header_parsing() -> None:
    assert bearer_token(None) is None
    assert bearer_token(f"Bearer {TOKEN_A}") == TOKEN_A and bearer_token(f"bearer  {TOKEN_A} ") == TOKEN_A
    assert bearer_token("Basic abc") == "" and bearer_token("Bearer") == ""


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.9.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:%5B::1%5D:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/tmp/sock", True),
        ("ipv4:10.0.0.7:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv6:[::ffff:10.0.0.1]:5000", False),
        ("garbage", False),
    ],
)
def test_loopback_peers(peer: str, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


def test_mesh_token_depends_on_the_key_and_hides_it() -> None:
    key = bytes(range(32))
    assert mesh_token(key) == mesh_token(bytes(range(32))) != mesh_token(bytes(32))
    assert key.hex() not in mesh_token(key)
    assert mesh_call_metadata(None) == () and mesh_call_metadata(key)[0][1] == mesh_token(key)


def test_text_and_token_bounds_name_their_limits() -> None:
    check_text_size("x" * 100, 100)
    with pytest.raises(InvalidArgument, match=r"text: 101 bytes exceed the router's limit of 100 bytes \(--max-text-bytes\)"):
        check_text_size("x" * 101, 100)
    with pytest.raises(InvalidArgument, match="text: 102 bytes"):
        check_text_size("é" * 51, 100)  # counted in UTF-8 bytes, not characters
    check_token_count(512, 512, 1 << 20, "tokens")
    with pytest.raises(InvalidArgument, match=r"tokens: 513 tokens exceed the model's maximum of 512 \(max_position_embeddings\)"):
        check_token_count(513, 512, 1 << 20, "tokens")
    with pytest.raises(InvalidArgument, match=r"limit of 131072 \(--max-tensor-mb 1 of int64 ids\)"):
        check_token_count(200_000, None, 1 << 20, "tokens")


def test_local_mesh_key_is_private_and_the_security_line_says_what_is_exposed() -> None:
    keys = MeshKeyDir()
    try:
        assert keys.directory.stat().st_mode & 0o777 == 0o700
        assert keys.path.stat().st_mode & 0o777 == 0o600
        assert len(bytes.fromhex(keys.path.read_text().strip())) == 32
        line = security_line(["127.0.0.1:0", "localhost:5"], False, keys.path)
        assert line == f"security: plaintext on loopback, mesh key {keys.path}"
        assert "WARNING plaintext on non-loopback 0.0.0.0:50050" in security_line(["0.0.0.0:50050"], False, keys.path)
    finally:
        keys.remove()
    assert not keys.directory.exists()
