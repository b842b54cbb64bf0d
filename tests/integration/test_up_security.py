"""``shardmesh up`` runs every local mesh with a fresh private mesh key and says what is exposed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import pytest
import torch

from services.client import RouterClient
from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.wire import codec
from tests.procs import mesh_up

pytestmark = [pytest.mark.integration]


def test_up_generates_a_private_mesh_key_and_workers_require_it() -> None:
    config = {"model": "tiny-llama", "workers": [{"layers": "0:3"}, {"layers": "3:6"}], "worker_args": ["--threads", "1"]}
    with mesh_up(config) as mesh:
        security = [line for line in mesh.proc.stdout if line.startswith("security:")]
        assert security == [f"security: plaintext on loopback, mesh key {mesh.mesh_key_path}"]
        key = Path(mesh.mesh_key_path)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
        # the promised lines, unchanged: worker lines, then the security line, then ready
        lines = [line for line in mesh.proc.stdout if line.startswith(("worker name=", "security:", "ready router="))]
        assert [line.split()[0] for line in lines] == ["worker", "worker", "security:", "ready"]
        assert all(set(mesh.workers[n]) == {"name", "pid", "address"} for n in ("w0", "w1"))
        with RouterClient(mesh.router) as client:  # router and workers share the key: direct and relay work
            assert client.infer(tokens=[1, 2, 3], timeout_s=30).route == ("w0", "w1")
            assert client.infer(tokens=[1, 2, 3], mode="relay", timeout_s=30).route == ("w0", "w1")
        hidden = codec.encode(torch.zeros(1, 3, 64))
        with grpc.insecure_channel(mesh.workers["w1"]["address"]) as channel:
            stub = worker_pb2_grpc.ShardWorkerStub(channel)
            with pytest.raises(grpc.RpcError) as info:  # a local process without the key
                stub.Forward(worker_pb2.ForwardRequest(input=hidden), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
            assert stub.Forward(worker_pb2.ForwardRequest(input=hidden), timeout=10, metadata=mesh.mesh_metadata).output.shape
    assert not os.path.exists(key.parent), "the mesh key outlived the mesh"
