"""Checks on what a stage receives: remote input must fail as InvalidArgument, never as a torch traceback."""

from __future__ import annotations

import torch

from services.errors import InvalidArgument


def check_stage_input(
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    is_first: bool,
    hidden_size: int,
    vocab_size: int,
    dtype: torch.dtype,
) -> None:
    """Validates shapes, dtypes and token ids of a stage's input (token ids on stage 0, hidden states after)."""
    if is_first:
        if x.dim() != 2 or x.dtype != torch.int64:
            raise InvalidArgument(
                f"the first stage takes int64 token ids [batch, seq]; got {x.dtype} with shape {list(x.shape)}"
            )
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
            raise InvalidArgument(f"token ids must lie in [0, {vocab_size}); got {int(x.min())}..{int(x.max())}")
    elif x.dim() != 3 or x.shape[-1] != hidden_size or x.dtype != dtype:
        raise InvalidArgument(
            f"this stage takes {dtype} hidden states [batch, seq, {hidden_size}]; "
            f"got {x.dtype} with shape {list(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InvalidArgument(f"empty input of shape {list(x.shape)}: need at least one sequence and one token")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(x.shape[:2]):
        raise InvalidArgument(
            f"attention_mask shape {list(attention_mask.shape)} does not match the input's [batch, seq] "
            f"{list(x.shape[:2])}"
        )
