"""Caller identity against real router and worker processes on loopback.

Router: bearer tokens from --auth-tokens-file (reloaded on change), per-tenant methods and rate limits;
health and reflection stay open. Workers: mesh methods only for members of the mesh (mesh token), or
without a mesh key, for loopback peers only; Describe and health stay open.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.client import RouterClient
from services.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.security.mesh_auth import mesh_call_metadata
from services.wire import codec
from tests.procs import CLI, REPO, retry_until, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MODEL = "tiny-llama"
TOKEN_A = "a-" + secrets.token_hex(16)  # team-a: everything, no limit
TOKEN_B = "b-" + secrets.token_hex(16)  # team-b: Topology only
TOKEN_SLOW = "s-" + secrets.token_hex(16)  # team-slow: 1 request/s, burst 2
TOKEN_OLD = "o-" + secrets.token_hex(16)  # replaced by TOKEN_NEW while the router runs
TOKEN_NEW = "n-" + secrets.token_hex(16)

def _tokens_file(path: Path, *, rotated: bool = False) -> None:
    tokens = {TOKEN_A: "team-a", TOKEN_B: "team-b", TOKEN_SLOW: "team-slow"}
    tokens[TOKEN_NEW if rotated else TOKEN_OLD] = "team-rotating"
    data = {
        "tokens": tokens,
        "tenants": {"team-b": {"methods": ["Topology"]}, "team-slow": {"rate_limit_rps": 1, "burst": 2}},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, path)  # as a Kubernetes Secret update does: a new file swapped in


@dataclass
class AuthMesh:
    router: str
    worker: str
    tokens_file: Path
    mesh_key: bytes


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMesh]:
    """One worker and its router, both with the mesh key; the router with a tokens file."""
    directory = tmp_path_factory.mktemp("auth")
    tokens_file = directory / "tokens.yaml"
    _tokens_file(tokens_file)
    key_file = directory / "mesh.key"
    key_file.write_text(secrets.token_hex(32))
    key_file.chmod(0o600)
    mesh_key = ("--mesh-key-file", str(key_file))
    worker, worker_addr = start_worker(MODEL, "0:6", "--threads", "1", *mesh_key)
    router = None
    try:
        router, router_addr = start_router([worker_addr], "--auth-tokens-file", str(tokens_file), *mesh_key)
        wait_serving(worker_addr)
        wait_serving(router_addr)
        yield AuthMesh(router_addr, worker_addr, tokens_file, bytes.fromhex(key_file.read_text()))
    finally:
        if router is not None:
            assert router.stop() == 0
        assert worker.stop() == 0


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_unauthenticated_caller_reaches_nothing_but_health_and_reflection(mesh: AuthMesh) -> None:
    with grpc.insecure_channel(mesh.router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        calls = {
            "Infer": lambda: stub.Infer(router_pb2.InferRequest(text="hello"), timeout=10),
            "Topology": lambda: stub.Topology(router_pb2.TopologyRequest(), timeout=10),
            "Generate": lambda: list(stub.Generate(router_pb2.GenerateRequest(text="hi", max_new_tokens=2), timeout=10)),
            "InferStream": lambda: list(stub.InferStream(iter([router_pb2.InferRequest(text="hello")]), timeout=10)),
            # a body that is no protobuf at all is refused on identity before it is parsed
            "raw": lambda: channel.unary_unary("/shardmesh.v1.Router/Infer")(b"\xff\x00garbage", timeout=10),
        }
        for name, call in calls.items():
            code, details = _code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code, details)
            assert "requires a bearer token" in details and "--token" in details, details
        for header in ("Basic dXNlcjpwdw==", "Bearer"):
            code, details = _code(lambda: stub.Topology(router_pb2.TopologyRequest(), timeout=10, metadata=(("authorization", header),)))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer TOKEN" in details, (header, details)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert "shardmesh.v1.Router" in {s.name for s in replies[0].list_services_response.service}


def test_known_tokens_unknown_tokens_and_forbidden_methods(mesh: AuthMesh) -> None:
    with RouterClient(mesh.router, token=TOKEN_A) as client:
        result = retry_until(lambda: client.infer(tokens=[1, 2, 3], timeout_s=20))
        assert result.output.numel() > 0 and result.route
    with RouterClient(mesh.router, token="x" * 40) as client, pytest.raises(Unauthenticated) as info:
        client.infer(tokens=[1, 2, 3], timeout_s=10)
    assert "unknown bearer token" in str(info.value) and "--auth-tokens-file" in str(info.value)
    with RouterClient(mesh.router, token=TOKEN_B) as client:
        assert client.topology().complete
        with pytest.raises(PermissionDenied) as denied:
            client.infer(tokens=[1, 2, 3], timeout_s=10)
        assert "tenant 'team-b' may not call Infer (allowed: Topology" in str(denied.value)
        with pytest.raises(PermissionDenied, match="may not call Generate"):
            client.generate(tokens=[1, 2], max_new_tokens=2)


def test_rate_limit_per_tenant_counts_unary_calls_and_stream_requests(mesh: AuthMesh) -> None:
    with RouterClient(mesh.router, token=TOKEN_SLOW) as slow, RouterClient(mesh.router, token=TOKEN_A) as free:
        retry_until(lambda: free.infer(tokens=[1, 2], timeout_s=20))
        time.sleep(2.1)  # a full bucket
        assert slow.topology().complete and slow.topology().complete  # the burst of 2
        with pytest.raises(grpc.RpcError) as info:
            slow.topology()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'team-slow' is over its rate limit of 1 requests/s (tenants.team-slow.rate_limit_rps)" in info.value.details()
        for _ in range(5):  # other tenants are not limited by team-slow's bucket
            free.infer(tokens=[1, 2], timeout_s=20)
        with pytest.raises(ResourceExhausted, match="team-slow"):
            slow.infer(tokens=[1, 2], timeout_s=20)

    async def stream() -> list[router_pb2.InferResponse]:
        async with grpc.aio.insecure_channel(mesh.router) as channel:
            call = router_pb2_grpc.RouterStub(channel).InferStream(metadata=(("authorization", f"Bearer {TOKEN_SLOW}"),))
            for i in range(4):
                await call.write(router_pb2.InferRequest(request_id=f"s{i}", tokens=router_pb2.TokenIds(ids=[1, 2])))
            await call.done_writing()
            return [reply async for reply in call]

    time.sleep(2.1)
    replies = asyncio.run(stream())
    limited = [r for r in replies if r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    served = [r for r in replies if not r.HasField("error")]
    # opening the stream takes one request of the burst of 2; of the 4 requests on it, 1 is served
    assert len(replies) == 4 and len(served) >= 1 and len(limited) >= 2, [r.error.message for r in replies]
    assert all("team-slow" in r.error.message for r in limited)


def test_client_and_cli_send_the_token_from_environment_or_flag(mesh: AuthMesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDMESH_TOKEN", TOKEN_A)
    with RouterClient(mesh.router) as client:
        assert retry_until(lambda: client.infer(tokens=[1, 2], timeout_s=20)).route
    monkeypatch.delenv("SHARDMESH_TOKEN")
    refused = subprocess.run([*CLI, "generate", "--router", mesh.router, "--token", TOKEN_B, "--max-new-tokens", "2", "hi"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "tenant 'team-b' may not call Generate" in refused.stderr, refused.stderr


def test_token_file_reload_admits_new_tokens_and_drops_removed_ones(mesh: AuthMesh) -> None:
    with RouterClient(mesh.router, token=TOKEN_OLD) as old:
        assert old.topology().complete
        _tokens_file(mesh.tokens_file, rotated=True)
        with RouterClient(mesh.router, token=TOKEN_NEW) as new:
            started = time.monotonic()
            retry_until(lambda: new.topology(), timeout_s=15)
            assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError) as info:
            old.topology()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _forward_calls(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> dict[str, Callable[[], object]]:
    stub = worker_pb2_grpc.ShardWorkerStub(channel)
    ids = codec.encode(torch.tensor([[1, 2, 3]]))
    return {
        "Forward": lambda: stub.Forward(worker_pb2.ForwardRequest(request_id="f", input=ids), timeout=10, metadata=metadata),
        "ForwardStream": lambda: list(stub.ForwardStream(
            iter([worker_pb2.ForwardRequest(request_id="s", input=ids)]), timeout=10, metadata=metadata)),
        "CloseSession": lambda: stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="someone-else"), timeout=10, metadata=metadata),
    }


def _open_calls_answer(channel: grpc.Channel) -> None:
    info = worker_pb2_grpc.ShardWorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)
    assert (info.layers.start, info.layers.end) == (0, 6)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_worker_mesh_methods_need_the_mesh_token(mesh: AuthMesh) -> None:
    with grpc.insecure_channel(mesh.worker) as channel:
        for who, metadata, fragment in [
            ("no token", (), "carries no mesh token"),
            ("another mesh", mesh_call_metadata(secrets.token_bytes(32)), "does not match this worker's mesh key"),
        ]:
            for method, call in _forward_calls(channel, metadata).items():
                code, details = _code(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (who, method, code, details)
                assert f"ShardWorker/{method} is only for the router and workers of this mesh" in details
                assert fragment in details and "--mesh-key-file" in details
        _open_calls_answer(channel)
        member = _forward_calls(channel, mesh_call_metadata(mesh.mesh_key))
        assert _code(member["Forward"]) == (grpc.StatusCode.OK, "")
        assert _code(member["CloseSession"]) == (grpc.StatusCode.OK, "")
    # ... and the router of the mesh, started with the same key, sends it (every other test here relies on it).
    with RouterClient(mesh.router, token=TOKEN_A) as client:
        assert retry_until(lambda: client.infer(tokens=[1, 2, 3], timeout_s=20)).route


def _non_loopback_address() -> str | None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        host = str(sock.getsockname()[0])
    return None if host.startswith("127.") else host


def test_without_a_mesh_key_workers_take_mesh_calls_from_loopback_only() -> None:
    host = _non_loopback_address()
    if host is None:
        pytest.skip("this machine has no non-loopback address to call from")
    worker, worker_addr = start_worker(MODEL, "0:6", "--threads", "1", "--listen", "0.0.0.0:0")
    port = worker_addr.rsplit(":", 1)[1]
    try:
        wait_serving(f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"{host}:{port}") as remote:
            for method, call in _forward_calls(remote, ()).items():
                code, details = _code(call)
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
                assert "accepts mesh calls only from loopback" in details and f"ipv4:{host}:" in details
                assert "--mesh-key-file" in details
            _open_calls_answer(remote)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as local:
            assert _code(_forward_calls(local, ())["Forward"]) == (grpc.StatusCode.OK, "")
    finally:
        assert worker.stop() == 0
