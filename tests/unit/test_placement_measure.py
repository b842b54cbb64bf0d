"""Measured inputs of the cost model: calibration is fast and positive, per-layer costs come from real
stage modules and are cached per model/dtype/shape/host, and header-read weight sizes match what loads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.layers import LayerSpan
from services.models.registry import load_stage, resolve_model
from services.placement.measure import calibrate_speed, cache_path, estimated_costs, measure_model_costs, weight_bytes_by_layer


def test_calibration_is_short_and_positive() -> None:
    started = time.monotonic()
    speed = calibrate_speed()
    assert speed > 0
    assert time.monotonic() - started < 2.0


def test_header_weight_bytes_match_the_loaded_stage() -> None:
    source = resolve_model("minilm")
    per_layer, first, last = weight_bytes_by_layer(source)
    stage = load_stage(source, LayerSpan(0, source.total_layers))
    assert sum(per_layer) + first + last == stage.parameter_count() * 4  # float32
    one = load_stage(source, LayerSpan(2, 3))
    assert per_layer[2] == one.parameter_count() * 4
    assert estimated_costs("minilm").layers[2].weight_bytes == per_layer[2]


def test_measured_costs_are_cached_per_model_and_shape(tmp_path: Path) -> None:
    costs = measure_model_costs("tiny-llama", shape=(1, 16), repeats=2, cache_dir=tmp_path)
    source = resolve_model("tiny-llama")
    assert costs.total_layers == source.total_layers and costs.model_id == "tiny-llama"
    assert all(layer.compute_s > 0 for layer in costs.layers)
    assert all(layer.activation_bytes == 16 * source.hidden_size * 4 for layer in costs.layers)
    assert costs.last.activation_bytes == 16 * source.vocab_size * 4  # logits of every position
    files = list((tmp_path / "placement").glob("tiny-llama-*.json"))
    assert len(files) == 1 and "1x16" in files[0].name
    again = measure_model_costs("tiny-llama", shape=(1, 16), cache_dir=tmp_path)
    assert again == costs  # read back, not measured again
    other = measure_model_costs("tiny-llama", shape=(1, 8), repeats=1, cache_dir=tmp_path)
    assert other.layers[0].activation_bytes == 8 * source.hidden_size * 4
    assert len(list((tmp_path / "placement").glob("*.json"))) == 2


def test_cache_path_names_everything_that_changes_the_numbers(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "minilm", "abcdef0123456789", "float32", (1, 128), 2)
    assert path.parent == tmp_path / "placement"
    for part in ("minilm", "abcdef012345", "float32", "1x128", "t2"):
        assert part in path.name


@pytest.mark.parametrize("model", ["tiny-llama"])
def test_tied_head_counts_the_embedding_on_the_last_stage(model: str) -> None:
    source = resolve_model(model)
    _, first, last = weight_bytes_by_layer(source)
    head = load_stage(source, LayerSpan(source.total_layers - 1, source.total_layers))
    per_layer, _, _ = weight_bytes_by_layer(source)
    assert per_layer[-1] + last == head.parameter_count() * 4


def test_calibration_counts_time_a_quota_takes_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process under a CPU quota runs most matmuls at full speed and then waits for its next period: the
    calibrated speed must be the sustained rate, not the peak of the unthrottled calls (the old median of short
    samples reported the peak, so a worker at 0.3 cores calibrated as fast as an unlimited one)."""
    import torch

    from services.placement import measure

    clock = [0.0]
    calls = [0]

    def mm(a: torch.Tensor, b: torch.Tensor) -> None:  # 1 ms per product; every 10th waits 50 ms for its quota
        calls[0] += 1
        clock[0] += 0.001 + (0.050 if calls[0] % 10 == 0 else 0.0)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    speed = measure.calibrate_speed(duration_s=1.0)
    flop = 2.0 * measure._CAL_M * measure._CAL_K * measure._CAL_N
    sustained = flop / 0.006 / 1e9 / measure.REFERENCE_GFLOPS  # 60 ms per 10 products
    assert abs(speed - sustained) / sustained < 0.1, (speed, sustained)
