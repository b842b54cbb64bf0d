"""A worker's replay with batching on runs consecutive steps as one chunk (one forward instead of one per step):
the grouping rule, and on real tiny-llama stages the chunked replay's outputs and cache against the steps run
one by one (within float rounding; ``--no-batching`` keeps the bit-exact step-by-step replay)."""

from __future__ import annotations

import pytest
import torch

from services.layers import LayerSpan
from services.models.base import ModelSource
from services.models.kv_cache import SessionCache
from services.models.llama import LlamaStage
from services.models.registry import load_stage, resolve_model
from shard_worker.engine import StageEngine
from shard_worker.sessions import SessionService, replay_chunks


def test_replay_chunks_group_consecutive_steps_up_to_the_token_limit() -> None:
    assert replay_chunks([], 8) == []
    assert replay_chunks([5, 1, 1, 1], 8) == [(0, 4)]
    assert replay_chunks([5, 1, 1, 1, 1], 8) == [(0, 4), (4, 5)]  # 8 tokens, then the ninth
    assert replay_chunks([20, 1, 1], 8) == [(0, 1), (1, 3)]  # a longer step runs alone
    assert replay_chunks([5, 1, 1], 0) == [(0, 1), (1, 2), (2, 3)]  # no batching: every step alone
    assert replay_chunks([1] * 10, 4) == [(0, 4), (4, 8), (8, 10)]


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> list[LlamaStage]:
    source: ModelSource = resolve_model("tiny-llama", cache_dir=tmp_path_factory.mktemp("cache"))
    loaded = [load_stage(source, LayerSpan.parse(s)) for s in ("0:3", "3:6")]
    assert all(isinstance(s, LlamaStage) for s in loaded)
    return loaded  # type: ignore[return-value]


def _stepwise(stage: LlamaStage, ids: list[int], lengths: list[int], cache: SessionCache) -> list[torch.Tensor]:
    """Stage 0's output of every step, stepped one by one into ``cache`` (what the router logs for stage 1)."""
    pieces, position = [], 0
    for n in lengths:
        pieces.append(stage.step(torch.tensor([ids[position : position + n]]), session_cache=cache, position=position))
        position += n
    return pieces


def _steps_alone(stages: list[LlamaStage], ids: list[int], lengths: list[int]) -> tuple[list[torch.Tensor], list[SessionCache]]:
    """Stage 1's output of every step, each step run alone on both stages (the replay's reference)."""
    caches = [SessionCache(f"alone-{i}") for i in range(len(stages))]
    outputs, position = [], 0
    for n in lengths:
        x: torch.Tensor = torch.tensor([ids[position : position + n]])
        for stage, cache in zip(stages, caches, strict=True):
            x = stage.step(x, session_cache=cache, position=position)
        outputs.append(x)
        position += n
    return outputs, caches


@pytest.mark.parametrize("batching", [True, False])
async def test_a_replay_is_one_forward_with_batching_and_step_by_step_without(
    stages: list[LlamaStage], batching: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, lengths = [3, 17, 40, 5, 9, 101, 7, 12, 60], [6, 1, 1, 1]
    reference, ref_caches = _steps_alone(stages, ids, lengths)
    # Stage 0's outputs as the router logged them: what the last stage's replay gets as input.
    cache0 = SessionCache("h0")
    hidden = torch.cat(_stepwise(stages[0], ids, lengths, cache0), dim=1)
    engine = StageEngine(stages[1], "w1", 8)
    service = SessionService(stages[1], engine, budget_bytes=64 << 20, default_ttl_s=60, batching=batching)
    forwards: list[int] = []
    real_step = stages[1].step

    def counting_step(x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        forwards.append(int(x.shape[1]))
        return real_step(x, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stages[1], "step", counting_step)
    try:
        outputs = await service.replay("s", 0, 60, hidden, lengths, None)
        assert forwards == ([9] if batching else [6, 1, 1, 1])  # one chunk of every token, or each step alone
        assert [tuple(o.shape) for o in outputs] == [tuple(r.shape) for r in reference]  # a logits row per step
        assert all(o.shape[:2] == (1, 1) for o in outputs)
        for out, ref in zip(outputs, reference, strict=True):
            if batching:  # the same logits within float rounding, the same greedy token
                assert torch.allclose(out, ref, atol=1e-4, rtol=1e-5) and out.argmax() == ref.argmax()
            else:
                assert torch.equal(out, ref)  # bit for bit
        # The session continues where the replay left it: the next step at position 9 matches the reference's.
        next_ids = torch.tensor([[33]])
        ref_next = stages[1].step(stages[0].step(next_ids, session_cache=ref_caches[0], position=9),
                                  session_cache=ref_caches[1], position=9)
        x_next = stages[0].step(next_ids, session_cache=cache0, position=9)
        out_next = await service.step("s", 9, 60, x_next, None)
        assert out_next.argmax() == ref_next.argmax() and torch.allclose(out_next, ref_next, atol=1e-4, rtol=1e-5)
        if not batching:
            assert torch.equal(out_next, ref_next)
    finally:
        engine.close()


async def test_a_chunked_replay_on_an_earlier_stage_returns_every_steps_hidden_rows(stages: list[LlamaStage]) -> None:
    ids, lengths = [3, 17, 40, 5, 9, 101, 7, 12, 60], [6, 1, 1, 1]
    pieces = _stepwise(stages[0], ids, lengths, SessionCache("alone"))
    engine = StageEngine(stages[0], "w0", 8)
    service = SessionService(stages[0], engine, budget_bytes=64 << 20, default_ttl_s=60, batching=True)
    try:
        outputs = await service.replay("s", 0, 60, torch.tensor([ids]), lengths, None)
        assert [o.shape[1] for o in outputs] == lengths  # hidden states: a row per token, split per step
        for out, ref in zip(outputs, pieces, strict=True):
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-5)
    finally:
        engine.close()
