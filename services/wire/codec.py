"""Tensor <-> ``shardmesh.v1.Tensor``: raw little-endian bytes, checked on the way in, never pickled.

Decoding is zero-copy (``torch.frombuffer`` over the received bytes); the resulting tensor is
read-only in spirit, so stages must not modify their inputs in place.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

from services.errors import InvalidArgument
from services.gen.shardmesh.v1 import tensor_pb2

DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024
MAX_RANK = 8
# Activations (non-final stage outputs) travel only as floating point: casting them to an integer or
# bool dtype would silently destroy them.
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_TORCH_BY_WIRE: dict[int, torch.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: torch.float32,
    tensor_pb2.DTYPE_FLOAT16: torch.float16,
    tensor_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    tensor_pb2.DTYPE_FLOAT64: torch.float64,
    tensor_pb2.DTYPE_INT64: torch.int64,
    tensor_pb2.DTYPE_INT32: torch.int32,
    tensor_pb2.DTYPE_BOOL: torch.bool,
    tensor_pb2.DTYPE_UINT8: torch.uint8,
}
_WIRE_BY_TORCH: dict[torch.dtype, int] = {v: k for k, v in _TORCH_BY_WIRE.items()}
_NAME_BY_TORCH: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
    torch.uint8: "uint8",
}
_TORCH_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in _NAME_BY_TORCH.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform we ship on is little-endian
    raise RuntimeError("shardmesh's wire codec assumes a little-endian host")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _TORCH_BY_NAME[name]
    except KeyError:
        raise InvalidArgument(f"unknown dtype {name!r}; expected one of {sorted(_TORCH_BY_NAME)}") from None


def dtype_from_wire(wire: int) -> torch.dtype:
    try:
        return _TORCH_BY_WIRE[wire]
    except KeyError:
        raise InvalidArgument(f"unknown dtype {wire}") from None


def wire_dtype(dtype: torch.dtype) -> int:
    return _WIRE_BY_TORCH[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return _NAME_BY_TORCH[dtype]


def encode(tensor: torch.Tensor, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Serialises a CPU tensor. ``out`` lets callers fill a field of a larger message in place."""
    wire = _WIRE_BY_TORCH.get(tensor.dtype)
    if wire is None:
        raise InvalidArgument(f"dtype {tensor.dtype} cannot travel on the wire")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    msg = out if out is not None else tensor_pb2.Tensor()
    msg.dtype = wire  # type: ignore[assignment]
    del msg.shape[:]
    msg.shape.extend(t.shape)
    # Reinterpret as bytes without copying through numpy (bfloat16 has no numpy dtype).
    msg.data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return msg


def check_header(
    msg: tensor_pb2.Tensor,
    *,
    field: str,
    max_bytes: int,
    expect_dtype: tuple[torch.dtype, ...] | None = None,
    expect_rank: tuple[int, ...] | None = None,
) -> tuple[torch.dtype, list[int], int]:
    """Checks dtype, shape and size of a tensor message (wherever its bytes are); returns (dtype, shape, nbytes)."""
    dtype = _TORCH_BY_WIRE.get(msg.dtype)
    if dtype is None:
        raise InvalidArgument(f"{field}: unknown or unspecified dtype {msg.dtype}")
    if expect_dtype is not None and dtype not in expect_dtype:
        names = ", ".join(_NAME_BY_TORCH[d] for d in expect_dtype)
        raise InvalidArgument(f"{field}: dtype {_NAME_BY_TORCH[dtype]} not accepted here; expected {names}")
    shape = list(msg.shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"{field}: rank {len(shape)} exceeds the maximum of {MAX_RANK}")
    if expect_rank is not None and len(shape) not in expect_rank:
        raise InvalidArgument(f"{field}: rank {len(shape)} (shape {shape}) not accepted; expected rank {expect_rank}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return dtype, shape, checked_nbytes(shape, itemsize, field=field, max_bytes=max_bytes)


def checked_nbytes(shape: list[int], itemsize: int, *, field: str, max_bytes: int) -> int:
    """Byte size of ``shape`` x ``itemsize``, refusing shapes no tensor of ``max_bytes`` could have.

    Python integers do not overflow, but torch's strides do: ``[0, 2**62, 384]`` holds no bytes yet
    makes ``torch.empty`` fail (INTERNAL). So every dimension also counts as at least one element
    against the bound: a zero dimension cannot hide an absurd one.
    """
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"{field}: negative dimension in shape {shape}")
    expected = math.prod(shape) * itemsize  # Python ints: exact, however large the shape
    if expected > max_bytes:
        raise InvalidArgument(
            f"{field}: tensor of shape {shape} ({expected} bytes) exceeds the limit of {max_bytes} bytes;"
            " send a smaller input or raise --max-tensor-mb"
        )
    if math.prod(max(dim, 1) for dim in shape) * itemsize > max_bytes:
        raise InvalidArgument(
            f"{field}: empty tensor of shape {shape} has a dimension no tensor within the limit of {max_bytes} bytes"
            " could have; send a shape whose non-zero dimensions fit the limit"
        )
    return expected


def check_inline(
    msg: tensor_pb2.Tensor,
    *,
    field: str,
    max_bytes: int,
    expect_dtype: tuple[torch.dtype, ...] | None = None,
    expect_rank: tuple[int, ...] | None = None,
) -> tuple[torch.dtype, list[int], int]:
    """Everything :func:`decode` checks, without building the tensor: for a message passed on as it came."""
    if msg.shm_handle:
        raise InvalidArgument(f"{field}: shared-memory handles are not accepted on this path")
    dtype, shape, expected = check_header(
        msg, field=field, max_bytes=max_bytes, expect_dtype=expect_dtype, expect_rank=expect_rank
    )
    if len(msg.data) != expected:
        raise InvalidArgument(
            f"{field}: data has {len(msg.data)} bytes but shape {shape} x {_NAME_BY_TORCH[dtype]} needs {expected}"
        )
    return dtype, shape, expected


def decode(
    msg: tensor_pb2.Tensor,
    *,
    field: str = "tensor",
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    expect_dtype: tuple[torch.dtype, ...] | None = None,
    expect_rank: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Checks and deserialises inline bytes; every problem is INVALID_ARGUMENT naming ``field``.

    Shared-memory handles are refused here: only :func:`services.wire.placement.unpack`, used on hops
    between co-located peers, reads them.
    """
    dtype, shape, expected = check_inline(
        msg, field=field, max_bytes=max_bytes, expect_dtype=expect_dtype, expect_rank=expect_rank
    )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # The received bytes are immutable; the tensor shares them (zero-copy) and is never written to.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(msg.data, dtype=dtype)
    return flat.view(shape)


def nbytes(msg: tensor_pb2.Tensor) -> int:
    return len(msg.data)
