"""Interfaces shared by every model adapter. Pure types: no I/O at import time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from services.errors import InvalidArgument
from services.layers import LayerSpan


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where its files are and what it is, before any weights are read."""

    model_id: str  # built-in name ("minilm", "tiny-llama", "smollm2") or the directory's name
    model_dir: Path  # Hugging Face layout: config.json, *.safetensors, tokenizer.json
    architecture: str  # "bert" | "llama"
    total_layers: int
    hidden_size: int
    vocab_size: int
    checksum: str  # sha256 over config + every weight file: equal checksums = identical model


class StageModel(Protocol):
    """One contiguous layer range of a model, ready to run.

    Stage 0 owns the embeddings; the last stage owns the final norm / head / pooling. A stage that is
    both runs the whole model. Inputs are never modified in place (they may share received bytes).
    """

    source: ModelSource
    span: LayerSpan
    dtype: torch.dtype

    @property
    def is_first(self) -> bool: ...

    @property
    def is_last(self) -> bool: ...

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Runs this stage.

        ``x``: int64 token ids ``[batch, seq]`` on the first stage, else hidden states ``[batch, seq, hidden]``.
        ``attention_mask``: ``[batch, seq]`` of 0/1 (None = all ones).
        Returns hidden states ``[batch, seq, hidden]``, or on the last stage the model output:
        bert -> sentence embedding ``[batch, hidden]`` exactly as sentence-transformers computes it;
        llama -> logits ``[batch, seq, vocab]``.
        """
        ...

    def forward_batch(self, inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        """Runs several requests' inputs as one forward (dynamic batching); one output per input, as
        :meth:`forward` would return it up to float rounding. One input: exactly :meth:`forward`."""
        ...

    def parameter_count(self) -> int:
        """Number of parameters this stage materialised (only its own layers' weights)."""
        ...

    def check_input(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Raises InvalidArgument for input this stage cannot take (shape, dtype, token range, length)."""
        ...


class SpanStage:
    """What every stage adapter shares: where its span sits in the model, and the input check it applies."""

    source: ModelSource
    span: LayerSpan
    dtype: torch.dtype
    config: Any  # the transformers config of the model

    @property
    def is_first(self) -> bool:
        return self.span.start == 0

    @property
    def is_last(self) -> bool:
        return self.span.end == self.source.total_layers

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward_batch(self, inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        """Dynamic batching: the requests right-padded into one forward, then split back (:func:`pad_batch`).

        A single input runs :meth:`forward` unchanged, so a request that found no batch-mates is
        bit-identical to one process. Inputs must share dtype and hidden size (the engine's batch key).
        """
        if len(inputs) == 1:
            x, mask = inputs[0]
            return [self.forward(x, mask)]
        x, mask, shapes = pad_batch(inputs)
        return split_batch(self.forward(x, mask), shapes, int(x.shape[1]))

    def check_input(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Remote input must fail as InvalidArgument before it reaches a torch op."""
        from services.models.inputs import check_stage_input

        check_stage_input(
            x,
            attention_mask,
            is_first=self.is_first,
            hidden_size=self.config.hidden_size,
            vocab_size=self.config.vocab_size,
            dtype=self.dtype,
        )
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and x.shape[1] > limit:
            raise InvalidArgument(
                f"{x.shape[1]} tokens exceed the model's maximum of {limit} (max_position_embeddings); shorten the input"
            )


def pad_batch(
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, int]]]:
    """Concatenates requests along the batch dimension, right-padding each to the longest length.

    Padded positions get token id 0 / zero hidden states and attention-mask 0, so no real token attends
    to them (BERT: the padding mask; Llama: causal order already puts them after every real token, and
    the mask covers them too). The mask is None only when nothing is padded and no request sent one,
    so such a batch runs the same kernels as the requests alone. Returns (x, mask, (rows, length) each).
    """
    longest = max(x.shape[1] for x, _ in inputs)
    shapes = [(int(x.shape[0]), int(x.shape[1])) for x, _ in inputs]
    need_mask = any(m is not None for _, m in inputs) or any(length != longest for _, length in shapes)
    xs, masks = [], []
    for (x, mask), (rows, length) in zip(inputs, shapes, strict=True):
        pad = longest - length
        if pad:
            filler = x.new_zeros((rows, pad, *x.shape[2:]))
            x = torch.cat([x, filler], dim=1)
        xs.append(x)
        if need_mask:
            full = mask if mask is not None else torch.ones((rows, length), dtype=torch.int64)
            masks.append(torch.cat([full, full.new_zeros((rows, pad))], dim=1) if pad else full)
    return torch.cat(xs), (torch.cat(masks) if need_mask else None), shapes


def split_batch(output: torch.Tensor, shapes: Sequence[tuple[int, int]], padded_length: int) -> list[torch.Tensor]:
    """Undoes :func:`pad_batch` on a stage output: rows back to their request, padding stripped.

    Per-token outputs ``[batch, seq, ...]`` lose their padded positions; pooled ones (BERT's last stage,
    ``[batch, hidden]``) only split by rows. Each piece is contiguous (it is serialised on its own).
    """
    per_token = output.dim() >= 3 and output.shape[1] == padded_length
    pieces, start = [], 0
    for rows, length in shapes:
        piece = output[start : start + rows]
        if per_token and length != padded_length:
            piece = piece[:, :length]
        pieces.append(piece.contiguous())
        start += rows
    return pieces
