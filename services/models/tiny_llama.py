"""Seeded tiny Llama models generated on first use, for tests and benchmarks without downloads.

Weights come from numpy's PCG64 uniform stream (integer based, so bit-identical on every machine and
process) rather than from torch or transformers initialisers, whose output can change between versions
or CPU kernels. Files are written to a temporary directory and renamed into place, so processes racing
at first use either win the rename or discard their copy; a present directory is always complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_SPECIAL_TOKENS = [UNK, BOS, EOS]  # ids 0, 1, 2 as in Llama tokenizers

# Fixed training text for the byte-level BPE (merges only; any text still tokenises byte by byte).
_TOKENIZER_CORPUS = """The quick brown fox jumps over the lazy dog.
A mesh of shard workers serves one model split into contiguous layer ranges.
Each worker holds only its own layers and forwards hidden states to the next hop.
Hello world! How are you today? I am fine, thank you very much.
Machine learning models transform text into numbers and numbers back into text.
Once upon a time there was a little language model that wanted to write stories.
The router plans a route through the cluster, picks healthy replicas and retries on failure.
Tokens, embeddings, attention, feed-forward networks, normalisation and logits.
Python, Rust, Go, C++ and JavaScript are programming languages used by engineers.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday make a week.
January February March April May June July August September October November December.
Zero one two three four five six seven eight nine ten hundred thousand million.
Please generate a short answer; the server streams tokens back while it decodes.
Water, fire, earth and air; red, green, blue, yellow, black and white colours.
"""


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape and seed of a generated model; ``name`` is its cache directory (bump the version on change)."""

    name: str
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    seed: int = 20240501
    init_std: float = 0.02

    def config_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": _SPECIAL_TOKENS.index(BOS),
            "eos_token_id": _SPECIAL_TOKENS.index(EOS),
            "initializer_range": self.init_std,
            "dtype": "float32",
            "use_cache": True,
        }


TINY_LLAMA = TinyLlamaSpec(name="tiny-llama-v1")
# Same recipe, wide enough for compute to dominate in benchmarks (~25M parameters, ~100 MB).
TINY_LLAMA_WIDE = TinyLlamaSpec(
    name="tiny-llama-wide-v1", hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=4
)


def ensure_tiny_llama(models_dir: Path, spec: TinyLlamaSpec = TINY_LLAMA) -> Path:
    """Returns ``models_dir/spec.name``, generating it first if absent (safe under concurrent callers)."""
    target = models_dir / spec.name
    if (target / "config.json").is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = models_dir / f".{spec.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        _write_model(staging, spec)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real error
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_model(directory: Path, spec: TinyLlamaSpec) -> None:
    (directory / "config.json").write_text(json.dumps(spec.config_dict(), indent=2, sort_keys=True) + "\n")
    save_file(_weights(spec), str(directory / "model.safetensors"), metadata={"format": "pt"})
    _build_tokenizer(spec.vocab_size).save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def _weights(spec: TinyLlamaSpec) -> dict[str, torch.Tensor]:
    """One independent stream per tensor name, so values do not depend on iteration order."""
    config = LlamaConfig(**spec.config_dict())
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    if spec.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    half_width = spec.init_std * math.sqrt(3.0)  # uniform(-a, a) has std a / sqrt(3)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in sorted(shapes.items()):
        digest = hashlib.sha256(f"{spec.seed}:{name}".encode()).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))
        uniform = rng.random(int(np.prod(shape)), dtype=np.float64) * 2.0 - 1.0
        # Norm weights around 1 (not exactly 1, so a mis-loaded norm shows up in the outputs).
        values = 1.0 + 0.1 * uniform if name.endswith("norm.weight") else half_width * uniform
        tensors[name] = torch.from_numpy(values.astype(np.float32).reshape(shape))
    return tensors


def _build_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE (any text tokenises) that prepends ``<s>`` like Llama tokenizers do."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    bos_id = _SPECIAL_TOKENS.index(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer
