"""Llama stage: transformers' own Llama modules over a layer range; the last stage returns logits.

Bit-identical to ``LlamaForCausalLM.from_pretrained(dir)(input_ids, attention_mask).logits`` because the
stage runs the same modules (``LlamaDecoderLayer``, ``LlamaRotaryEmbedding``, ``LlamaRMSNorm``), builds the
mask with ``create_causal_mask`` the way ``LlamaModel.forward`` does, and uses the ``sdpa`` attention that
``from_pretrained`` selects by default. Rotary embeddings and the mask are computed inside every stage
from explicit position ids, so nothing but hidden states travels between stages.
"""

from __future__ import annotations

from typing import Any

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from services.errors import InvalidArgument
from services.layers import LayerSpan
from services.models.base import SpanStage, ModelSource
from services.models.interrupt import checkpoint
from services.models.kv_cache import LeftPaddedBatchCache, SessionCache, kv_bytes_per_token
from services.models.weights import WeightReader, assert_materialised, count_parameters, load_module

# What transformers' from_pretrained picks for LlamaForCausalLM when nothing is asked for.
ATTN_IMPLEMENTATION = "sdpa"
_PREFIX = "model."

# One decode step of one session: (token ids [1, 1] or hidden [1, 1, hidden], its cache, its position).
DecodeInput = tuple[torch.Tensor, SessionCache, int]


def load_llama_config(model_dir: str) -> LlamaConfig:
    config = LlamaConfig.from_pretrained(model_dir, local_files_only=True)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


