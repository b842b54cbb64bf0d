"""Interfaces shared by every model adapter. Pure types: no I/O at import time."""

from __future__ import annotations

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
