"""Large tensors as several stream messages, and their bounded reassembly. Pure: no I/O.

A stream that carries one 200 MiB activation as a single message blocks every other request
multiplexed on it and needs a large receive limit on every peer; chunks keep each message small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.errors import InvalidArgument, ResourceExhausted
from services.gen.shardmesh.v1 import tensor_pb2

DEFAULT_CHUNK_BYTES = 1 << 20
"""1 MiB per chunk.

Large enough that per-message cost (protobuf framing, HTTP/2 frame headers, one event-loop
turn per message) is amortised over plenty of bytes; small enough that requests sharing a
stream interleave at millisecond granularity, and a quarter of gRPC's 4 MiB default receive
limit, so a chunk plus its envelope fits even a peer running with default channel options.
"""


def split(msg: tensor_pb2.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[tensor_pb2.Tensor]:
    """Cuts ``msg`` into chunks of at most ``chunk_bytes`` of ``data``, in send order.

    The first chunk carries dtype and shape; every chunk carries ``chunk_index``/``chunk_count``.
    A tensor of at most ``chunk_bytes`` (or one whose bytes sit in shared memory) comes back as
    ``[msg]`` unchanged. protobuf's ``bytes`` fields accept only ``bytes``, so each chunk costs
    exactly one copy of its slice (taken through a memoryview, never via an intermediate slice).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    data = msg.data  # upb builds a new bytes object on every access: read it once
    if len(data) <= chunk_bytes or msg.shm_handle:
        return [msg]
    view = memoryview(data)
    count = -(-len(data) // chunk_bytes)
    chunks = [
        tensor_pb2.Tensor(
            data=bytes(view[start : start + chunk_bytes]), chunk_index=index, chunk_count=count
        )
        for index, start in enumerate(range(0, len(data), chunk_bytes))
    ]
    chunks[0].dtype = msg.dtype
    chunks[0].shape.extend(msg.shape)
    return chunks


@dataclass
class _Pending:
    header: tensor_pb2.Tensor  # first chunk: dtype and shape
    count: int
    parts: list[bytes] = field(default_factory=list)
    nbytes: int = 0


class Reassembler:
    """Joins chunked tensors per request key, bounded in bytes and in requests held at once.

    The bounds stop a peer that starts many tensors, or never finishes one, from exhausting
    memory. Any error discards that key's partial tensor: a broken sequence cannot be resumed.
    """

    def __init__(self, max_pending_bytes: int, max_pending_requests: int) -> None:
        self._max_bytes = max_pending_bytes
        self._max_requests = max_pending_requests
        self._pending: dict[str, _Pending] = {}
        self._bytes = 0

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def add(self, key: str, chunk: tensor_pb2.Tensor) -> tensor_pb2.Tensor | None:
        """Takes the next chunk of ``key``; returns the whole tensor once its last chunk arrived."""
        try:
            return self._add(key, chunk)
        except (InvalidArgument, ResourceExhausted):
            self.discard(key)
            raise

    def discard(self, key: str) -> None:
        """Forgets ``key``'s partial tensor (its request failed or was cancelled)."""
        pending = self._pending.pop(key, None)
        if pending is not None:
            self._bytes -= pending.nbytes

    def _add(self, key: str, chunk: tensor_pb2.Tensor) -> tensor_pb2.Tensor | None:
        count, index = chunk.chunk_count, chunk.chunk_index
        pending = self._pending.get(key)
        if count <= 1:
            if pending is not None:
                raise InvalidArgument(
                    f"request {key}: chunk_count {count} does not match {pending.count} from chunk 0"
                )
            if index != 0:
                raise InvalidArgument(f"request {key}: chunk_index {index} in an unchunked tensor")
            return chunk
        if chunk.shm_handle:
            raise InvalidArgument(f"request {key}: a chunk cannot carry a shared-memory handle")
        if pending is None:
            if index != 0:
                raise InvalidArgument(f"request {key}: chunk {index} of {count} arrived before chunk 0")
            if len(self._pending) >= self._max_requests:
                raise ResourceExhausted(
                    f"request {key}: {len(self._pending)} chunked tensors already pending"
                    f" (limit {self._max_requests}); retry later"
                )
            pending = _Pending(header=chunk, count=count)
            self._pending[key] = pending
        elif count != pending.count:
            raise InvalidArgument(
                f"request {key}: chunk_count {count} does not match {pending.count} from chunk 0"
            )
        elif index != len(pending.parts):
            problem = "duplicate" if index < len(pending.parts) else "out-of-order"
            raise InvalidArgument(
                f"request {key}: {problem} chunk {index} of {count}; expected chunk {len(pending.parts)}"
            )
        data = chunk.data
        if self._bytes + len(data) > self._max_bytes:
            raise ResourceExhausted(
                f"request {key}: chunk of {len(data)} bytes would raise pending chunk bytes from {self._bytes}"
                f" to {self._bytes + len(data)}, over the limit of {self._max_bytes}; retry later"
            )
        pending.parts.append(data)
        pending.nbytes += len(data)
        self._bytes += len(data)
        if len(pending.parts) < count:
            return None
        self.discard(key)
        return tensor_pb2.Tensor(
            dtype=pending.header.dtype, shape=pending.header.shape, data=b"".join(pending.parts)
        )