class LlamaStage(SpanStage):
    """Layers ``span`` of a Llama decoder; stage 0 embeds tokens, the last stage applies norm + lm_head.

    Decoder layers are numbered locally (0..len(span)-1) so a per-stage KV cache holds exactly this
    stage's layers; :meth:`run` is the entry point for cached, offset decoding.
    """

    def __init__(self, source: ModelSource, span: LayerSpan, dtype: torch.dtype = torch.float32) -> None:
        self.source = source
        self.span = span
        self.dtype = dtype
        self.config = load_llama_config(str(source.model_dir))
        config = self.config
        reader = WeightReader(source.model_dir)
        with torch.device("meta"):
            self.embed_tokens = (
                nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id) if self.is_first else None
            )
            self.layers = nn.ModuleList(LlamaDecoderLayer(config, layer_idx=local) for local in range(len(span)))
            self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if self.is_last else None
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if self.is_last else None
        self.rotary_emb = LlamaRotaryEmbedding(config=config)  # buffers only: built for real, on the CPU
        if self.embed_tokens is not None:
            load_module(self.embed_tokens, reader, f"{_PREFIX}embed_tokens.", dtype)
        for local, layer in enumerate(self.layers):
            load_module(layer, reader, f"{_PREFIX}layers.{span.start + local}.", dtype)
        if self.norm is not None and self.lm_head is not None:
            load_module(self.norm, reader, f"{_PREFIX}norm.", dtype)
            self._load_lm_head(self.lm_head, reader)
        for module in self._modules():
            module.eval()
            assert_materialised(module, f"Llama stage {span}")

    def _load_lm_head(self, lm_head: nn.Linear, reader: WeightReader) -> None:
        if not self.config.tie_word_embeddings:
            load_module(lm_head, reader, "lm_head.", self.dtype)
        elif self.embed_tokens is not None:  # one stage holds both ends: share the one tensor, as HF ties it
            lm_head.weight = self.embed_tokens.weight
        else:  # tied, but the embeddings live on stage 0: read the same tensor for the head
            load_module(lm_head, reader, f"{_PREFIX}embed_tokens.", self.dtype)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.check_input(x, attention_mask)
        position_ids = torch.arange(x.shape[1]).unsqueeze(0)
        return self.run(x, attention_mask, position_ids=position_ids)

    def run(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        last_logits_only: bool = False,
        logit_rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Runs the stage at explicit positions, optionally appending to ``cache``.

        ``position_ids``: ``[1 or batch, seq]`` absolute positions of ``x``'s tokens (``offset + arange``).
        ``cache``: this stage's KV cache (local layer indices); ``attention_mask`` then covers past + new tokens.
        ``last_logits_only``: the last stage applies the head to the last position only (as ``generate`` does);
        ``logit_rows``: to these positions of ``x`` only (a chunked replay: each replayed step's last position).
        """
        with torch.inference_mode():
            hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
            hidden = self._layers(hidden, mask, position_ids, cache)
            if self.norm is None or self.lm_head is None:
                return hidden
            normed = self.norm(hidden)
            if logit_rows is not None:
                return self.lm_head(normed[:, list(logit_rows), :])
            return self.lm_head(normed[:, -1:, :] if last_logits_only else normed)

    def _layers(self, hidden: torch.Tensor, mask: Any, position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """This stage's decoder layers, as LlamaModel runs them (one rotary table for all layers)."""
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            checkpoint()  # a cancelled or timed-out request stops here, between layers
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,  # a Cache, or the duck-typed LeftPaddedBatchCache (update only)
                use_cache=cache is not None,
            )
        checkpoint()
        return hidden

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token costs on this stage (keys + values of its layers), for admission checks."""
        config = self.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        return kv_bytes_per_token(len(self.layers), kv_heads, head_dim, self.dtype)

    def step(
        self,
        x: torch.Tensor,
        *,
        session_cache: SessionCache,
        position: int,
        all_logits: bool = False,
        logit_rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Prefill (``T > 1``) or decode (``T == 1``) of one session at positions ``position..position+T-1``.

        ``x``: token ids ``[1, T]`` on the first stage, else hidden ``[1, T, hidden]``. Refuses a ``position``
        that is not the cache's length (FailedPrecondition). Returns hidden ``[1, T, hidden]``; the last stage
        returns logits of the last position only, ``[1, 1, vocab]`` (what sampling needs, and what
        ``generate`` computes: bit-identical to it), of every position with ``all_logits``, or of the positions
        ``logit_rows`` (indices into ``x``) in that order.
        On any failure the cache is rolled back, so the step can be retried at the same position.
        """
        self._check_step_input(x, session_cache, position)
        tokens = x.shape[1]
        position_ids = torch.arange(position, position + tokens).unsqueeze(0)
        try:
            output = self.run(
                x, None, position_ids=position_ids, cache=session_cache.cache, last_logits_only=not all_logits,
                logit_rows=logit_rows,
            )
        except BaseException:
            session_cache.rollback(position)
            raise
        session_cache.advance(tokens)
        return output

    def step_batch(self, inputs: Sequence[DecodeInput]) -> list[torch.Tensor]:
        """Decode steps (one token each) of several sessions in one forward pass.

        Each session's cache ends as after its own :meth:`step`. Outputs agree with solo steps up to
        float32 rounding, not bit for bit: a matrix product over a batch of rows sums in a different
        order than over one row (SmolLM2: logits within 1e-4, same greedy tokens in the tests).
        """
        if len(inputs) <= 1:
            return [self.step(x, session_cache=cache, position=pos) for x, cache, pos in inputs]
        sessions = [cache for _, cache, _ in inputs]
        if len({id(s) for s in sessions}) != len(sessions):
            raise InvalidArgument("a session may appear only once in a batch of decode steps")
        for x, cache, position in inputs:
            self._check_step_input(x, cache, position)
            if x.shape[1] != 1:
                raise InvalidArgument(f"batched steps decode one token each; got {x.shape[1]} tokens")
        positions = [cache.position for cache in sessions]
        batch_cache = LeftPaddedBatchCache(sessions)
        try:
            output = self._run_decode_batch(torch.cat([x for x, _, _ in inputs]), positions, batch_cache)
        except BaseException:
            for cache, position in zip(sessions, positions, strict=True):
                cache.rollback(position)
            raise
        for cache in sessions:
            cache.advance(1)
        return list(output.split(1))

    def prefill_batch(self, inputs: Sequence[tuple[torch.Tensor, SessionCache]]) -> list[torch.Tensor]:
        """Prefills (position 0) of several empty sessions in one forward pass, right-padded to the longest.

        Padding sits after each row's last token, so the causal mask alone keeps it out of every real
        position (nothing real attends to a later position); each session's cache gets its own rows'
        first ``T_i`` keys and values. Outputs are each row's own ``[1, T_i, hidden]``, or on the last
        stage the logits of its last real position ``[1, 1, vocab]``, as :meth:`step` returns them. They
        agree with solo prefills up to float rounding (a batched matrix product sums in another order).
        """
        if len(inputs) <= 1:
            return [self.step(x, session_cache=cache, position=0) for x, cache in inputs]
        sessions = [cache for _, cache in inputs]
        if len({id(s) for s in sessions}) != len(sessions):
            raise InvalidArgument("a session may appear only once in a batch of prefills")
        for x, cache in inputs:
            self._check_step_input(x, cache, 0)
        lengths = [int(x.shape[1]) for x, _ in inputs]
        width = max(lengths)
        rows = [torch.nn.functional.pad(x, (0, width - x.shape[1]) if x.dim() == 2 else (0, 0, 0, width - x.shape[1]))
                for x, _ in inputs]
        batch_cache = DynamicCache()
        try:
            with torch.inference_mode():
                x = torch.cat(rows)
                position_ids = torch.arange(width).unsqueeze(0).expand(len(rows), width)
                hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
                mask = create_causal_mask(
                    config=self.config, inputs_embeds=hidden, attention_mask=None, cache=batch_cache,
                    position_ids=position_ids,
                )
                hidden = self._layers(hidden, mask, position_ids, batch_cache)
                layer_kv = [(layer.keys, layer.values) for layer in batch_cache.layers]
                for row, (cache, n) in enumerate(zip(sessions, lengths, strict=True)):
                    cache.restore([(k[row : row + 1, :, :n].clone(), v[row : row + 1, :, :n].clone()) for k, v in layer_kv])
                if self.norm is None or self.lm_head is None:
                    return [hidden[row : row + 1, :n] for row, n in enumerate(lengths)]
                last = torch.stack([hidden[row, n - 1] for row, n in enumerate(lengths)]).unsqueeze(1)
                return list(self.lm_head(self.norm(last)).split(1))
        except BaseException:
            for cache in sessions:
                cache.rollback(0)
            raise

    def _run_decode_batch(
        self, x: torch.Tensor, positions: list[int], batch_cache: LeftPaddedBatchCache
    ) -> torch.Tensor:
        with torch.inference_mode():
            hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
            position_ids = torch.tensor(positions).unsqueeze(1)
            hidden = self._layers(hidden, batch_cache.attention_mask(), position_ids, batch_cache)
            if self.norm is None or self.lm_head is None:
                return hidden
            return self.lm_head(self.norm(hidden))

    def _check_step_input(self, x: torch.Tensor, session_cache: SessionCache, position: int) -> None:
        self.check_input(x, None)
        if x.shape[0] != 1:
            raise InvalidArgument(f"a session step takes one sequence; got a batch of {x.shape[0]}")
        session_cache.check_position(position)
        limit = self.config.max_position_embeddings
        if position + x.shape[1] > limit:
            raise InvalidArgument(
                f"session {session_cache.session_id!r} would reach {position + x.shape[1]} tokens; "
                f"the model supports {limit}"
            )

    def parameter_count(self) -> int:
        return count_parameters(self._modules())

    def _modules(self) -> list[nn.Module]:
        return [m for m in (self.embed_tokens, self.layers, self.norm, self.lm_head) if m is not None]
