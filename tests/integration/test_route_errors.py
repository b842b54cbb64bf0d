"""Route gaps, overlaps and checksum mismatches give FAILED_PRECONDITION with the details."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc
from services.models.registry import resolve_model
from tests.procs import Proc, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]


def _tampered_copy(tmp: Path) -> Path:
    """The same model with one weight changed: a different checksum, same shapes."""
    copy = tmp / "minilm-tampered"
    shutil.copytree(resolve_model("minilm").model_dir, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    return copy


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tampered = _tampered_copy(tmp_path_factory.mktemp("models"))
    specs = {"a03": ("minilm", "0:3"), "b26": ("minilm", "2:6"), "c46": ("minilm", "4:6"), "d36": (str(tampered), "3:6")}
    started: dict[str, tuple[Proc, str]] = {}
    try:
        for name, (model, layers) in specs.items():
            started[name] = start_worker(model, layers, "--worker-id", name)
        for _, address in started.values():
            wait_serving(address)
        yield {name: address for name, (_, address) in started.items()}
    finally:
        for proc, _ in started.values():
            proc.stop()


@pytest.mark.parametrize(
    ("names", "fragments"),
    [
        (["a03", "c46"], ["missing layers 3:4", "no worker starts at layer 3"]),
        (["a03", "b26"], ["layers 2:3 are held by both 0:3 and 2:6"]),
        (["a03", "d36"], ["checksum mismatch", "a03", "d36"]),
    ],
    ids=["gap", "overlap", "checksum"],
)
def test_incomplete_route_is_failed_precondition(workers: dict[str, str], names: list[str], fragments: list[str]) -> None:
    proc, address = start_router([workers[n] for n in names])
    try:
        with grpc.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            topology = None
            for _ in range(100):  # until the router has described both workers
                topology = stub.Topology(router_pb2.TopologyRequest(), timeout=5)
                if len(topology.workers) == len(names):
                    break
                import time

                time.sleep(0.1)
            assert topology is not None and not topology.complete
            with pytest.raises(grpc.RpcError) as info:
                stub.Infer(router_pb2.InferRequest(tokens=router_pb2.TokenIds(ids=[101, 102])), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        for fragment in fragments:
            assert fragment in info.value.details(), info.value.details()
            assert fragment in topology.problem
    finally:
        assert proc.stop() == 0
