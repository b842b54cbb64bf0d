"""BERT stage: transformers' own BERT modules over a layer range, plus sentence-transformers pooling.

Bit-identical to ``SentenceTransformer(model_dir).encode`` because every numeric step is the same code or
the same ops in the same order: ``BertEmbeddings``/``BertLayer`` from transformers, the mask from
``create_bidirectional_mask`` exactly as ``BertModel`` builds it, the ``sdpa`` attention that
``from_pretrained`` selects by default, and pooling / normalisation copied op for op from
sentence-transformers' ``Pooling._forward_padded`` and ``Normalize``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

from services.errors import ConfigError
from services.layers import LayerSpan
from services.models.base import SpanStage, ModelSource
from services.models.interrupt import checkpoint
from services.models.sentence_config import read_sentence_config
from services.models.weights import WeightReader, assert_materialised, count_parameters, load_module

# What transformers' from_pretrained picks for BertModel when nothing is asked for (and so what
# SentenceTransformer runs); the stage must use the same kernel to be bit-identical.
ATTN_IMPLEMENTATION = "sdpa"


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor | None, modes: tuple[str, ...]) -> torch.Tensor:
    """sentence-transformers' ``Pooling._forward_padded`` for the supported modes, same ops in the same order."""
    if attention_mask is None:
        attention_mask = torch.ones(token_embeddings.shape[:-1], dtype=torch.int64)
    accumulation_dtype = (
        torch.float32 if token_embeddings.dtype in (torch.float16, torch.bfloat16) else token_embeddings.dtype
    )
    outputs: list[torch.Tensor] = []
    for mode in modes:
        if mode == "cls":
            hidden_dim = token_embeddings.shape[-1]
            first = attention_mask.to(torch.int).argmax(dim=1)
            outputs.append(torch.gather(token_embeddings, 1, first.view(-1, 1, 1).expand(-1, 1, hidden_dim)).squeeze(1))
        elif mode == "max":
            mask = attention_mask.unsqueeze(-1).expand_as(token_embeddings).to(token_embeddings.dtype)
            outputs.append(token_embeddings.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
            mean_sum = (token_embeddings * mask).sum(dim=1, dtype=accumulation_dtype)
            mean_mask = torch.clamp(mask.sum(dim=1, dtype=accumulation_dtype), min=1e-9)
            denominator = mean_mask if mode == "mean" else torch.sqrt(mean_mask)
            outputs.append((mean_sum / denominator).to(token_embeddings.dtype))
        elif mode == "lasttoken":
            _, seq_len, hidden_dim = token_embeddings.shape
            values, indices = attention_mask.flip(1).max(1)
            indices = torch.where(values == 0, seq_len - 1, indices)
            gather = (seq_len - indices - 1).view(-1, 1, 1).expand(-1, 1, hidden_dim)
            mask = attention_mask.unsqueeze(-1).expand_as(token_embeddings).to(token_embeddings.dtype)
            outputs.append(torch.gather(token_embeddings * mask, 1, gather).squeeze(dim=1))
    return torch.cat(outputs, dim=-1)


def load_bert_config(model_dir: Path) -> BertConfig:
    config = BertConfig.from_pretrained(str(model_dir), local_files_only=True)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def _weight_prefix(reader: WeightReader) -> str:
    """``""`` for BertModel checkpoints, ``"bert."`` for task-head checkpoints (BertForMaskedLM, ...)."""
    for prefix in ("", "bert."):
        if f"{prefix}encoder.layer.0.attention.self.query.weight" in reader:
            return prefix
    raise ConfigError(f"{reader.model_dir} does not look like a BERT checkpoint (no encoder.layer.0 weights)")


class BertStage(SpanStage):
    """Layers ``span`` of a BERT encoder; stage 0 embeds, the last stage pools (and normalises)."""

    def __init__(self, source: ModelSource, span: LayerSpan, dtype: torch.dtype = torch.float32) -> None:
        self.source = source
        self.span = span
        self.dtype = dtype
        self.config = load_bert_config(source.model_dir)
        self.sentence = read_sentence_config(source.model_dir)
        reader = WeightReader(source.model_dir)
        prefix = _weight_prefix(reader)
        with torch.device("meta"):
            self.embeddings = BertEmbeddings(self.config) if self.is_first else None
            self.layers = nn.ModuleList(BertLayer(self.config, layer_idx=i) for i in range(span.start, span.end))
        if self.embeddings is not None:
            load_module(self.embeddings, reader, f"{prefix}embeddings.", dtype)
            # Non-persistent buffers, rebuilt exactly as BertEmbeddings.__init__ makes them.
            self.embeddings.position_ids = torch.arange(self.config.max_position_embeddings).expand((1, -1))
            self.embeddings.token_type_ids = torch.zeros(self.embeddings.position_ids.size(), dtype=torch.long)
        for offset, layer in enumerate(self.layers):
            load_module(layer, reader, f"{prefix}encoder.layer.{span.start + offset}.", dtype)
        for module in self._modules():
            module.eval()
            assert_materialised(module, f"BERT stage {span}")

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.check_input(x, attention_mask)
        with torch.inference_mode():
            hidden = self.embeddings(input_ids=x) if self.embeddings is not None else x
            # BertModel._create_attention_masks for an encoder: None when nothing is padded, else a 4-D bool mask.
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
            for layer in self.layers:
                checkpoint()  # a cancelled or timed-out request stops here, between layers
                hidden = layer(hidden, mask)
            checkpoint()
            if not self.is_last:
                return hidden
            embedding = pool(hidden, attention_mask, self.sentence.pooling_modes)
            return F.normalize(embedding, p=2, dim=-1) if self.sentence.normalize else embedding

    def parameter_count(self) -> int:
        return count_parameters(self._modules())

    def _modules(self) -> list[nn.Module]:
        return [m for m in (self.embeddings, self.layers) if m is not None]
