"""Turns a ForwardRequest into checked stage inputs. Every problem is a clear INVALID_ARGUMENT or
FAILED_PRECONDITION naming the field, so a bad request never reaches the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.errors import FailedPrecondition, InvalidArgument
from services.gen.shardmesh.v1 import tensor_pb2, worker_pb2
from services.layers import LayerSpan
from services.models.base import StageModel
from services.wire import codec, placement

_ID_DTYPES = (torch.int64, torch.int32)
_HIDDEN_DTYPES = codec.ACTIVATION_DTYPES
_MASK_DTYPES = (torch.int64, torch.int32, torch.bool, torch.uint8)


@dataclass(frozen=True)
class StageInput:
    x: torch.Tensor
    attention_mask: torch.Tensor | None


def check_plan(request: worker_pb2.ForwardRequest, span: LayerSpan, checksum: str, worker_id: str) -> None:
    """Refuses requests planned for another layer range or another model version."""
    if request.HasField("layers") and (request.layers.start, request.layers.end) != (span.start, span.end):
        raise FailedPrecondition(
            f"worker {worker_id} holds layers {span}, but the request was planned for "
            f"{request.layers.start}:{request.layers.end}; refresh the route"
        )
    if request.model_checksum and request.model_checksum != checksum:
        raise FailedPrecondition(
            f"worker {worker_id} serves model checksum {checksum[:12]}, but the request was planned for "
            f"{request.model_checksum[:12]}; the workers disagree on the model"
        )


def decode_input(request: worker_pb2.ForwardRequest, stage: StageModel, max_tensor_bytes: int) -> StageInput:
    """Wire-level checks here (dtype, rank, byte length, size limit); the stage checks the values."""
    if not request.HasField("input"):
        raise InvalidArgument("input: missing; send token ids (first stage) or hidden states")
    x = placement.unpack(
        request.input,
        field="input",
        max_bytes=max_tensor_bytes,
        expect_dtype=_ID_DTYPES if stage.is_first else _HIDDEN_DTYPES,
        expect_rank=(2,) if stage.is_first else (3,),
        request_id=request.request_id,  # a shared-memory input must have been made for this request
    )
    # Token ids are int64 inside the model; reduced wire dtypes are upcast before compute.
    x = x.to(torch.int64) if stage.is_first else x.to(stage.dtype)
    mask = None
    if request.HasField("attention_mask"):
        mask = placement.unpack(
            request.attention_mask,
            field="attention_mask",
            max_bytes=max_tensor_bytes,
            expect_dtype=_MASK_DTYPES,
            expect_rank=(2,),
            request_id=request.request_id,
        ).to(torch.int64)
    try:
        stage.check_input(x, mask)
    except InvalidArgument as exc:
        raise InvalidArgument(f"input: {exc}") from None
    return StageInput(x, mask)


def replay_lengths(request: worker_pb2.ForwardRequest, x: torch.Tensor) -> list[int]:
    """The steps a replay request carries (``replay_step_lengths``), checked against its input; [] for a plain request.

    Each length is a step of at least one token and together they cover the input exactly, so the count
    is bounded by the input's sequence length (itself bounded by the size limit and the model's context).
    """
    lengths = [int(n) for n in request.replay_step_lengths]
    if not lengths:
        return []
    if not request.session_id:
        raise InvalidArgument("replay_step_lengths: only for a generation session; set session_id or leave it empty")
    empty = next((i for i, n in enumerate(lengths) if n <= 0), None)
    if empty is not None:
        raise InvalidArgument(f"replay_step_lengths[{empty}]: 0 tokens; every step needs at least one")
    tokens = int(x.shape[1])
    if sum(lengths) != tokens:
        raise InvalidArgument(
            f"replay_step_lengths: the {len(lengths)} steps sum to {sum(lengths)} tokens but input holds {tokens}; "
            "they must cover the input's sequence dimension exactly"
        )
    return lengths


def reply_dtype(request: worker_pb2.ForwardRequest, default: torch.dtype) -> torch.dtype:
    """The dtype for a non-final output: activations are floating point, so only float32/float16/bfloat16."""
    if not request.reply_dtype:
        return default
    try:
        dtype = codec.dtype_from_wire(request.reply_dtype)
    except InvalidArgument:
        dtype = None
    if dtype not in codec.ACTIVATION_DTYPES:
        allowed = ", ".join(codec.dtype_name(d) for d in codec.ACTIVATION_DTYPES)
        wire = request.reply_dtype
        name = tensor_pb2.DType.Name(wire) if wire in tensor_pb2.DType.values() else str(wire)
        raise InvalidArgument(f"reply_dtype: {name} is not an activation dtype; use one of {allowed} (or leave it unset)")
    return dtype
