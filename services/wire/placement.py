"""Where a tensor's bytes travel: inline in the message, or in shared memory between co-located peers.

The sender decides (it knows whether the receiver is on the same host); the receiver accepts either.
Shared memory turns an 8 MiB hop from a 15-25 ms gRPC copy into two memory copies of a few ms.
A segment is bound to the request it travels with (``request_id``): a receiver that passes the id
of the request naming the segment refuses anyone else's (see :mod:`services.wire.shm`).
"""

from __future__ import annotations

import os

import torch

from services.errors import InvalidArgument
from services.gen.shardmesh.v1 import tensor_pb2
from services.wire import codec, shm

# Below this, inline bytes are as fast and need no segment bookkeeping.
SHM_MIN_BYTES = int(os.environ.get("SHARDMESH_SHM_MIN_BYTES", 1 << 20))


def pack(
    tensor: torch.Tensor, *, colocated: bool, out: tensor_pb2.Tensor | None = None, request_id: str = ""
) -> tensor_pb2.Tensor:
    """Serialises ``tensor`` for a receiver; large tensors to a co-located receiver go by shared memory,
    in a segment only the request ``request_id`` can hand over."""
    msg = out if out is not None else tensor_pb2.Tensor()
    if colocated and tensor.numel() * tensor.element_size() >= SHM_MIN_BYTES and shm.shm_available():
        shm.export_tensor(tensor, msg, request_id=request_id)
        return msg
    return codec.encode(tensor, msg)


def unpack(
    msg: tensor_pb2.Tensor,
    *,
    field: str,
    max_bytes: int,
    expect_dtype: tuple[torch.dtype, ...] | None = None,
    expect_rank: tuple[int, ...] | None = None,
    request_id: str | None = None,
) -> torch.Tensor:
    """Deserialises inline bytes (zero-copy) or a shared-memory segment (copied, then unlinked).

    ``request_id``: the request that carries ``msg``; its segment must have been made for it. A
    receiver reading a reply from a peer it chose may pass None.
    """
    if not msg.shm_handle:
        return codec.decode(msg, field=field, max_bytes=max_bytes, expect_dtype=expect_dtype, expect_rank=expect_rank)
    return shm.import_tensor(
        msg, field=field, max_bytes=max_bytes, request_id=request_id, expect_dtype=expect_dtype, expect_rank=expect_rank
    )


def release(msg: tensor_pb2.Tensor) -> None:
    """Frees the segment of a message that will never be read (a failed, cancelled or abandoned send, or
    a peer's answer nobody takes). A handle that is not a valid segment name holds nothing to free."""
    if msg.shm_handle:
        try:
            shm.discard(msg.shm_handle)
        except InvalidArgument:
            pass


def release_unread(msg: tensor_pb2.Tensor, request_id: str) -> None:
    """Frees the segment of a received request that was dropped unread, only if it was made for that
    request (see :func:`shm.discard_unread`): what a caller names is never deleted on its word alone."""
    if msg.shm_handle:
        shm.discard_unread(msg.shm_handle, request_id)
