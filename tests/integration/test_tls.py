"""Mutual TLS between client, router and workers, and the plaintext health-only listener for probes."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import RouterClient
from services.errors import PermissionDenied, Unavailable
from tests.procs import retry_until, start_router, start_worker

pytestmark = [pytest.mark.integration]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=shardmesh-test-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("node", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", "san.cnf", cwd=d)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mutual_tls_end_to_end_and_plaintext_health(pki: Path) -> None:
    tls = ["--tls-cert", str(pki / "node.crt"), "--tls-key", str(pki / "node.key"), "--tls-ca", str(pki / "ca.crt")]
    health_port = _free_port()
    worker, worker_addr = start_worker("tiny-llama", "0:6", *tls, "--health-listen", f"127.0.0.1:{health_port}")
    router = None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> None:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

            retry_until(serving)
        router, router_addr = start_router([worker_addr], *tls)
        client_tls = {"tls_ca": pki / "ca.crt", "tls_cert": pki / "client.crt", "tls_key": pki / "client.key"}
        with RouterClient(router_addr, **client_tls) as client:
            result = retry_until(lambda: client.infer(tokens=[1, 2, 3], timeout_s=10))
            assert result.output.shape[-1] > 0 and result.route
        # Without a client certificate the router refuses the connection.
        with RouterClient(router_addr, tls_ca=pki / "ca.crt") as client, pytest.raises(Unavailable):
            client.infer(tokens=[1, 2, 3], timeout_s=5)
        # Plaintext to the TLS port fails too.
        with RouterClient(router_addr) as client, pytest.raises(Unavailable):
            client.infer(tokens=[1, 2, 3], timeout_s=5)
        assert router.stop() == 0
        # The certificate's CN is the tenant: the tokens file's tenant settings apply to it.
        tokens = pki / "tokens.yaml"
        tokens.write_text(yaml.safe_dump({"tokens": {"t" * 32: "someone"}, "tenants": {"client": {"methods": ["Topology"]}}}))
        router, router_addr = start_router([worker_addr], *tls, "--auth-tokens-file", str(tokens))
        with RouterClient(router_addr, **client_tls) as client:

            def complete() -> None:  # Topology is allowed to tenant "client"; wait for the route
                view = client.topology(timeout_s=10)
                assert view.complete, view.problem

            retry_until(complete)
            with pytest.raises(PermissionDenied, match="tenant 'client' may not call Infer"):
                client.infer(tokens=[1, 2, 3], timeout_s=10)
    finally:
        if router is not None:
            assert router.stop() == 0
        assert worker.stop() == 0
    assert torch.is_tensor(result.output)
