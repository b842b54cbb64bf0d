"""``--discovery`` URL and Consul address parsing, plus the pure helpers of the Consul backend (no sockets)."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from services.discovery.consul import (
    ConsulDiscovery,
    TokenBucket,
    endpoints_from_health,
    format_duration,
    parse_duration,
)
from services.discovery.consul_client import ConsulAddress, parse_consul_address
from services.discovery.registration import ConsulRegistrar, parse_worker_meta, worker_meta
from services.discovery.static import StaticDiscovery
from services.discovery.url import DiscoverySpec, build_discovery, parse_discovery
from services.errors import ConfigError, FailedPrecondition
from services.layers import LayerSpan


def test_static_url() -> None:
    assert parse_discovery("static://10.0.0.1:50051, 10.0.0.2:50052", {}) == DiscoverySpec(
        kind="static", addresses=("10.0.0.1:50051", "10.0.0.2:50052"))


def test_consul_url_with_service() -> None:
    spec = parse_discovery("consul://consul.local:8500?service=workers", {})
    assert spec == DiscoverySpec(kind="consul", consul=ConsulAddress("consul.local", 8500), service="workers")


def test_consul_url_defaults() -> None:
    spec = parse_discovery("consul://10.1.2.3:8501", {})
    assert (spec.service, spec.consul) == ("shardmesh-worker", ConsulAddress("10.1.2.3", 8501, "http"))
    assert parse_discovery("consul://consul", {}).consul == ConsulAddress("consul", 8500)


@pytest.mark.parametrize(("addr", "expected"), [
    ("http://agent:8600", ConsulAddress("agent", 8600, "http")),
    ("https://agent:8501", ConsulAddress("agent", 8501, "https")),
    ("agent:8502", ConsulAddress("agent", 8502, "http")),
    ("agent", ConsulAddress("agent", 8500, "http")),
    ("[::1]:8500", ConsulAddress("::1", 8500, "http")),
])
def test_bare_consul_url_uses_consul_http_addr(addr: str, expected: ConsulAddress) -> None:
    assert parse_discovery("consul://", {"CONSUL_HTTP_ADDR": addr}).consul == expected
    assert parse_discovery("consul://?service=x", {"CONSUL_HTTP_ADDR": addr}).service == "x"


def test_bare_consul_url_without_env_is_the_local_agent() -> None:
    assert parse_discovery("consul://", {}).consul == ConsulAddress("127.0.0.1", 8500, "http")


def test_token_and_ssl_from_env() -> None:
    env = {"CONSUL_HTTP_TOKEN": "s3cret", "CONSUL_HTTP_SSL": "true", "CONSUL_HTTP_SSL_VERIFY": "false"}
    address = parse_discovery("consul://agent:8501", env).consul
    assert address == ConsulAddress("agent", 8501, "https", token="s3cret", verify=False)
    assert "s3cret" not in repr(address) and "s3cret" not in repr(parse_discovery("consul://agent:8501", env))
    # CONSUL_HTTP_SSL=false does not downgrade an explicit https address (as in Consul's Go client).
    assert parse_consul_address(None, {"CONSUL_HTTP_ADDR": "https://a:1", "CONSUL_HTTP_SSL": "false"}).scheme == "https"


def test_worker_flag_address_falls_back_to_env() -> None:
    assert parse_consul_address("agent:8500", {"CONSUL_HTTP_ADDR": "other:1"}) == ConsulAddress("agent", 8500)
    assert parse_consul_address(None, {"CONSUL_HTTP_ADDR": "other:1"}) == ConsulAddress("other", 1)
    assert ConsulAddress("::1", 8500).hostport == "[::1]:8500"


@pytest.mark.parametrize("url", [
    "etcd://h:1", "h:1,h:2", "consul://h:notaport", "consul://h:0", "consul://h:1?servce=x", "consul://h:1/v1",
    "consul://tok@h:1", "consul://h:1?service=has space", "consul://h:1?service=a&service=b", "static://",
    "static://h", "consul://::1:8500",
])
def test_invalid_urls_say_what_is_valid(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_discovery(url, {})
    assert "expected" in str(info.value)
    assert "tok@" not in str(info.value)  # never echo credentials


@pytest.mark.parametrize("env", [{"CONSUL_HTTP_ADDR": "ftp://h:1"}, {"CONSUL_HTTP_ADDR": "h:99999"},
                                 {"CONSUL_HTTP_SSL": "maybe"}])
def test_invalid_env_is_a_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="CONSUL_HTTP|expected"):
        parse_discovery("consul://", env)


def test_build_discovery_picks_the_backend() -> None:
    assert isinstance(build_discovery(parse_discovery("static://a:1", {})), StaticDiscovery)
    consul_backend = build_discovery(parse_discovery("consul://a:1?service=s", {}), wait="2s")
    assert isinstance(consul_backend, ConsulDiscovery) and consul_backend.service == "s"
    assert consul_backend.http_timeout_s > 2 * 17 / 16  # long polls must not time out


def test_durations() -> None:
    assert [parse_duration(t) for t in ("5s", "1m30s", "250ms", "1h", 2)] == [5, 90, 0.25, 3600, 2]
    assert [format_duration(s) for s in (1, 60, 0.25, 1.5)] == ["1s", "60s", "250ms", "1500ms"]
    for bad in ("", "5", "5x", "s5", "1m 2s"):
        with pytest.raises(ConfigError):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="10m"):
        ConsulDiscovery(ConsulAddress(), wait="11m")


def test_token_bucket_allows_bursts_then_paces() -> None:
    now = [0.0]
    bucket = TokenBucket(rate_per_s=10, burst=3, clock=lambda: now[0])
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0]
    assert bucket.reserve() == pytest.approx(0.1)  # empty: the 4th waits one refill
    now[0] += 1.0  # refills to the burst, no more
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0]
    assert bucket.reserve() > 0


def _entry(sid: str, port: int | None, svc_addr: str = "", statuses: tuple[str, ...] = ("passing",)) -> dict[str, object]:
    return {
        "Node": {"Node": "n1", "Address": "10.0.0.9"},
        "Service": {"ID": sid, "Address": svc_addr, "Port": port, "Meta": {"layers": "0:3"}},
        "Checks": [{"CheckID": "serfHealth", "Status": "passing"}] + [{"Status": s} for s in statuses],
    }


def test_health_entries_become_endpoints() -> None:
    endpoints = endpoints_from_health([
        _entry("a", 5001, "10.0.0.1"),
        _entry("b", 5002),  # no service address: the node's
        _entry("c", 5003, "fd00::1"),
        _entry("d", 5004, statuses=("warning",)),  # dropped: not passing
        _entry("e", None),  # dropped: no port
    ])
    assert [(e.address, e.service_id) for e in endpoints] == [
        ("10.0.0.1:5001", "a"), ("10.0.0.9:5002", "b"), ("[fd00::1]:5003", "c")]
    assert endpoints[0].meta == MappingProxyType({"layers": "0:3"})
    assert endpoints_from_health(None) == ()


def test_worker_meta_round_trip() -> None:
    meta = worker_meta("minilm", LayerSpan(2, 4), 6, "sha256:ff", 32, extra={"wire_dtype": "bfloat16"})
    assert all(isinstance(v, str) for v in meta.values())
    parsed = parse_worker_meta(meta)
    assert (parsed.model_id, parsed.layers, parsed.total_layers, parsed.checksum, parsed.max_inflight, parsed.state) == (
        "minilm", LayerSpan(2, 4), 6, "sha256:ff", 32, "serving")
    assert parsed.extra == {"wire_dtype": "bfloat16"}


@pytest.mark.parametrize("bad", [{}, {"model": "m", "layers": "x", "total_layers": "6", "checksum": "c", "max_inflight": "1"},
                                 {"model": "m", "layers": "0:9", "total_layers": "6", "checksum": "c", "max_inflight": "1"}])
def test_unusable_worker_meta_is_a_failed_precondition(bad: dict[str, str]) -> None:
    with pytest.raises(FailedPrecondition):
        parse_worker_meta(bad)


def test_worker_meta_rejects_what_consul_rejects() -> None:
    with pytest.raises(ConfigError):
        worker_meta("m", "0:3", 6, "c", 1, extra={"consul-x": "1"})
    with pytest.raises(ConfigError):
        worker_meta("m", "0:3", 6, "c", 1, extra={"bad key": "1"})
    with pytest.raises(ConfigError):
        worker_meta("m", "0:7", 6, "c", 1)


def test_ttl_registration_check() -> None:
    registrar = ConsulRegistrar(ConsulAddress(), service_id="w", address="::1", port=5000, check="ttl", ttl_s=15,
                                deregister_critical_after="2m")
    assert registrar.check_definition() == {"CheckID": "w:health", "Name": "shardmesh-worker ttl health",
                                            "DeregisterCriticalServiceAfter": "2m", "TTL": "15s"}
    grpc_check = ConsulRegistrar(ConsulAddress(), service_id="w", address="::1", port=5000).check_definition()
    assert grpc_check["GRPC"] == "[::1]:5000"


def test_meta_values_are_limited_in_bytes_as_consul_counts() -> None:
    assert worker_meta("m", "0:1", 2, "c", 1, extra={"note": "é" * 256})["note"] == "é" * 256  # 512 bytes
    with pytest.raises(ConfigError, match="512 bytes"):
        worker_meta("m", "0:1", 2, "c", 1, extra={"note": "é" * 257})  # 257 characters, 514 bytes


def test_token_file_is_read_when_no_token_is_given(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "token"
    path.write_text("from-a-secret\n")
    assert parse_consul_address(None, {"CONSUL_HTTP_TOKEN_FILE": str(path)}).token == "from-a-secret"
    both = {"CONSUL_HTTP_TOKEN_FILE": str(path), "CONSUL_HTTP_TOKEN": "explicit"}
    assert parse_consul_address(None, both).token == "explicit"  # as Consul's Go client: the token wins
    with pytest.raises(ConfigError, match="CONSUL_HTTP_TOKEN_FILE.*cannot be read"):
        parse_consul_address(None, {"CONSUL_HTTP_TOKEN_FILE": str(path) + ".missing"})
    path.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        parse_consul_address(None, {"CONSUL_HTTP_TOKEN_FILE": str(path)})
