from __future__ import annotations

import pytest
import torch

from services.errors import InvalidArgument, ResourceExhausted
from services.gen.shardmesh.v1 import tensor_pb2
from services.wire import chunking, codec


def _big(numel: int = 10_000) -> tuple[torch.Tensor, tensor_pb2.Tensor]:
    tensor = torch.randn(numel // 100, 100)
    return tensor, codec.encode(tensor)


def test_default_chunk_is_well_below_grpc_default_limit() -> None:
    assert chunking.DEFAULT_CHUNK_BYTES * 2 < 4 * 1024 * 1024


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1000, 39_999])
def test_split_and_reassemble_is_exact(chunk_bytes: int) -> None:
    tensor, msg = _big()
    chunks = chunking.split(msg, chunk_bytes)
    assert len(chunks) == -(-40_000 // chunk_bytes)
    assert chunks[0].dtype == msg.dtype and list(chunks[0].shape) == list(msg.shape)
    assert all(not c.shape and c.dtype == 0 for c in chunks[1:])
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert {c.chunk_count for c in chunks} == {len(chunks)}
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    r = chunking.Reassembler(max_pending_bytes=1 << 20, max_pending_requests=4)
    results = [r.add("req", c) for c in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    whole = results[-1]
    assert whole is not None and whole.chunk_count == 0 and whole.data == msg.data
    assert torch.equal(codec.decode(whole), tensor)
    assert r.pending_bytes == 0 and r.pending_requests == 0


def test_small_tensor_is_returned_unchanged() -> None:
    msg = codec.encode(torch.randn(10))
    assert chunking.split(msg, 40)[0] is msg
    assert len(chunking.split(msg, 40)) == 1
    r = chunking.Reassembler(max_pending_bytes=100, max_pending_requests=1)
    assert r.add("a", msg) is msg


def test_interleaved_keys_reassemble_independently() -> None:
    ta, ma = _big()
    tb, mb = _big(5000)
    ca, cb = chunking.split(ma, 9000), chunking.split(mb, 9000)
    r = chunking.Reassembler(max_pending_bytes=1 << 20, max_pending_requests=2)
    done: dict[str, tensor_pb2.Tensor] = {}
    for i in range(max(len(ca), len(cb))):
        for key, chunks in (("a", ca), ("b", cb)):
            if i < len(chunks) and (out := r.add(key, chunks[i])) is not None:
                done[key] = out
    assert torch.equal(codec.decode(done["a"]), ta) and torch.equal(codec.decode(done["b"]), tb)


@pytest.mark.parametrize(
    ("order", "problem"),
    [
        ([1], "chunk 1 of 4 arrived before chunk 0"),
        ([0, 2], "out-of-order chunk 2 of 4; expected chunk 1"),
        ([0, 1, 1], "duplicate chunk 1 of 4; expected chunk 2"),
        ([0, 0], "duplicate chunk 0 of 4; expected chunk 1"),
    ],
)
def test_bad_order_is_rejected_and_key_dropped(order: list[int], problem: str) -> None:
    _, msg = _big()
    chunks = chunking.split(msg, 10_000)
    r = chunking.Reassembler(max_pending_bytes=1 << 20, max_pending_requests=4)
    for i in order[:-1]:
        r.add("req", chunks[i])
    with pytest.raises(InvalidArgument, match=f"request req: {problem}"):
        r.add("req", chunks[order[-1]])
    assert r.pending_bytes == 0 and r.pending_requests == 0


def test_count_mismatch_is_rejected() -> None:
    _, msg = _big()
    chunks = chunking.split(msg, 10_000)
    r = chunking.Reassembler(max_pending_bytes=1 << 20, max_pending_requests=4)
    r.add("req", chunks[0])
    chunks[1].chunk_count = 5
    with pytest.raises(InvalidArgument, match="chunk_count 5 does not match 4 from chunk 0"):
        r.add("req", chunks[1])
    r.add("req2", chunks[0])
    with pytest.raises(InvalidArgument, match="chunk_count 0 does not match 4"):
        r.add("req2", codec.encode(torch.randn(2)))
    assert r.pending_requests == 0


def test_byte_bound_is_enforced_with_numbers() -> None:
    """The declared size is reserved at chunk 0: a tensor that cannot fit is refused before any buffering."""
    _, msg = _big()
    chunks = chunking.split(msg, 10_000)
    r = chunking.Reassembler(max_pending_bytes=60_000, max_pending_requests=4)
    r.add("a", chunks[0])
    assert r.pending_bytes == 40_000
    with pytest.raises(ResourceExhausted, match="from 40000 to 80000, over the limit of 60000"):
        r.add("b", chunks[0])
    assert r.pending_bytes == 40_000 and r.pending_requests == 1


def test_request_bound_and_discard() -> None:
    _, msg = _big()
    first = chunking.split(msg, 10_000)[0]
    r = chunking.Reassembler(max_pending_bytes=1 << 20, max_pending_requests=2)
    r.add("a", first)
    r.add("b", first)
    with pytest.raises(ResourceExhausted, match=r"2 chunked tensors already pending \(limit 2\)"):
        r.add("c", first)
    assert r.pending_requests == 2 and r.pending_bytes == 80_000
    r.discard("a")
    r.discard("missing")
    assert r.pending_bytes == 40_000
    assert r.add("c", first) is None


def test_split_rejects_nonpositive_chunk() -> None:
    with pytest.raises(ValueError):
        chunking.split(codec.encode(torch.randn(2)), 0)


def _bomb(declared_numel: int, chunk_count: int, chunk_data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[declared_numel], data=chunk_data, chunk_count=chunk_count, chunk_index=0
    )


def test_chunk_bomb_is_refused_at_chunk_zero() -> None:
    """Issue 15: chunk 0 declares a 3 KB tensor with chunk_count=701 (and 1 MiB chunks follow)."""
    r = chunking.Reassembler(max_pending_bytes=1 << 30, max_pending_requests=4, max_tensor_bytes=256 << 20)
    with pytest.raises(InvalidArgument, match=r"declares shape \[768\] \(3072 bytes\) in chunk_count=701 chunks"):
        r.add("bomb", _bomb(768, 701, bytes(1 << 20)))
    with pytest.raises(InvalidArgument, match="chunk_count must be 768"):
        r.add("bomb", _bomb(768, 701, bytes(4)))
    assert r.pending_bytes == 0 and r.pending_requests == 0


def test_declared_tensor_over_the_limit_is_refused_naming_it() -> None:
    r = chunking.Reassembler(max_pending_bytes=1 << 30, max_pending_requests=4, max_tensor_bytes=1 << 20)
    with pytest.raises(InvalidArgument, match="exceeds the limit of 1048576 bytes.*--max-tensor-mb"):
        r.add("big", _bomb(1 << 20, 4, bytes(1 << 20)))
    assert r.pending_bytes == 0


def test_chunks_cannot_carry_more_than_declared() -> None:
    _, msg = _big()
    chunks = chunking.split(msg, 10_000)
    r = chunking.Reassembler(max_pending_bytes=1 << 20, max_pending_requests=4)
    r.add("req", chunks[0])
    chunks[1].data = bytes(20_000)
    with pytest.raises(InvalidArgument, match="chunk 1 of 4 carries 20000 bytes.*needs 10000"):
        r.add("req", chunks[1])
    assert r.pending_bytes == 0 and r.pending_requests == 0


def test_stream_assembler_budget_follows_the_tensor_limit() -> None:
    """Per stream: as many whole tensors of the limit as a sender interleaves (4), no more."""
    from services.gen.shardmesh.v1 import worker_pb2
    from services.transport.chunked import MessageAssembler, split_message

    assembler: MessageAssembler[worker_pb2.ForwardRequest] = MessageAssembler(max_tensor_bytes=40_000)
    msg = codec.encode(torch.randn(100, 100))  # 40 000 bytes: exactly the limit
    heads = [split_message(worker_pb2.ForwardRequest(request_id=f"r{i}", input=msg), 10_000)[0] for i in range(5)]
    for head in heads[:4]:
        assert assembler.add(head) is None
    with pytest.raises(ResourceExhausted, match="over the limit of 160000"):
        assembler.add(heads[4])
