"""Chunking of Forward messages on streams: a large inline tensor travels as several messages.

The first message of a request carries every field and chunk 0 of its tensor; the following ones
carry only the request id and the next chunk. Receivers reassemble (bounded) before handling.
Shared-memory tensors are never chunked: only their handle travels.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from services.gen.shardmesh.v1 import worker_pb2
from services.transport.stream_writer import MAX_INTERLEAVED
from services.wire.chunking import DEFAULT_CHUNK_BYTES, Reassembler, split

M = TypeVar("M", worker_pb2.ForwardRequest, worker_pb2.ForwardResponse)

# Bounds on partially received tensors per stream: beyond them the request fails with RESOURCE_EXHAUSTED.
MAX_PENDING_BYTES = 1 << 30
MAX_PENDING_REQUESTS = 256


def _field(msg: worker_pb2.ForwardRequest | worker_pb2.ForwardResponse) -> str:
    return "input" if isinstance(msg, worker_pb2.ForwardRequest) else "output"


def split_message(msg: M, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[M]:
    name = _field(msg)
    if not msg.HasField(name):
        return [msg]
    chunks = split(getattr(msg, name), chunk_bytes)
    if len(chunks) == 1:
        return [msg]
    head = type(msg)()
    head.CopyFrom(msg)
    getattr(head, name).CopyFrom(chunks[0])
    parts = [head]
    for chunk in chunks[1:]:
        part = type(msg)(request_id=msg.request_id)
        getattr(part, name).CopyFrom(chunk)
        parts.append(part)
    return parts


class MessageAssembler(Generic[M]):
    """Collects the chunks of each request id; returns the whole message once complete.

    ``max_tensor_bytes`` is the receiver's tensor limit (the worker's --max-tensor-mb): a chunk 0 that
    declares more is refused before anything is buffered. A stream then holds at most as many partial
    tensors' bytes as a sender interleaves whole tensors (``MAX_INTERLEAVED``), and never over 1 GiB.
    """

    def __init__(self, max_tensor_bytes: int | None = None) -> None:
        budget = MAX_PENDING_BYTES if max_tensor_bytes is None else min(MAX_PENDING_BYTES, MAX_INTERLEAVED * max_tensor_bytes)
        self._tensors = Reassembler(budget, MAX_PENDING_REQUESTS, max_tensor_bytes)
        self._heads: dict[str, M] = {}

    def add(self, msg: M) -> M | None:
        name = _field(msg)
        tensor = getattr(msg, name)
        if not msg.HasField(name) or tensor.chunk_count <= 1:
            return msg
        key = msg.request_id
        if tensor.chunk_index == 0:
            self._heads[key] = msg
        try:
            whole = self._tensors.add(key, tensor)
        except Exception:
            self._heads.pop(key, None)
            raise
        if whole is None:
            return None
        head = self._heads.pop(key)
        getattr(head, name).CopyFrom(whole)
        return head

    def discard(self, request_id: str) -> None:
        self._heads.pop(request_id, None)
        self._tensors.discard(request_id)
