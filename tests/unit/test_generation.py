"""Generation on stage chains with KV caches against transformers, on tiny-llama (SmolLM2: test_smollm2.py).

References: ``LlamaForCausalLM.generate(do_sample=False)`` (tokens and per-step logits: bit-identical)
and the model's full forward without a cache (logits within float32 rounding: the cached one-token
query sums attention in a different order). Measured on tiny-llama: cached vs full <= 3e-7;
batched vs solo decode <= 3e-7.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from services.errors import FailedPrecondition, InvalidArgument
from services.layers import LayerSpan
from services.models.base import ModelSource
from services.models.generation import (
    SamplingParams,
    StopRule,
    find_stop_string,
    generate_reference,
    generate_reference_batched,
    generate_steps,
    next_token,
    sampling_generator,
    streamable_length,
)
from services.models.kv_cache import SessionCache
from services.models.llama import LlamaStage
from services.models.registry import load_stage, resolve_model

SPLITS = [["0:6"], ["0:2", "2:4", "4:6"], ["0:1", "1:5", "5:6"]]
CACHED_VS_FULL_ATOL = 1e-5  # measured 2.4e-7
BATCHED_VS_SOLO_ATOL = 1e-5  # measured 3e-7
SAMPLING = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve_model("tiny-llama", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference(tiny_llama: ModelSource) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama.model_dir), dtype=torch.float32).eval()


def stages(source: ModelSource, split: Sequence[str]) -> list[LlamaStage]:
    loaded = [load_stage(source, LayerSpan.parse(span)) for span in split]
    assert all(isinstance(s, LlamaStage) for s in loaded)
    return loaded  # type: ignore[return-value]


def prompts(vocab_size: int, lengths: Sequence[int], seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def hf_greedy(reference: Any, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), [step[0] for step in out.logits]


# --- greedy against transformers --------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS, ids=",".join)
def test_greedy_tokens_and_logits_equal_generate(split: list[str], tiny_llama: ModelSource, reference: Any) -> None:
    chain = stages(tiny_llama, split)
    for prompt in prompts(tiny_llama.vocab_size, [1, 6, 17]):
        expected_tokens, expected_logits = hf_greedy(reference, prompt, 10)
        steps = list(generate_steps(chain, prompt, 10, SamplingParams(), eos_ids=[2]))
        assert [s.token_id for s in steps] == expected_tokens
        for step, logits in zip(steps, expected_logits, strict=True):
            assert torch.equal(step.logits, logits)  # the same ops in the same order as generate's own loop


def test_cached_logits_match_the_full_forward_at_every_step(tiny_llama: ModelSource, reference: Any) -> None:
    (prompt,) = prompts(tiny_llama.vocab_size, [9])
    steps = list(generate_steps(stages(tiny_llama, SPLITS[2]), prompt, 12, SAMPLING))
    worst = 0.0
    sequence = list(prompt)
    for step in steps:
        with torch.inference_mode():
            full = reference(torch.tensor([sequence])).logits[0, -1]
        worst = max(worst, float((step.logits - full).abs().max()))
        sequence.append(step.token_id)
    assert worst <= CACHED_VS_FULL_ATOL


def test_chunked_prefill_equals_one_prefill(tiny_llama: ModelSource, reference: Any) -> None:
    (stage,) = stages(tiny_llama, ["0:6"])
    (prompt,) = prompts(tiny_llama.vocab_size, [11])
    ids = torch.tensor([prompt])
    session = SessionCache("chunks")
    first = stage.step(ids[:, :4], session_cache=session, position=0, all_logits=True)
    second = stage.step(ids[:, 4:], session_cache=session, position=4, all_logits=True)
    with torch.inference_mode():
        full = reference(ids).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=0, atol=CACHED_VS_FULL_ATOL)
    assert session.position == 11


def test_step_returns_last_position_logits_only(tiny_llama: ModelSource) -> None:
    first, last = stages(tiny_llama, ["0:3", "3:6"])
    caches = [SessionCache("a"), SessionCache("b")]
    hidden = first.step(torch.tensor([[1, 5, 9, 13]]), session_cache=caches[0], position=0)
    logits = last.step(hidden, session_cache=caches[1], position=0)
    assert hidden.shape == (1, 4, 64)
    assert logits.shape == (1, 1, tiny_llama.vocab_size)


# --- sampling ---------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(tiny_llama: ModelSource) -> None:
    (prompt,) = prompts(tiny_llama.vocab_size, [5])
    chain = stages(tiny_llama, SPLITS[1])
    first = generate_reference(chain, prompt, 16, SAMPLING)
    assert generate_reference(chain, prompt, 16, SAMPLING) == first
    assert generate_reference(stages(tiny_llama, SPLITS[0]), prompt, 16, SAMPLING) == first  # any split
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=4321)
    assert generate_reference(chain, prompt, 16, other_seed) != first


def test_next_token_greedy_and_filters() -> None:
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0, 3.0])
    assert next_token(logits, SamplingParams(), None) == 1  # ties: the first maximum, as torch.argmax
    for seed in range(20):
        generator = sampling_generator(SamplingParams(seed=seed))
        assert next_token(logits, SamplingParams(temperature=1.0, top_k=1), generator) in {1, 4}  # tied best
        assert next_token(logits, SamplingParams(temperature=5.0, top_k=3), generator) in {1, 2, 4}
        assert next_token(logits, SamplingParams(temperature=1.0, top_p=0.01), generator) in {1, 4}
    with pytest.raises(InvalidArgument, match="generator"):
        next_token(logits, SamplingParams(temperature=1.0), None)


def test_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([[[1.0, 2.0, 0.0, 3.0]]])  # any shape holding one row
    params = SamplingParams(temperature=2.0, seed=5)
    generator = sampling_generator(params)
    draws = torch.tensor([next_token(logits, params, generator) for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, (logits.reshape(-1) / 2.0).softmax(-1), rtol=0, atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=0)
    generator = sampling_generator(params)
    seen = {next_token(probabilities.log(), params, generator) for _ in range(300)}
    assert seen == {0, 1}


def test_sampling_params_are_validated() -> None:
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(InvalidArgument):
            SamplingParams(**bad)  # type: ignore[arg-type]


# --- stop rules -------------------------------------------------------------------------------------


def test_stop_rule_reasons() -> None:
    rule = StopRule(max_new_tokens=4, eos_ids=frozenset({2}), stop_strings=("\n\n", "User:"))
    assert rule.reason([5, 6], "hello") is None
    assert rule.reason([5, 2], "hello") == "eos"
    assert rule.reason([5, 6], "hello\n\nmore") == "stop_string"
    assert rule.reason([5, 6, 7, 8], "hello") == "length"
    with pytest.raises(InvalidArgument):
        StopRule(max_new_tokens=0)


def test_stop_strings_cut_and_hold_back() -> None:
    stops = ["User:", "\n\n"]
    assert find_stop_string("Hi there\n\nUser: x", stops) == 8
    assert find_stop_string("Hi there", stops) is None
    assert streamable_length("Hi there\n\nUser: x", stops) == 8
    assert streamable_length("Hi Us", stops) == 3  # "Us" may become "User:"
    assert streamable_length("Hi\n", stops) == 2
    assert streamable_length("Hi", stops) == 2
    assert streamable_length("Hi", []) == 2


def test_generation_stops_at_eos(tiny_llama: ModelSource) -> None:
    chain = stages(tiny_llama, ["0:6"])
    (prompt,) = prompts(tiny_llama.vocab_size, [4])
    free = generate_reference(chain, prompt, 8, SAMPLING)
    stopped = generate_reference(chain, prompt, 8, SAMPLING, eos_ids=[free[3]])
    assert stopped == free[: free.index(free[3]) + 1]  # the end-of-sequence token is included


# --- continuous batching ----------------------------------------------------------------------------


def test_step_batch_equals_solo_steps_and_leaves_each_cache_as_if_alone(tiny_llama: ModelSource) -> None:
    chain = stages(tiny_llama, ["0:2", "2:5", "5:6"])
    batch_prompts = prompts(tiny_llama.vocab_size, [1, 2, 3, 5, 8, 13, 21, 34])
    solo: list[list[SessionCache]] = []
    first_tokens: list[int] = []
    for i, prompt in enumerate(batch_prompts):
        caches = [SessionCache(f"s{i}-{k}") for k in range(len(chain))]
        x = torch.tensor([prompt])
        for stage, cache in zip(chain, caches, strict=True):
            x = stage.step(x, session_cache=cache, position=0)
        solo.append(caches)
        first_tokens.append(int(x[0, -1].argmax()))
    batched = copy.deepcopy(solo)
    tokens, worst = first_tokens, 0.0
    for _ in range(4):
        solo_out = []
        for caches, token in zip(solo, tokens, strict=True):
            x = torch.tensor([[token]])
            for stage, cache in zip(chain, caches, strict=True):
                x = stage.step(x, session_cache=cache, position=cache.position)
            solo_out.append(x)
        xs = [torch.tensor([[token]]) for token in tokens]
        for k, stage in enumerate(chain):
            xs = stage.step_batch([(x, caches[k], caches[k].position) for x, caches in zip(xs, batched, strict=True)])
        for a, b in zip(xs, solo_out, strict=True):
            assert a.shape == b.shape == (1, 1, tiny_llama.vocab_size)
            worst = max(worst, float((a - b).abs().max()))
        assert [int(x.argmax()) for x in xs] == [int(x.argmax()) for x in solo_out]
        tokens = [int(x.argmax()) for x in solo_out]
    assert worst <= BATCHED_VS_SOLO_ATOL
    for solo_caches, batched_caches in zip(solo, batched, strict=True):
        for solo_cache, batched_cache in zip(solo_caches, batched_caches, strict=True):
            assert solo_cache.position == batched_cache.position and solo_cache.nbytes == batched_cache.nbytes
            for kv_solo, kv_batched in zip(solo_cache.layer_kv(), batched_cache.layer_kv(), strict=True):
                torch.testing.assert_close(kv_solo, kv_batched, rtol=0, atol=BATCHED_VS_SOLO_ATOL)


@pytest.mark.parametrize("params", [SamplingParams(), SAMPLING], ids=["greedy", "sampled"])
def test_continuous_batching_of_8_sessions_equals_8_sequential_sessions(
    params: SamplingParams, tiny_llama: ModelSource
) -> None:
    chain = stages(tiny_llama, ["0:1", "1:5", "5:6"])
    batch_prompts = prompts(tiny_llama.vocab_size, [1, 3, 4, 7, 9, 12, 16, 30], seed=11)
    sequential = [generate_reference(chain, prompt, 10, params) for prompt in batch_prompts]
    # Sessions join at different rounds, so the batch grows and shrinks as they start and finish.
    join_at = [0, 0, 1, 1, 3, 5, 8, 12]
    assert generate_reference_batched(chain, batch_prompts, 10, params, join_at=join_at) == sequential


def test_step_batch_refuses_bad_batches(tiny_llama: ModelSource) -> None:
    (stage,) = stages(tiny_llama, ["0:6"])
    a, b = SessionCache("a"), SessionCache("b")
    stage.step(torch.tensor([[1, 2, 3]]), session_cache=a, position=0)
    with pytest.raises(InvalidArgument, match="only once"):
        stage.step_batch([(torch.tensor([[4]]), a, 3), (torch.tensor([[4]]), a, 3)])
    with pytest.raises(InvalidArgument, match="one token each"):
        stage.step_batch([(torch.tensor([[4, 5]]), a, 3), (torch.tensor([[4]]), b, 0)])
    with pytest.raises(FailedPrecondition, match="position 0 but the cache holds 3"):
        stage.step_batch([(torch.tensor([[4]]), a, 0), (torch.tensor([[4]]), b, 0)])
    assert (a.position, b.position) == (3, 0)
    assert stage.step_batch([]) == []
    (single,) = stage.step_batch([(torch.tensor([[4]]), a, 3)])  # a batch of one is a plain step
    assert single.shape == (1, 1, tiny_llama.vocab_size) and a.position == 4
