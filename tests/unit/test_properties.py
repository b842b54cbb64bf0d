"""Property-based tests (hypothesis) of the code that meets hostile input first: the tensor codec, the chunk
reassembler, the mesh spec parser and route planning. Each property is what a fuzzer would look for: only the
project's own, specific errors come out, limits hold, and valid input round-trips exactly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.errors import ConfigError, FailedPrecondition, InvalidArgument, ResourceExhausted, ShardmeshError, Unavailable
from services.gen.shardmesh.v1 import tensor_pb2
from services.layers import LayerSpan
from services.localmesh.spec import parse_spec
from services.wire import codec
from services.wire.chunking import Reassembler, split
from router.planning.planner import plan_route
from router.planning.types import WorkerInfo

FAST = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
WIRE_DTYPES = [int(v) for v in tensor_pb2.DType.values()]

dims = st.one_of(st.integers(0, 8), st.integers(-3, 2**63 - 1), st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1]))
tensor_msgs = st.builds(
    lambda dtype, shape, data, handle: tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data, shm_handle=handle),
    st.one_of(st.sampled_from(WIRE_DTYPES), st.integers(0, 2**31 - 1)),
    st.lists(dims, max_size=12),
    st.binary(max_size=256),
    st.sampled_from(["", "", "", "shardmesh-1-" + "0" * 32, "../x"]),
)


@FAST
@given(tensor_msgs, st.integers(0, 1 << 20))
@example(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[0, 2**62, 384]), 0)  # issue 15: stride overflow
@example(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[2**32, 2**32, 0]), 1 << 20)
def test_codec_decode_raises_only_invalid_argument(msg: tensor_pb2.Tensor, max_bytes: int) -> None:
    try:
        out = codec.decode(msg, field="input", max_bytes=max_bytes)
    except InvalidArgument as exc:
        assert "input" in exc.message
        return
    assert out.numel() * out.element_size() == len(msg.data) <= max_bytes
    assert list(out.shape) == list(msg.shape)


@FAST
@given(
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8]),
    st.lists(st.integers(0, 5), min_size=0, max_size=4),
)
def test_codec_round_trips_exactly(dtype: torch.dtype, shape: list[int]) -> None:
    source = (torch.randn(shape) * 100).to(dtype)
    back = codec.decode(codec.encode(source), max_bytes=1 << 20)
    assert back.dtype == dtype and torch.equal(back, source)


@FAST
@given(st.binary(min_size=1, max_size=5000), st.integers(1, 700))
def test_chunks_reassemble_to_the_original(data: bytes, chunk_bytes: int) -> None:
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[len(data)], data=data)
    chunks = split(msg, chunk_bytes)
    assembler = Reassembler(1 << 20, 4)
    results = [assembler.add("r", c) for c in chunks] if len(chunks) > 1 else [msg]
    whole = results[-1]
    assert whole is not None and whole.data == data and list(whole.shape) == [len(data)]
    assert assembler.pending_bytes == 0 and assembler.pending_requests == 0


chunk_msgs = st.builds(
    lambda dtype, shape, data, count, index: tensor_pb2.Tensor(
        dtype=dtype, shape=shape, data=data, chunk_count=count, chunk_index=index
    ),
    st.sampled_from(WIRE_DTYPES),
    st.lists(st.integers(0, 2**40), max_size=4),
    st.binary(max_size=300),
    st.one_of(st.integers(0, 8), st.sampled_from([701, 2**31, 2**32 - 1])),
    st.one_of(st.integers(0, 8), st.sampled_from([2**32 - 1])),
)


@FAST
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), chunk_msgs), max_size=40))
def test_reassembler_stays_within_its_bounds_whatever_arrives(sequence: list[tuple[str, tensor_pb2.Tensor]]) -> None:
    max_bytes, max_requests = 1000, 2
    assembler = Reassembler(max_bytes, max_requests)
    for key, chunk in sequence:
        try:
            assembler.add(key, chunk)
        except (InvalidArgument, ResourceExhausted):
            pass
        assert assembler.pending_bytes <= max_bytes
        assert assembler.pending_requests <= max_requests


spec_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12), st.sampled_from(["0:3", "3:6", "1:1", "a:b", "127.0.0.1:0"])),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.sampled_from(
        ["model", "workers", "layers", "replicas", "listen", "mode", "discovery", "consul", "args", "router", "x"]
    ), children, max_size=5)),
    max_leaves=20,
)


@FAST
@given(st.dictionaries(st.sampled_from(["model", "workers", "mode", "discovery", "consul", "router", "router_args", "worker_args", "bogus"]), spec_values, max_size=6))
def test_mesh_spec_rejects_bad_files_with_config_errors_only(data: dict[str, object]) -> None:
    try:
        parse_spec(data)
    except ConfigError as exc:
        assert exc.message


workers_st = st.lists(
    st.tuples(st.integers(0, 8), st.integers(1, 4), st.sampled_from(["c1", "c2"]), st.integers(6, 8)),
    max_size=8,
)


@FAST
@given(workers_st, st.sets(st.integers(0, 7), max_size=4), st.integers(0, 7))
def test_planned_routes_are_contiguous_or_refused_with_a_reason(
    raw: list[tuple[int, int, str, int]], excluded_idx: set[int], start: int
) -> None:
    workers = [
        WorkerInfo(f"w{i}", f"127.0.0.1:{5000 + i}", "m", "llama", LayerSpan(s, min(s + n, total)), total, checksum)
        for i, (s, n, checksum, total) in enumerate(raw)
        if s < min(s + n, total)
    ]
    excluded = frozenset(f"w{i}" for i in excluded_idx)
    try:
        plan = plan_route(workers, excluded=excluded, start_layer=start)
    except (FailedPrecondition, Unavailable) as exc:
        assert exc.message
        return
    except ShardmeshError as exc:  # pragma: no cover - any other class is a bug in the planner
        pytest.fail(f"unexpected {type(exc).__name__}: {exc}")
    layer = plan.start_layer
    assert layer <= start or not plan.stages
    for stage in plan.stages:
        assert stage.span.start == layer
        assert stage.replicas and all(r.worker_id not in excluded for r in stage.replicas)
        assert len({r.checksum for r in stage.replicas}) == 1
        layer = stage.span.end
    assert layer == plan.total_layers
    assert math.isfinite(plan.hop_count)
