"""SmolLM2-135M-Instruct: GGUF conversion, and stage chains against transformers on the converted model.

The model is converted once per test session into a temporary cache (about 20 s on 2 cores); the
reference is ``LlamaForCausalLM.from_pretrained(converted_dir)`` (float32, sdpa). Measured here:
chained full forwards and cached greedy decoding are bit-identical to it (``generate`` included);
cached logits vs the full no-cache forward differ by <= 5e-5 (logits span about +-30); batched vs
solo decode steps by <= 1e-4, with the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.errors import ConfigError
from services.layers import LayerSpan
from services.models import convert
from services.models.base import ModelSource
from services.models.generation import SamplingParams, generate_steps
from services.models.kv_cache import SessionCache
from services.models.llama import LlamaStage
from services.models.registry import load_stage, load_tokenizer, resolve_model
from services.models.tokenizer import TextTokenizer

SPLITS = [["0:30"], ["0:10", "10:20", "20:30"], ["0:1", "1:29", "29:30"]]
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about distributed systems.<|im_end|>\n<|im_start|>assistant\n",
]
CACHED_VS_FULL_ATOL = 2e-4  # measured 4.3e-5
BATCHED_VS_SOLO_ATOL = 5e-4  # measured 8.6e-5
EOS_ID = 2  # <|im_end|>


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="module")
def smollm2(cache_dir: Path) -> ModelSource:
    started = time.monotonic()
    source = resolve_model("smollm2", cache_dir=cache_dir)  # converts on first use
    print(f"smollm2 converted and resolved in {time.monotonic() - started:.1f} s")
    return source


@pytest.fixture(scope="module")
def reference(smollm2: ModelSource) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(smollm2.model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2: ModelSource) -> TextTokenizer:
    return load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def chains(smollm2: ModelSource) -> Iterator[dict[str, list[LlamaStage]]]:
    """Stages per split, loaded once for the module."""
    loaded = {",".join(split): llama_stages(smollm2, split) for split in SPLITS}
    yield loaded
    loaded.clear()


def llama_stages(source: ModelSource, split: list[str]) -> list[LlamaStage]:
    stages = [load_stage(source, LayerSpan.parse(span)) for span in split]
    llama = [stage for stage in stages if isinstance(stage, LlamaStage)]
    assert len(llama) == len(stages)
    return llama


def ids_of(tokenizer: TextTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)[0]


# --- conversion -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_directory_is_a_complete_float32_llama(smollm2: ModelSource, tokenizer: TextTokenizer) -> None:
    assert (smollm2.model_id, smollm2.architecture, smollm2.total_layers) == ("smollm2", "llama", 30)
    assert (smollm2.hidden_size, smollm2.vocab_size) == (576, 49152)
    assert smollm2.model_dir.name == convert.SMOLLM2_DIR_NAME
    files = {p.name for p in smollm2.model_dir.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert expected <= files
    config = json.loads((smollm2.model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["eos_token_id"], tokenizer.eos_token_id) == (EOS_ID, EOS_ID)
    assert tokenizer.max_length == 8192
    assert ids_of(tokenizer, "Hello world") == [19556, 905]
    chat = "user\nWrite a haiku about distributed systems.\nassistant\n"
    assert tokenizer.decode(ids_of(tokenizer, PROMPTS[1])) == chat  # special tokens are single ids
    assert not [p for p in smollm2.model_dir.parent.iterdir() if ".tmp-" in p.name]  # no staging left


@pytest.mark.slow
def test_resolving_again_does_not_convert_again(
    smollm2: ModelSource, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(convert, "_write_smollm2", must_not_run)
    again = resolve_model("smollm2", cache_dir=cache_dir)
    assert (again.model_dir, again.checksum) == (smollm2.model_dir, smollm2.checksum)


@pytest.mark.slow
def test_convert_command_on_a_converted_directory(
    smollm2: ModelSource, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(convert, "_write_smollm2", None)
    args = argparse.Namespace(model="smollm2", out_dir=str(smollm2.model_dir))
    assert convert.run(args) == 0
    assert "already converted" in capsys.readouterr().out


def test_convert_command_refuses_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot convert 'gpt2': convertible models are smollm2"):
        convert.run(argparse.Namespace(model="gpt2", out_dir=str(tmp_path / "x")))


def test_concurrent_first_use_converts_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(staging: Path) -> None:
        calls.append(threading.get_ident())
        time.sleep(0.2)  # long enough for every other caller to be waiting on the lock
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / "config.json").write_text("{}")

    target = tmp_path / "models" / "m-v1"
    results: list[Path] = []
    def first_use() -> None:
        results.append(convert.ensure_converted(target, build))

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [target] * 4
    assert sorted(p.name for p in target.parent.iterdir()) == [".m-v1.lock", "m-v1"]  # no staging left
    assert convert.is_converted(target)


def test_conversion_fills_an_existing_empty_directory(tmp_path: Path) -> None:
    """An init container converts into a directory that may already exist (a volume mount point)."""
    target = tmp_path / "mounted"
    target.mkdir()
    (target / "lost+found").mkdir()  # not empty: rename cannot replace it

    def build(staging: Path) -> None:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"w")

    assert convert.ensure_converted(target, build) == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "lost+found", "model.safetensors"]


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    def build(staging: Path) -> None:
        (staging / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    target = tmp_path / "m"
    with pytest.raises(RuntimeError, match="disk full"):
        convert.ensure_converted(target, build)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == [".m.lock"]


# --- exactness --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stage_chains_equal_the_causal_lm(
    chains: dict[str, list[LlamaStage]], reference: Any, tokenizer: TextTokenizer
) -> None:
    for text in PROMPTS:
        ids = torch.tensor([ids_of(tokenizer, text)])
        with torch.inference_mode():
            expected = reference(input_ids=ids).logits
        for name, stages in chains.items():
            x = ids
            for stage in stages:
                x = stage.forward(x, None)
            assert torch.equal(x, expected), (name, text)


@pytest.mark.slow
def test_cached_greedy_generation_equals_generate(
    chains: dict[str, list[LlamaStage]], reference: Any, tokenizer: TextTokenizer
) -> None:
    cases = [(PROMPTS[1], "0:1,1:29,29:30"), (PROMPTS[0], "0:10,10:20,20:30")]
    worst_vs_full = 0.0
    for text, split in cases:
        prompt = ids_of(tokenizer, text)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = reference.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        steps = list(generate_steps(chains[split], prompt, 6, SamplingParams(), eos_ids=[EOS_ID]))
        assert [s.token_id for s in steps] == out.sequences[0, len(prompt) :].tolist(), split
        for step, logits in zip(steps, out.logits, strict=True):
            assert torch.equal(step.logits, logits[0]), split
        if text == PROMPTS[1]:  # one case suffices: the full-forward comparison does not depend on the split
            sequence = list(prompt)
            for step in steps:
                with torch.inference_mode():
                    full = reference(torch.tensor([sequence])).logits[0, -1]
                worst_vs_full = max(worst_vs_full, float((step.logits - full).abs().max()))
                sequence.append(step.token_id)
    print(f"smollm2 cached vs full-forward logits: max abs diff {worst_vs_full:.2e}")
    assert worst_vs_full <= CACHED_VS_FULL_ATOL


@pytest.mark.slow
def test_batched_decode_of_8_sessions_equals_8_solo_sessions(
    smollm2: ModelSource, tokenizer: TextTokenizer
) -> None:
    stages = llama_stages(smollm2, ["0:15", "15:30"])
    text_ids = ids_of(tokenizer, PROMPTS[1] + "Packets cross the mesh\nshards hold their layers")
    prompts = [text_ids[:n] for n in (1, 2, 4, 7, 11, 16, 22, 29)]
    solo: list[list[SessionCache]] = []
    tokens: list[int] = []
    for i, prompt in enumerate(prompts):
        caches = [SessionCache(f"s{i}-{k}") for k in range(len(stages))]
        x = torch.tensor([prompt])
        for stage, cache in zip(stages, caches, strict=True):
            x = stage.step(x, session_cache=cache, position=0)
        solo.append(caches)
        tokens.append(int(x.argmax()))
    batched = copy.deepcopy(solo)
    worst = 0.0
    for _ in range(3):  # teacher-forced with the solo tokens, so every round compares like with like
        solo_out = []
        for caches, token in zip(solo, tokens, strict=True):
            x = torch.tensor([[token]])
            for stage, cache in zip(stages, caches, strict=True):
                x = stage.step(x, session_cache=cache, position=cache.position)
            solo_out.append(x)
        xs = [torch.tensor([[token]]) for token in tokens]
        for k, stage in enumerate(stages):
            xs = stage.step_batch([(x, c[k], c[k].position) for x, c in zip(xs, batched, strict=True)])
        worst = max([worst, *(float((a - b).abs().max()) for a, b in zip(xs, solo_out, strict=True))])
        assert [int(x.argmax()) for x in xs] == [int(x.argmax()) for x in solo_out]
        tokens = [int(x.argmax()) for x in solo_out]
    print(f"smollm2 batched vs solo decode logits: max abs diff {worst:.2e}")
    assert worst <= BATCHED_VS_SOLO_ATOL
    assert [c[1].position for c in batched] == [c[1].position for c in solo] == [len(p) + 3 for p in prompts]
