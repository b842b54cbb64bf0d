"""Turns a ForwardRequest into checked stage inputs. Every problem is a clear INVALID_ARGUMENT or
FAILED_PRECONDITION naming the field, so a bad request never reaches the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.errors import FailedPrecondition, InvalidArgument
from services.gen.shardmesh.v1 import worker_pb2
from services.layers import LayerSpan
from services.models.base import StageModel
from services.wire import placement

_ID_DTYPES = (torch.int64, torch.int32)
_HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.int64, torch.int32, torch.bool, torch.uint8)


@dataclass(frozen=True)
class StageInput:
    x: torch.Tensor
    attention_mask: torch.Tensor | None


@dataclass(frozen=True)
class InputLimits:
    max_tensor_bytes: int
    max_positions: int  # longest sequence the model accepts
    vocab_size: int
    hidden_size: int


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


def decode_input(request: worker_pb2.ForwardRequest, stage: StageModel, limits: InputLimits) -> StageInput:
    if not request.HasField("input"):
        raise InvalidArgument("input: missing; send token ids (first stage) or hidden states")
    if stage.is_first:
        x = placement.unpack(
            request.input, field="input", max_bytes=limits.max_tensor_bytes, expect_dtype=_ID_DTYPES, expect_rank=(2,)
        )
        batch, seq = x.shape
        if batch == 0 or seq == 0:
            raise InvalidArgument(f"input: empty token ids (shape {list(x.shape)}); send at least one token")
        if seq > limits.max_positions:
            raise InvalidArgument(
                f"input: {seq} tokens exceed the model's maximum of {limits.max_positions}; shorten the input"
            )
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= limits.vocab_size:
            raise InvalidArgument(f"input: token ids must be in [0, {limits.vocab_size}), got range [{lo}, {hi}]")
        x = x.to(torch.int64)
    else:
        x = placement.unpack(
            request.input, field="input", max_bytes=limits.max_tensor_bytes, expect_dtype=_HIDDEN_DTYPES, expect_rank=(3,)
        )
        batch, seq, hidden = x.shape
        if batch == 0 or seq == 0:
            raise InvalidArgument(f"input: empty hidden states (shape {list(x.shape)})")
        if hidden != limits.hidden_size:
            raise InvalidArgument(f"input: hidden size {hidden} does not match the model's {limits.hidden_size}")
        if x.dtype != stage.dtype:
            x = x.to(stage.dtype)  # reduced wire dtype: upcast before compute
    mask = None
    if request.HasField("attention_mask"):
        mask = placement.unpack(
            request.attention_mask,
            field="attention_mask",
            max_bytes=limits.max_tensor_bytes,
            expect_dtype=_MASK_DTYPES,
            expect_rank=(2,),
        )
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise InvalidArgument(
                f"attention_mask: shape {list(mask.shape)} does not match input's [batch, seq] {list(x.shape[:2])}"
            )
        mask = mask.to(torch.int64)
    return StageInput(x, mask)
