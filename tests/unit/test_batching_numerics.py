"""The numeric bound of dynamic batching, measured on both real models: a stage's forward over requests of
different lengths padded into one batch (``forward_batch``) equals each request's solo ``forward`` up to float
rounding. The bounds asserted here are the ones docs/architecture.md states ("Dynamic batching")."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.layers import LayerSpan
from services.models.registry import load_stage, resolve_model

# Short texts of mixed lengths, padded to 18. (The engine would not pad 9 up to 18, beyond its padding bound;
# forward_batch takes any mix, so this covers at least as much padding as a real batch.)
LENGTHS = [14, 12, 16, 14, 11, 18, 9, 14]


def _max_diff(stage: Any, inputs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[float, float]:
    """(max abs difference, max abs difference / max |solo output|) over the requests."""
    with torch.inference_mode():
        solo = [stage.forward(x, m) for x, m in inputs]
        batched = stage.forward_batch(inputs)
    worst = worst_rel = 0.0
    for a, b in zip(solo, batched, strict=True):
        assert a.shape == b.shape
        diff = (a - b).abs().max().item()
        worst, worst_rel = max(worst, diff), max(worst_rel, diff / a.abs().max().item())
    return worst, worst_rel


def _inputs(stage: Any, seed: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    generator = torch.Generator().manual_seed(seed)
    source = stage.source
    if stage.is_first:
        return [(torch.randint(3, source.vocab_size, (1, n), generator=generator), None) for n in LENGTHS]
    return [(torch.randn(1, n, source.hidden_size, generator=generator), None) for n in LENGTHS]


@pytest.mark.parametrize(
    ("span", "bound"),
    [((0, 2), 1e-5), ((2, 4), 1e-5), ((4, 6), 1e-6), ((0, 6), 1e-6)],  # hidden states; embeddings (last stage)
    ids=lambda v: str(v),
)
def test_minilm_batched_equals_solo_within_the_stated_bound(span: tuple[int, int], bound: float) -> None:
    stage = load_stage(resolve_model("minilm"), LayerSpan(*span))
    worst, _ = _max_diff(stage, _inputs(stage, 0))
    assert 0 <= worst <= bound, f"minilm {span}: {worst:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize(("span", "abs_bound"), [((0, 10), 2e-3), ((20, 30), 2e-4)], ids=lambda v: str(v))
def test_smollm2_batched_equals_solo_within_the_stated_bound(span: tuple[int, int], abs_bound: float) -> None:
    stage = load_stage(resolve_model("smollm2"), LayerSpan(*span))
    worst, relative = _max_diff(stage, _inputs(stage, 0))
    # hidden states reach |x| ~ 800, so the relative bound is the meaningful one; the last stage gives logits
    assert worst <= abs_bound and relative <= 1e-5, f"smollm2 {span}: {worst:.3g} ({relative:.3g} relative)"


def test_a_batch_of_one_is_the_solo_forward_bit_for_bit() -> None:
    stage = load_stage(resolve_model("minilm"), LayerSpan(0, 6))
    x = torch.randint(3, 30000, (2, 11), generator=torch.Generator().manual_seed(3))
    assert torch.equal(stage.forward_batch([(x, None)])[0], stage.forward(x, None))
