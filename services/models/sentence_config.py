"""sentence-transformers' description of a model (modules.json, Pooling config, sentence_bert_config.json).

Read by the BERT stage (pooling / normalisation) and by the tokenizer (max_seq_length, do_lower_case),
so both follow what ``SentenceTransformer(model_dir)`` would do with the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import ConfigError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")
# sentence-transformers' legacy pooling flags, in its concatenation order.
_LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class SentenceConfig:
    """How sentence-transformers turns token embeddings into a sentence embedding for this model."""

    pooling_modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False


def read_sentence_config(model_dir: Path) -> SentenceConfig:
    """Reads modules.json, the Pooling config and sentence_bert_config.json (all optional, s-t defaults)."""
    st_config = _read_json(model_dir / "sentence_bert_config.json") or {}
    modules = _read_json(model_dir / "modules.json")
    if modules is None:  # a plain Hugging Face BERT: s-t adds mean pooling and no Normalize
        return SentenceConfig(
            max_seq_length=st_config.get("max_seq_length"), do_lower_case=bool(st_config.get("do_lower_case"))
        )
    pooling_modes: tuple[str, ...] = ()
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]  # old and new s-t module paths
        if kind == "Transformer":
            continue
        if kind == "Pooling" and not pooling_modes:
            pooling_modes = _pooling_modes(_read_json(model_dir / module.get("path", "") / "config.json") or {})
        elif kind == "Normalize":
            normalize = True
        else:
            raise ConfigError(
                f"{model_dir}/modules.json uses sentence-transformers module {module.get('type')!r}; "
                "supported: Transformer, Pooling, Normalize"
            )
    return SentenceConfig(
        pooling_modes=pooling_modes or ("mean",),
        normalize=normalize,
        max_seq_length=st_config.get("max_seq_length"),
        do_lower_case=bool(st_config.get("do_lower_case")),
    )


def _pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    raw = config.get("pooling_mode")
    if raw is None:
        modes = tuple(mode for flag, mode in _LEGACY_POOLING_FLAGS.items() if config.get(flag)) or ("mean",)
    else:
        modes = (raw,) if isinstance(raw, str) else tuple(str(mode) for mode in raw)
    unsupported = [mode for mode in modes if mode not in POOLING_MODES]
    if unsupported:
        raise ConfigError(f"pooling mode(s) {unsupported} are not supported; supported: {list(POOLING_MODES)}")
    return modes


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None
