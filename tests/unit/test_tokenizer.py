"""Tokenisation equals the reference stacks: sentence-transformers for minilm, tokenizer.json for llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from services.models.base import ModelSource
from services.models.registry import load_tokenizer, resolve_model

TEXTS = [
    "Hello world!",
    "  Leading and trailing spaces  ",
    "MiXeD CaSe, punctuation... and numbers 3.14159",
    "Ünïcödé, emoji 🙂, 中文 and tabs\tand\nnewlines",
    "",
    "word " * 400,  # longer than minilm's max_seq_length (256): truncated exactly as s-t truncates
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shardmesh-tokenizer-cache")


@pytest.fixture(scope="module")
def minilm(cache_dir: Path) -> ModelSource:
    return resolve_model("minilm", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def sentence_model(minilm: ModelSource) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm.model_dir), device="cpu")


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_minilm_ids_equal_sentence_transformers(text: str, minilm: ModelSource, sentence_model: Any) -> None:
    ids, mask = load_tokenizer(minilm).encode(text)
    features = sentence_model.preprocess([text])
    assert ids == features["input_ids"][0].tolist()
    assert mask == features["attention_mask"][0].tolist()


def test_minilm_truncates_to_max_seq_length(minilm: ModelSource, sentence_model: Any) -> None:
    ids, _ = load_tokenizer(minilm).encode("word " * 400)
    assert len(ids) == sentence_model.max_seq_length == 256
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] kept


def test_minilm_decode_drops_special_tokens(minilm: ModelSource) -> None:
    tokenizer = load_tokenizer(minilm)
    assert tokenizer.decode(tokenizer.encode("Hello World!")[0]) == "hello world!"


def test_tiny_llama_follows_its_tokenizer_json(cache_dir: Path) -> None:
    source = resolve_model("tiny-llama", cache_dir=cache_dir)
    tokenizer = load_tokenizer(source)
    raw = Tokenizer.from_file(str(source.model_dir / "tokenizer.json"))
    for text in TEXTS[:4]:
        ids, mask = tokenizer.encode(text)
        assert ids == raw.encode(text).ids
        assert ids[0] == 1 and mask == [1] * len(ids)  # <s> first, as Llama tokenizers do
        assert max(ids) < source.vocab_size
        assert tokenizer.decode(ids) == text  # byte-level: lossless
    assert tokenizer.eos_token_id == 2


def test_do_lower_case_and_max_seq_length_follow_sentence_bert_config(minilm: ModelSource, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    for item in minilm.model_dir.iterdir():  # the same model, with its own sentence_bert_config.json
        if item.name != "sentence_bert_config.json":
            (tmp_path / item.name).symlink_to(item)
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 16, "do_lower_case": true}')
    reference = SentenceTransformer(str(tmp_path), device="cpu")
    source = resolve_model(str(tmp_path), cache_dir=tmp_path / "cache")
    tokenizer = load_tokenizer(source)
    for text in TEXTS:
        ids, mask = tokenizer.encode(text)
        features = reference.preprocess([text])
        assert ids == features["input_ids"][0].tolist()
        assert mask == features["attention_mask"][0].tolist()
    assert len(tokenizer.encode(TEXTS[-1])[0]) == 16
