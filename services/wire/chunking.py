"""Large tensors as several stream messages, and their bounded reassembly. Pure: no I/O.

A stream that carries one 200 MiB activation as a single message blocks every other request
multiplexed on it and needs a large receive limit on every peer; chunks keep each message small.

Chunk 0 declares the whole tensor (dtype x shape) and how it is cut: every chunk but the last
carries as many bytes as chunk 0, so ``chunk_count`` must be ``ceil(declared / len(chunk 0))``.
The receiver checks this, and the declared size against its tensor limit and its pending budget,
before it buffers anything: a chunk 0 that declares 3 KB and 701 chunks is refused at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.errors import InvalidArgument, ResourceExhausted
from services.gen.shardmesh.v1 import tensor_pb2
from services.wire.codec import check_header

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
    declared: int  # bytes of the whole tensor, reserved against the budget at chunk 0
    chunk_bytes: int  # bytes of every chunk but the last
    parts: list[bytes] = field(default_factory=list)
    received: int = 0


class Reassembler:
    """Joins chunked tensors per request key, bounded in bytes and in requests held at once.

    The bounds stop a peer that starts many tensors, or never finishes one, from exhausting
    memory: a tensor's declared size is reserved when its chunk 0 arrives (refused at once if it
    exceeds ``max_tensor_bytes`` or the room left in ``max_pending_bytes``), and no chunk may
    carry more than was declared. Any error discards that key's partial tensor: a broken
    sequence cannot be resumed.
    """

    def __init__(
        self,
        max_pending_bytes: int,
        max_pending_requests: int,
        max_tensor_bytes: int | None = None,
    ) -> None:
        self._max_bytes = max_pending_bytes
        self._max_requests = max_pending_requests
        self._max_tensor = max_pending_bytes if max_tensor_bytes is None else min(max_tensor_bytes, max_pending_bytes)
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
            self._bytes -= pending.declared

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
            pending = self._start(key, chunk, count)
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
        last = index == count - 1
        expected = pending.declared - pending.received if last else pending.chunk_bytes
        if len(data) != expected:
            raise InvalidArgument(
                f"request {key}: chunk {index} of {count} carries {len(data)} bytes; the tensor declared in"
                f" chunk 0 ({pending.declared} bytes in chunks of {pending.chunk_bytes}) needs {expected}"
            )
        pending.parts.append(data)
        pending.received += len(data)
        if not last:
            return None
        self.discard(key)
        return tensor_pb2.Tensor(
            dtype=pending.header.dtype, shape=pending.header.shape, data=b"".join(pending.parts)
        )

    def _start(self, key: str, chunk: tensor_pb2.Tensor, count: int) -> _Pending:
        """Checks chunk 0's declared tensor against the limits and reserves its bytes, before buffering."""
        _, shape, declared = check_header(
            chunk, field=f"request {key}: chunked tensor", max_bytes=self._max_tensor
        )
        size = len(chunk.data)
        needed = -(-declared // size) if size else 0
        if size == 0 or size > declared or count != needed:
            raise InvalidArgument(
                f"request {key}: chunk 0 declares shape {shape} ({declared} bytes) in chunk_count={count} chunks"
                f" but carries {size} bytes; every chunk but the last must carry as many bytes as chunk 0,"
                f" so chunk_count must be {needed or 'at least 1 byte per chunk'}"
            )
        if self._bytes + declared > self._max_bytes:
            raise ResourceExhausted(
                f"request {key}: a chunked tensor of {declared} bytes would raise pending chunk bytes from"
                f" {self._bytes} to {self._bytes + declared}, over the limit of {self._max_bytes}; retry later"
            )
        pending = _Pending(header=chunk, count=count, declared=declared, chunk_bytes=size)
        self._pending[key] = pending
        self._bytes += declared
        return pending
