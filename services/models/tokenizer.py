"""Text <-> token ids, exactly as the reference stacks do it, from local files only.

Wraps transformers' fast tokenizer loaded from the model directory (``local_files_only``) so special
tokens, BOS handling and truncation follow the model's own tokenizer config. For BERT models it is
configured as sentence-transformers configures it (max_seq_length, do_lower_case), so ids equal
``SentenceTransformer.preprocess``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers.normalizers import Lowercase
from tokenizers.normalizers import Sequence as NormalizerSequence
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.errors import ConfigError
from services.models.sentence_config import read_sentence_config


class TextTokenizer:
    """``encode(text) -> (ids, attention_mask)`` and ``decode(ids) -> text`` for one model."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, truncate: bool, max_positions: int | None = None) -> None:
        self._tokenizer = tokenizer
        self._truncate = truncate
        self.max_positions = max_positions  # the model's max_position_embeddings: most tokens one input may have

    @property
    def eos_token_id(self) -> int | None:
        return self._tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return int(self._tokenizer.model_max_length)

    def encode(self, text: str, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """``max_tokens``: stop after this many (for a caller that only needs to know the input is too long;
        it also keeps the ids list, built while holding the GIL, short)."""
        if self._truncate:
            encoded = self._tokenizer(text, truncation="longest_first")
        elif max_tokens is not None:
            encoded = self._tokenizer(text, truncation=True, max_length=max_tokens)
        else:
            encoded = self._tokenizer(text, truncation=False)
        return list(encoded["input_ids"]), list(encoded["attention_mask"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


def load_text_tokenizer(model_dir: Path, architecture: str, max_position_embeddings: int | None) -> TextTokenizer:
    if not (model_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{model_dir} has no tokenizer.json: text input needs the model's fast tokenizer")
    if architecture == "bert":
        tokenizer = _sentence_transformers_tokenizer(model_dir, max_position_embeddings)
        tokenizer.max_positions = max_position_embeddings
        return tokenizer
    auto = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return TextTokenizer(auto, truncate=False, max_positions=max_position_embeddings)


def _sentence_transformers_tokenizer(model_dir: Path, max_position_embeddings: int | None) -> TextTokenizer:
    """Mirrors sentence-transformers' ``Transformer.__init__`` tokenizer set-up."""
    sentence = read_sentence_config(model_dir)
    kwargs = {} if sentence.max_seq_length is None else {"model_max_length": sentence.max_seq_length}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    if sentence.max_seq_length is None and max_position_embeddings is not None:
        tokenizer.model_max_length = min(tokenizer.model_max_length, max_position_embeddings)
    if sentence.do_lower_case:
        normalizer = tokenizer.backend_tokenizer.normalizer
        if not _has_lowercase(normalizer):
            normalizers = [Lowercase()]
            if isinstance(normalizer, NormalizerSequence):
                normalizers += list(normalizer)  # type: ignore[call-overload]
            elif normalizer is not None:
                normalizers.append(normalizer)
            tokenizer.backend_tokenizer.normalizer = NormalizerSequence(normalizers)
    return TextTokenizer(tokenizer, truncate=True)


def _has_lowercase(normalizer: object) -> bool:
    """sentence-transformers' own test (a BertNormalizer with lowercase=True does not count)."""
    if isinstance(normalizer, Lowercase):
        return True
    return isinstance(normalizer, NormalizerSequence) and any(
        isinstance(n, Lowercase)
        for n in normalizer  # type: ignore[attr-defined]
    )
