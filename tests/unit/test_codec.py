from __future__ import annotations

import pytest
import torch

from services.errors import InvalidArgument
from services.gen.shardmesh.v1 import tensor_pb2
from services.wire import codec


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 3, 4),
        torch.randn(5).to(torch.float16),
        torch.randn(3, 7).to(torch.bfloat16),
        torch.arange(12, dtype=torch.int64).reshape(3, 4),
        torch.tensor([[True, False]]),
        torch.zeros(0, 4),
        torch.randn(4, 6).t(),  # non-contiguous
    ],
)
def test_round_trip_is_exact(tensor: torch.Tensor) -> None:
    msg = codec.encode(tensor)
    out = codec.decode(msg)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_decode_is_zero_copy() -> None:
    msg = codec.encode(torch.randn(64, 64))
    out = codec.decode(msg)
    # The tensor reads the message's own bytes: no second buffer.
    assert out.untyped_storage().nbytes() == len(msg.data)


def test_wrong_byte_length_names_field() -> None:
    msg = codec.encode(torch.randn(2, 3))
    msg.data = msg.data[:-4]
    with pytest.raises(InvalidArgument, match=r"input: data has 20 bytes but shape \[2, 3\] x float32 needs 24"):
        codec.decode(msg, field="input")


def test_unknown_dtype_rejected() -> None:
    msg = tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="unknown or unspecified dtype"):
        codec.decode(msg)
    with pytest.raises(InvalidArgument, match="unspecified"):
        codec.decode(tensor_pb2.Tensor(shape=[1], data=b"\0" * 4))


def test_oversize_rejected_before_reading() -> None:
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1024, 1024], data=b"")
    with pytest.raises(InvalidArgument, match=r"hidden: tensor of shape \[1024, 1024\] \(4194304 bytes\) exceeds the limit of 1000 bytes"):
        codec.decode(msg, field="hidden", max_bytes=1000)


def test_negative_dimension_and_rank_checks() -> None:
    with pytest.raises(InvalidArgument, match="negative dimension"):
        codec.decode(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1, 2], data=b""))
    with pytest.raises(InvalidArgument, match="rank 1"):
        codec.decode(codec.encode(torch.zeros(3)), expect_rank=(2,))
    with pytest.raises(InvalidArgument, match="dtype float32 not accepted here; expected int64"):
        codec.decode(codec.encode(torch.zeros(3)), expect_dtype=(torch.int64,))


def test_shared_memory_handle_refused_on_byte_path() -> None:
    with pytest.raises(InvalidArgument, match="shared-memory"):
        codec.decode(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], shm_handle="x"))


@pytest.mark.parametrize("shape", [[0, 2**62, 384], [2**62, 0], [0, 2**31, 2**31, 2**31], [1, 0, 2**40]])
def test_empty_shapes_with_absurd_dimensions_are_invalid_argument(shape: list[int]) -> None:
    """Issue 15: such shapes hold no bytes, but torch's strides overflow (INTERNAL) if they reach torch.empty."""
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape)
    with pytest.raises(InvalidArgument, match=r"input: empty tensor of shape .* has a dimension no tensor within the limit"):
        codec.decode(msg, field="input")


def test_empty_shapes_within_the_limit_still_decode() -> None:
    out = codec.decode(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[0, 1024, 384]), field="input")
    assert out.shape == (0, 1024, 384)
