"""Workers register in Consul (real worker processes) and the router follows Consul's view."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from typing import Any

import pytest

from services.client import RouterClient
from services.discovery.registration import parse_worker_meta
from services.layers import LayerSpan
from services.models.registry import resolve_model
from shard_worker.presence import RESYNC_S, TTL_S
from tests.consul_emulator.process import EmulatorControl
from tests.consul_fixtures import wait_until
from tests.procs import mesh_up, start_worker, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.consul]


def _get(addr: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as reply:
        return json.loads(reply.read())


def _put(addr: str, path: str) -> None:
    request = urllib.request.Request(f"http://{addr}{path}", method="PUT", data=b"")
    with urllib.request.urlopen(request, timeout=5):
        pass


def _passing(addr: str, service: str) -> list[dict[str, Any]]:
    return _get(addr, f"/v1/health/service/{service}?passing=true")


@pytest.mark.parametrize("check", ["grpc", "ttl"])
def test_registration_health_deregistration_and_restart(consul_addr: str, consul_service_name: str, check: str,
                                                        consul_control: EmulatorControl | None) -> None:
    args = ["--consul", consul_addr, "--consul-service", consul_service_name, "--consul-check", check, "--worker-id", "reg-w0"]
    proc, address = start_worker("minilm", "0:3", *args)
    wait_serving(address)
    entries = wait_until(lambda: _passing(consul_addr, consul_service_name), lambda e: len(e) == 1, 20, "a passing instance")
    service = entries[0]["Service"]
    assert service["ID"] == "reg-w0" and f"{service['Address']}:{service['Port']}" == address
    meta = parse_worker_meta(service["Meta"])
    source = resolve_model("minilm")
    assert (meta.model_id, meta.layers, meta.total_layers, meta.checksum) == ("minilm", LayerSpan(0, 3), 6, source.checksum)
    checks = _get(consul_addr, "/v1/agent/checks")
    ours = [c for c in checks.values() if c["ServiceID"] == "reg-w0"]
    assert len(ours) == 1 and ours[0]["CheckID"] == "reg-w0:health" and ours[0]["Status"] == "passing"
    assert ours[0]["Type"] == ("grpc" if check == "grpc" else "ttl")

    # The agent forgets it (restarted without its data; a real agent: an operator deregisters it): the worker
    # notices within RESYNC_S (gRPC check) or a heartbeat, TTL / 3 (TTL check), and registers again.
    started = time.monotonic()
    if consul_control is not None:
        assert "reg-w0" in consul_control.forget()
    else:
        _put(consul_addr, "/v1/agent/service/deregister/reg-w0")
    assert "reg-w0" not in _get(consul_addr, "/v1/agent/services")
    resync_s = RESYNC_S if check == "grpc" else TTL_S / 3
    wait_until(lambda: _passing(consul_addr, consul_service_name), lambda e: len(e) == 1, resync_s + 10, "re-registration")
    back_s = time.monotonic() - started
    assert back_s < resync_s + 5.0, f"back in the catalog after {back_s:.1f}s"
    assert any("registering" in line and "again" in line for line in proc.stderr), proc.stderr[-5:]

    assert proc.stop(signal.SIGTERM) == 0
    assert "reg-w0" not in _get(consul_addr, "/v1/agent/services"), "not deregistered on SIGTERM"

    proc, address = start_worker("minilm", "0:3", *args)
    try:
        wait_serving(address)
        entries = wait_until(lambda: _passing(consul_addr, consul_service_name), lambda e: len(e) == 1, 20, "re-registration")
        assert f"{entries[0]['Service']['Address']}:{entries[0]['Service']['Port']}" == address
    finally:
        assert proc.stop() == 0


def test_router_follows_consul(consul_addr: str, consul_service_name: str) -> None:
    config = {
        "model": "minilm",
        "discovery": "consul",
        "consul": {"address": consul_addr, "service": consul_service_name},
        "workers": [{"layers": "0:3", "replicas": 2}, {"layers": "3:6"}],
    }
    with mesh_up(config) as mesh, RouterClient(mesh.router) as client:
        first = client.infer(text="through consul")
        assert first.route[1] == "w1"
        view = client.topology()
        assert view.discovery == "consul" and view.complete and len(view.workers) == 3
        victim = mesh.workers["w0r0"]
        import os

        os.kill(int(victim["pid"]), signal.SIGKILL)
        results = [client.infer(text=f"after kill {i}") for i in range(6)]
        assert all(r.route[0] == "w0r1" for r in results[1:])
        wait_until(lambda: {w.worker_id for w in client.topology().workers}, lambda ids: "w0r0" not in ids, 30, "the dead worker to leave the table")
