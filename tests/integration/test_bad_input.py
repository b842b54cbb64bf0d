"""Bad input gets a clear status naming what to fix; router and workers keep serving the next request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc
import pytest
import torch

from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc, tensor_pb2, worker_pb2, worker_pb2_grpc
from services.models.registry import resolve_model
from services.wire import codec
from tests.procs import UpMesh, mesh_up, worker_channel

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def mesh() -> Iterator[UpMesh]:
    config = {
        "model": "minilm",
        "workers": [{"layers": "0:3"}, {"layers": "3:6"}],
        "router_args": ["--max-tensor-mb", "1"],
        "worker_args": ["--max-tensor-mb", "4"],
    }
    with mesh_up(config) as m:
        yield m


def _router_call(mesh: UpMesh, request: router_pb2.InferRequest) -> router_pb2.InferResponse:
    with grpc.insecure_channel(mesh.router) as channel:
        return router_pb2_grpc.RouterStub(channel).Infer(request, timeout=30)


def _assert_good(mesh: UpMesh) -> None:
    reply = _router_call(mesh, router_pb2.InferRequest(text="still serving"))
    assert list(reply.output.shape) == [1, 384]


def _bad_tensor(**overrides: object) -> tensor_pb2.Tensor:
    msg = codec.encode(torch.tensor([[101, 7592, 102]]))
    for key, value in overrides.items():
        if key == "shape":
            del msg.shape[:]
            msg.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(msg, key, value)
    return msg


@pytest.mark.parametrize(
    ("request_factory", "code", "fragment"),
    [
        (lambda: router_pb2.InferRequest(text="   "), grpc.StatusCode.INVALID_ARGUMENT, "text: empty"),
        (lambda: router_pb2.InferRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input: missing"),
        (lambda: router_pb2.InferRequest(tokens=router_pb2.TokenIds()), grpc.StatusCode.INVALID_ARGUMENT, "tokens: empty"),
        (lambda: router_pb2.InferRequest(tensor=_bad_tensor(data=b"\0" * 5)), grpc.StatusCode.INVALID_ARGUMENT, "tensor: data has 5 bytes"),
        (lambda: router_pb2.InferRequest(tensor=_bad_tensor(dtype=42)), grpc.StatusCode.INVALID_ARGUMENT, "tensor: unknown or unspecified dtype 42"),
        (
            lambda: router_pb2.InferRequest(tensor=codec.encode(torch.zeros(1, 3))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor: dtype float32 not accepted",
        ),
        (
            lambda: router_pb2.InferRequest(tensor=_bad_tensor(shape=[1, 400_000], data=b"")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "exceeds the limit of 1048576 bytes",
        ),
        (
            lambda: router_pb2.InferRequest(tensor=codec.encode(torch.tensor([[101, 10**7, 102]]))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "token ids must lie in [0, 30522)",
        ),
        (
            lambda: router_pb2.InferRequest(tensor=codec.encode(torch.ones(1, 600, dtype=torch.int64))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "600 tokens exceed the model's maximum of 512",
        ),
        (
            lambda: router_pb2.InferRequest(
                tensor=codec.encode(torch.tensor([[101, 102]])), attention_mask=codec.encode(torch.ones(1, 3, dtype=torch.int64))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "attention_mask: shape [1, 3] does not match",
        ),
        (lambda: router_pb2.InferRequest(text="hi", mode=7), grpc.StatusCode.INVALID_ARGUMENT, "mode: 7 is not a Mode"),
        (
            lambda: router_pb2.InferRequest(text="hi", attention_mask=codec.encode(torch.ones(1, 3, dtype=torch.int64))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "attention_mask: only accepted with `tensor` input; with `text`",
        ),
        (
            lambda: router_pb2.InferRequest(
                tokens=router_pb2.TokenIds(ids=[101, 102]), attention_mask=codec.encode(torch.ones(1, 2, dtype=torch.int64))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "attention_mask: only accepted with `tensor` input; with `tokens`",
        ),
        (
            lambda: router_pb2.InferRequest(
                tensor=codec.encode(torch.tensor([[101, 102]])), attention_mask=codec.encode(torch.tensor([[1, 2]]))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "attention_mask: values must be 0 (padding) or 1",
        ),
        (
            lambda: router_pb2.InferRequest(
                tensor=codec.encode(torch.tensor([[101, 102]])), attention_mask=codec.encode(torch.ones(1, 2))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "attention_mask: values must be 0 (padding) or 1 (token) in an integer or bool tensor",
        ),
        (
            lambda: router_pb2.InferRequest(tensor=_bad_tensor(chunk_count=2, chunk_index=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor: chunk_count/chunk_index are for the mesh's internal streams",
        ),
        (
            lambda: router_pb2.InferRequest(
                tensor=codec.encode(torch.tensor([[101, 102]])),
                attention_mask=_bad_tensor(shape=[1, 2], data=codec.encode(torch.ones(1, 2, dtype=torch.int64)).data, chunk_index=3),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "attention_mask: chunk_count/chunk_index",
        ),
    ],
)
def test_router_rejects_bad_input_and_keeps_serving(mesh: UpMesh, request_factory, code, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        _router_call(mesh, request_factory())
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    _assert_good(mesh)


def _worker_stub(mesh: UpMesh, name: str) -> tuple[grpc.Channel, worker_pb2_grpc.ShardWorkerStub]:
    channel = worker_channel(mesh, name)  # a mesh member's channel: it carries the mesh token
    return channel, worker_pb2_grpc.ShardWorkerStub(channel)


def test_worker_rejects_bad_activations(mesh: UpMesh) -> None:
    hidden = resolve_model("minilm").hidden_size
    channel, stub = _worker_stub(mesh, "w1")  # layers 3:6 expect hidden states
    with channel:
        info = stub.Describe(worker_pb2.DescribeRequest(), timeout=5)
        assert (info.layers.start, info.layers.end, info.total_layers) == (3, 6, 6)
        cases = [
            (worker_pb2.ForwardRequest(input=codec.encode(torch.zeros(1, 4, hidden + 1))), "[batch, seq, 384]; got torch.float32 with shape [1, 4, 385]"),
            (worker_pb2.ForwardRequest(input=codec.encode(torch.zeros(1, 4))), "rank 2"),
            (worker_pb2.ForwardRequest(input=codec.encode(torch.zeros(1, 4, hidden, dtype=torch.int64))), "dtype int64 not accepted"),
            (worker_pb2.ForwardRequest(input=_bad_tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, 2, hidden])), "data has 24 bytes"),
            (worker_pb2.ForwardRequest(input=codec.encode(torch.zeros(1, 4096, hidden))), "exceeds the limit of 4194304 bytes"),
        ]
        for request, fragment in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Forward(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "input:" in err.value.details() and fragment in err.value.details()
        for request, fragment in [
            (worker_pb2.ForwardRequest(input=codec.encode(torch.zeros(1, 4, hidden)), layers=tensor_pb2.LayerRange(start=0, end=3)), "planned for 0:3"),
            (worker_pb2.ForwardRequest(input=codec.encode(torch.zeros(1, 4, hidden)), model_checksum="0" * 64), "disagree on the model"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Forward(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and fragment in err.value.details()
        good = stub.Forward(worker_pb2.ForwardRequest(input=codec.encode(torch.zeros(1, 4, hidden))), timeout=10)
        assert list(good.output.shape) == [1, hidden]
        assert good.hops[-1].worker_id == "w1"


async def test_infer_stream_requires_request_ids(mesh: UpMesh) -> None:
    """An id the server made up could not be matched by the client: a request without one is refused in-band."""
    async with grpc.aio.insecure_channel(mesh.router) as channel:
        call = router_pb2_grpc.RouterStub(channel).InferStream()
        await call.write(router_pb2.InferRequest(text="no id"))
        await call.write(router_pb2.InferRequest(request_id="with-id", text="an id"))
        await call.done_writing()
        replies = await asyncio.wait_for(_collect(call), 60)
    by_id = {r.request_id: r for r in replies}
    assert set(by_id) == {"", "with-id"}
    assert by_id[""].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "request_id: required on InferStream" in by_id[""].error.message
    assert not by_id["with-id"].HasField("error") and list(by_id["with-id"].output.shape) == [1, 384]


async def _collect(call: grpc.aio.StreamStreamCall) -> list[router_pb2.InferResponse]:
    return [reply async for reply in call]


async def test_stream_reports_errors_per_request_and_stays_open(mesh: UpMesh) -> None:
    hidden = resolve_model("minilm").hidden_size
    async with grpc.aio.insecure_channel(mesh.workers["w1"]["address"]) as channel:
        call = worker_pb2_grpc.ShardWorkerStub(channel).ForwardStream(metadata=mesh.mesh_metadata)
        await call.write(worker_pb2.ForwardRequest(request_id="bad", input=codec.encode(torch.zeros(1, 4))))
        await call.write(worker_pb2.ForwardRequest(request_id="good", input=codec.encode(torch.zeros(1, 4, hidden))))
        await call.done_writing()
        replies = {}
        async for reply in call:
            replies[reply.request_id] = reply
    assert replies["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "rank 2" in replies["bad"].error.message and replies["bad"].error.failed_worker_id == "w1"
    assert not replies["good"].HasField("error") and list(replies["good"].output.shape) == [1, hidden]
    await asyncio.sleep(0)
    _assert_good(mesh)


def test_worker_rejects_hostile_shapes_and_reply_dtypes(mesh: UpMesh) -> None:
    hidden = resolve_model("minilm").hidden_size
    channel, stub = _worker_stub(mesh, "w0")  # layers 0:3: its output is an activation
    with channel:
        overflow = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[0, 2**62])  # token ids: rank 2
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(worker_pb2.ForwardRequest(input=overflow), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "input: empty tensor of shape [0, 4611686018427387904]" in err.value.details()
        ids = codec.encode(torch.tensor([[101, 7592, 102]]))
        for wire in (tensor_pb2.DTYPE_INT64, tensor_pb2.DTYPE_BOOL, tensor_pb2.DTYPE_UINT8, tensor_pb2.DTYPE_FLOAT64):
            with pytest.raises(grpc.RpcError) as err:
                stub.Forward(worker_pb2.ForwardRequest(input=ids, reply_dtype=wire), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert f"reply_dtype: {tensor_pb2.DType.Name(wire)} is not an activation dtype" in err.value.details()
        good = stub.Forward(worker_pb2.ForwardRequest(input=ids, reply_dtype=tensor_pb2.DTYPE_FLOAT16), timeout=10)
        assert good.output.dtype == tensor_pb2.DTYPE_FLOAT16
    _assert_good(mesh)


def test_worker_refuses_hostile_shared_memory_handles(mesh: UpMesh) -> None:
    """Issue 15: another request's segment, a FIFO, a directory, or an entry outside the private directory."""
    import os

    from services.wire import shm

    if not shm.shm_available():
        pytest.skip("no shared memory here")
    hidden = resolve_model("minilm").hidden_size
    x = torch.randn(1, 4, hidden)
    channel, stub = _worker_stub(mesh, "w1")
    with channel:
        # Stealing: a segment made for request "owner" named by request "thief" is refused and left for its owner.
        owner_input = tensor_pb2.Tensor()
        name = shm.export_tensor(x, owner_input, request_id="owner")
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(worker_pb2.ForwardRequest(request_id="thief", input=owner_input), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        assert "made for another request" in err.value.details()
        assert (shm.SHM_DIR / name).exists()
        owned = stub.Forward(worker_pb2.ForwardRequest(request_id="owner", input=owner_input), timeout=10)
        expected = stub.Forward(worker_pb2.ForwardRequest(request_id="inline", input=codec.encode(x)), timeout=10)
        assert owned.output.data == expected.output.data and not (shm.SHM_DIR / name).exists()

        # A FIFO or a directory named like a segment: INVALID_ARGUMENT at once, never blocking, never deleted.
        fifo, directory = shm.new_segment_name(), shm.new_segment_name()
        os.mkfifo(shm.SHM_DIR / fifo)
        (shm.SHM_DIR / directory).mkdir()
        try:
            for planted in (fifo, directory):
                msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, 4, hidden], shm_handle=planted)
                with pytest.raises(grpc.RpcError) as err:
                    stub.Forward(worker_pb2.ForwardRequest(request_id="r", input=msg), timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert "is not a regular file" in err.value.details()
                assert os.path.lexists(shm.SHM_DIR / planted)
        finally:
            with contextlib.suppress(OSError):  # a worker blocked in open() on the FIFO gets its writer here
                os.close(os.open(shm.SHM_DIR / fifo, os.O_WRONLY | os.O_NONBLOCK))
            os.unlink(shm.SHM_DIR / fifo)
            (shm.SHM_DIR / directory).rmdir()

        # Entries outside the private directory (the old shared /dev/shm location) are out of reach.
        outside = shm.SHM_ROOT / shm.new_segment_name()
        outside.write_bytes(b"\0" * 16)
        try:
            msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, 4, hidden], shm_handle=outside.name)
            with pytest.raises(grpc.RpcError) as err:
                stub.Forward(worker_pb2.ForwardRequest(request_id="r", input=msg), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "is gone" in err.value.details()
            assert outside.exists()
        finally:
            outside.unlink()
    _assert_good(mesh)
