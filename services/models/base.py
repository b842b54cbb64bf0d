"""Interfaces shared by every model adapter. Pure types: no I/O at import time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

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
