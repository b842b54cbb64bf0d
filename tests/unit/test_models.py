"""Model adapters against independent references, with real weights.

References: sentence-transformers' own ``encode`` for minilm and transformers' ``LlamaForCausalLM`` for
tiny-llama. Chained stages must be bit-identical (``torch.equal``) to them; parameter counts are checked
against tensor shapes read straight from the safetensors headers.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from services.errors import ConfigError, InvalidArgument
from services.layers import LayerSpan
from services.models.base import ModelSource
from services.models.registry import load_stage, load_tokenizer, resolve_model
from services.models.tiny_llama import TINY_LLAMA, ensure_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]

SENTENCES = [
    "Sharded inference must equal the single-process model.",
    "Short one.",
    "A somewhat longer sentence that talks about routers, shard workers, activations and Consul discovery.",
    "Ünïcödé, emoji 🙂 and numbers 12345 survive tokenisation.",
]
MINILM_SPLITS = [["0:6"], ["0:1", "1:5", "5:6"], ["0:2", "2:4", "4:6"], ["0:3", "3:6"]]
LLAMA_SPLITS = [["0:6"], ["0:1", "1:5", "5:6"], ["0:2", "2:4", "4:6"], ["0:4", "4:6"], ["0:5", "5:6"]]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shardmesh-cache")


@pytest.fixture(scope="session")
def minilm(cache_dir: Path) -> ModelSource:
    return resolve_model("minilm", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def tiny_llama(cache_dir: Path) -> ModelSource:
    return resolve_model("tiny-llama", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def sentence_model(minilm: ModelSource) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm.model_dir), device="cpu")


def _causal_lm(model_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def llama_reference(tiny_llama: ModelSource) -> Any:
    return _causal_lm(tiny_llama.model_dir)


def run_chain(source: ModelSource, split: Sequence[str], x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    for span in split:
        x = load_stage(source, LayerSpan.parse(span)).forward(x, mask)
    return x


def llama_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: left padding, no padding, right padding."""
    ids = torch.randint(0, vocab_size, (3, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, 9:] = 0
    return ids, mask


# --- minilm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", MINILM_SPLITS, ids=",".join)
def test_minilm_stages_equal_sentence_transformers(split: list[str], minilm: ModelSource, sentence_model: Any) -> None:
    tokenizer = load_tokenizer(minilm)
    for text in SENTENCES:
        ids, mask = tokenizer.encode(text)
        output = run_chain(minilm, split, torch.tensor([ids]), torch.tensor([mask]))
        expected = sentence_model.encode(text, convert_to_tensor=True)
        assert torch.equal(output[0], expected), text


def test_minilm_padded_batch_equals_sentence_transformers(minilm: ModelSource, sentence_model: Any) -> None:
    # Longest first: the order in which encode() batches them, so both see the same padded tensor.
    batch = [SENTENCES[2], SENTENCES[1]]
    features = sentence_model.preprocess(batch)
    assert features["attention_mask"].min() == 0  # really padded
    expected = sentence_model.encode(batch, convert_to_tensor=True)
    for split in (["0:6"], ["0:1", "1:5", "5:6"]):
        output = run_chain(minilm, split, features["input_ids"], features["attention_mask"])
        assert torch.equal(output, expected)


def test_minilm_without_mask_equals_all_ones_mask(minilm: ModelSource) -> None:
    ids, mask = load_tokenizer(minilm).encode(SENTENCES[0])
    stage = load_stage(minilm, LayerSpan(0, 6))
    assert torch.equal(
        stage.forward(torch.tensor([ids]), None), stage.forward(torch.tensor([ids]), torch.tensor([mask]))
    )


# --- tiny-llama -------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", LLAMA_SPLITS, ids=",".join)
def test_tiny_llama_stages_equal_causal_lm(split: list[str], tiny_llama: ModelSource, llama_reference: Any) -> None:
    ids, mask = llama_batch(tiny_llama.vocab_size)
    with torch.inference_mode():
        expected = llama_reference(input_ids=ids, attention_mask=mask).logits
        expected_unmasked = llama_reference(input_ids=ids[1:2]).logits
    assert torch.equal(run_chain(tiny_llama, split, ids, mask), expected)
    assert torch.equal(run_chain(tiny_llama, split, ids[1:2], None), expected_unmasked)


def test_stage_uses_reference_attention_implementation(
    minilm: ModelSource, tiny_llama: ModelSource, sentence_model: Any, llama_reference: Any
) -> None:
    bert_stage: Any = load_stage(minilm, LayerSpan(0, 1))
    llama_stage: Any = load_stage(tiny_llama, LayerSpan(0, 1))
    assert bert_stage.config._attn_implementation == sentence_model[0].auto_model.config._attn_implementation
    assert llama_stage.config._attn_implementation == llama_reference.config._attn_implementation


def test_untied_llama_last_stage_uses_its_own_head(tmp_path: Path) -> None:
    spec = replace(TINY_LLAMA, name="tiny-llama-untied-test", num_layers=3, tie_word_embeddings=False)
    source = resolve_model(str(ensure_tiny_llama(tmp_path, spec)), cache_dir=tmp_path)
    ids, mask = llama_batch(source.vocab_size)
    with torch.inference_mode():
        expected = _causal_lm(source.model_dir)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(run_chain(source, ["0:1", "1:3"], ids, mask), expected)
    assert load_stage(source, LayerSpan(2, 3)).parameter_count() == _expected_llama_params(source, LayerSpan(2, 3))


def test_llama_run_with_cache_continues_the_sequence(tiny_llama: ModelSource) -> None:
    """The hook for per-session KV caches: local layer indices, explicit positions, mask over past + new.

    Close rather than bit-equal: with a cache the mask is materialised and the last step is a one-token
    query, so sdpa picks a different kernel (different summation order) than the single full pass.
    """
    from transformers import DynamicCache

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    stages: list[Any] = [load_stage(tiny_llama, LayerSpan(0, 2)), load_stage(tiny_llama, LayerSpan(2, 6))]
    full = run_chain(tiny_llama, ["0:2", "2:6"], ids, None)
    caches = [DynamicCache(), DynamicCache()]
    x = ids[:, :5]
    for stage, cache in zip(stages, caches, strict=True):
        x = stage.run(x, torch.ones(1, 5, dtype=torch.int64), position_ids=torch.arange(5).unsqueeze(0), cache=cache)
    step = ids[:, 5:]
    for stage, cache in zip(stages, caches, strict=True):
        step = stage.run(step, torch.ones(1, 6, dtype=torch.int64), position_ids=torch.tensor([[5]]), cache=cache)
    torch.testing.assert_close(x, full[:, :5], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=0, atol=1e-5)
    assert [len(cache.layers) for cache in caches] == [2, 4]  # each stage caches only its own layers


def test_model_code_uses_no_deprecated_transformers_api(tiny_llama: ModelSource, minilm: ModelSource) -> None:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns until 5.40 removes the old name:
    every path our stages take (full pass, session prefill and decode, batched decode, BERT) must run
    with deprecation warnings turned into errors."""
    from services.models.kv_cache import SessionCache

    llama: Any = load_stage(tiny_llama, LayerSpan(0, 6))
    bert = load_stage(minilm, LayerSpan(0, 6))
    ids = torch.tensor([[1, 5, 9, 13]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", PendingDeprecationWarning)
        llama.forward(ids, torch.ones_like(ids))
        first, second = SessionCache("a"), SessionCache("b")
        llama.step(ids, session_cache=first, position=0)
        llama.step(ids[:, :2], session_cache=second, position=0)
        llama.step(torch.tensor([[7]]), session_cache=first, position=4)
        llama.step_batch([(torch.tensor([[3]]), first, 5), (torch.tensor([[4]]), second, 2)])
        bert.forward(torch.tensor([[101, 2000, 102]]), torch.ones(1, 3, dtype=torch.int64))


# --- only own weights -------------------------------------------------------------------------------


def _shapes(source: ModelSource) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in source.model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})  # noqa: SIM118 - not a dict
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _expected_bert_params(source: ModelSource, span: LayerSpan) -> int:
    prefixes = [f"encoder.layer.{i}." for i in range(span.start, span.end)]
    if span.start == 0:
        prefixes.append("embeddings.")
    # position_ids is an int64 buffer that old checkpoints stored; the pooler is never used by s-t.
    keys = [k for k in _shapes(source) if k.startswith(tuple(prefixes)) and k != "embeddings.position_ids"]
    return sum(_numel(_shapes(source)[k]) for k in keys)


def _expected_llama_params(source: ModelSource, span: LayerSpan) -> int:
    shapes = _shapes(source)
    keys = {k for k in shapes if k.startswith(tuple(f"model.layers.{i}." for i in range(span.start, span.end)))}
    if span.start == 0:
        keys.add("model.embed_tokens.weight")
    if span.end == source.total_layers:
        keys.add("model.norm.weight")
        keys.add("lm_head.weight" if "lm_head.weight" in shapes else "model.embed_tokens.weight")  # tied: once
    return sum(_numel(shapes[k]) for k in keys)


@pytest.mark.parametrize("span", ["0:6", "0:1", "1:5", "2:4", "5:6"])
def test_bert_stage_materialises_only_its_layers(span: str, minilm: ModelSource) -> None:
    stage = load_stage(minilm, LayerSpan.parse(span))
    assert stage.parameter_count() == _expected_bert_params(minilm, LayerSpan.parse(span))


@pytest.mark.parametrize("span", ["0:6", "0:1", "1:5", "3:6", "5:6"])
def test_llama_stage_materialises_only_its_layers(span: str, tiny_llama: ModelSource) -> None:
    stage = load_stage(tiny_llama, LayerSpan.parse(span))
    assert stage.parameter_count() == _expected_llama_params(tiny_llama, LayerSpan.parse(span))


def test_middle_stage_holds_far_less_than_the_model(minilm: ModelSource) -> None:
    whole = load_stage(minilm, LayerSpan(0, 6)).parameter_count()
    assert load_stage(minilm, LayerSpan(2, 3)).parameter_count() < whole / 10


# --- stage behaviour --------------------------------------------------------------------------------


def test_stage_reads_read_only_input_without_modifying_it(tiny_llama: ModelSource) -> None:
    first = load_stage(tiny_llama, LayerSpan(0, 3))
    rest = load_stage(tiny_llama, LayerSpan(3, 6))
    hidden = first.forward(torch.tensor([[1, 5, 9, 13]]), None)
    payload = hidden.numpy().tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer" is the point of the test
        received = torch.frombuffer(payload, dtype=torch.float32).reshape(hidden.shape)
    logits = rest.forward(received, torch.ones(1, 4, dtype=torch.int64))
    assert torch.equal(received, hidden)
    assert logits.shape == (1, 4, tiny_llama.vocab_size)
    assert logits.is_inference()


def test_bad_inputs_are_invalid_argument(tiny_llama: ModelSource) -> None:
    first = load_stage(tiny_llama, LayerSpan(0, 3))
    rest = load_stage(tiny_llama, LayerSpan(3, 6))
    with pytest.raises(InvalidArgument, match=r"token ids must lie in \[0, 512\)"):
        first.forward(torch.tensor([[1, 512]]), None)
    with pytest.raises(InvalidArgument, match="int64 token ids"):
        first.forward(torch.zeros(1, 2, 64), None)
    with pytest.raises(InvalidArgument, match="hidden states"):
        rest.forward(torch.zeros(1, 2, 32), None)
    with pytest.raises(InvalidArgument, match="attention_mask shape"):
        first.forward(torch.tensor([[1, 2]]), torch.ones(1, 3))


# --- registry ---------------------------------------------------------------------------------------


def test_span_beyond_model_is_config_error(minilm: ModelSource, tiny_llama: ModelSource) -> None:
    with pytest.raises(ConfigError, match=r"5:9 is beyond model 'minilm', which has 6 layers \(0:6\)"):
        load_stage(minilm, LayerSpan(5, 9))
    with pytest.raises(ConfigError, match="beyond model 'tiny-llama'"):
        load_stage(tiny_llama, LayerSpan(0, 7))


def test_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'gpt-17'.*minilm, tiny-llama"):
        resolve_model("gpt-17", cache_dir=tmp_path)


def test_unsupported_architecture_is_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "num_hidden_layers": 2}')
    with pytest.raises(ConfigError, match="architecture 'gpt2'; supported: bert, llama"):
        resolve_model(str(tmp_path), cache_dir=tmp_path)



def test_local_directory_resolves_like_the_builtin(tiny_llama: ModelSource, cache_dir: Path) -> None:
    local = resolve_model(str(tiny_llama.model_dir), cache_dir=cache_dir)
    assert local.model_id == tiny_llama.model_dir.name
    assert (local.architecture, local.total_layers, local.hidden_size, local.vocab_size) == ("llama", 6, 64, 512)
    assert local.checksum == tiny_llama.checksum


def test_checksum_is_stable_and_model_specific(minilm: ModelSource, tiny_llama: ModelSource, cache_dir: Path) -> None:
    assert resolve_model("minilm", cache_dir=cache_dir).checksum == minilm.checksum
    assert resolve_model("tiny-llama", cache_dir=cache_dir).checksum == tiny_llama.checksum
    assert minilm.checksum != tiny_llama.checksum
    assert len(minilm.checksum) == 64
    assert (cache_dir / "checksums.json").is_file()
    # Without the side cache the value is the same (the cache only saves re-reading).
    assert resolve_model("minilm", cache_dir=cache_dir / "fresh").checksum == minilm.checksum


def test_checksum_follows_file_contents(tmp_path: Path) -> None:
    spec = replace(TINY_LLAMA, name="tiny-llama-edit-test", num_layers=2)
    model_dir = ensure_tiny_llama(tmp_path, spec)
    before = resolve_model(str(model_dir), cache_dir=tmp_path).checksum
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert resolve_model(str(model_dir), cache_dir=tmp_path).checksum != before


def test_tiny_llama_generation_is_deterministic_across_processes(tiny_llama: ModelSource, tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from services.models.registry import resolve_model; "
        "print(resolve_model('tiny-llama', cache_dir=Path(sys.argv[1])).checksum)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == tiny_llama.checksum


def test_concurrent_first_use_yields_one_complete_model(tmp_path: Path) -> None:
    spec = replace(TINY_LLAMA, name="tiny-llama-race-test", num_layers=2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: ensure_tiny_llama(tmp_path, spec), range(4)))
    assert set(paths) == {tmp_path / spec.name}
    assert sorted(p.name for p in tmp_path.iterdir()) == [spec.name]  # no staging directories left
    assert {p.name for p in paths[0].iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
