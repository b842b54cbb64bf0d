"""Measured inputs of the cost model: each layer's forward time at a representative shape, and a
worker's relative speed.

Layer costs are timed by hooks on the real stage modules (the same code a worker runs), over the whole
model in one process, and normalised to speed 1.0 with the calibration taken in the same run: a worker
whose calibration reports speed ``s`` is predicted to run a layer in ``compute_s / s``. They are cached
per model checksum, dtype, shape and host under the cache that holds converted weights
(``$SHARDMESH_CACHE`` or ``~/.cache/shardmesh``, see :func:`services.models.registry.default_cache_dir`),
because measuring SmolLM2 takes seconds that a ``plan`` or ``up`` should not pay twice.

Calibration (:func:`calibrate_speed`) is a fixed float32 matmul workload run for about a quarter of a
second (more than two CFS quota periods) in the calling process, so it sees that process's torch threads, a
CPU quota, and whatever else shares its cores.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.errors import ConfigError
from services.placement.costs import LayerCost, ModelCosts

log = logging.getLogger(__name__)

# speed 1.0 = this many GFLOP/s on the calibration matmul (about one 2020s laptop core in float32).
REFERENCE_GFLOPS = 20.0
CALIBRATION_S = 0.25
_CAL_M, _CAL_K, _CAL_N = 128, 384, 1536  # one MiniLM-sized feed-forward matmul at 128 tokens
DEFAULT_SHAPE = (1, 128)  # batch x tokens: the bench's minilm workload
CACHE_VERSION = 2  # 2: calibration is the sustained rate (costs cached with the old one are not comparable)


def calibrate_speed(duration_s: float = CALIBRATION_S) -> float:
    """This process's relative compute speed (1.0 = ``REFERENCE_GFLOPS``): the sustained rate, all the work over
    all the wall time. A median of short samples measured peak speed: a worker under a CPU quota of 0.3 cores
    (30 ms in every 100 ms) ran most samples unthrottled and calibrated as fast as an unlimited one."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(_CAL_M, _CAL_K, generator=gen)
    b = torch.randn(_CAL_K, _CAL_N, generator=gen)
    flop = 2.0 * _CAL_M * _CAL_K * _CAL_N
    with torch.inference_mode():
        for _ in range(3):
            torch.mm(a, b)
        count = 0
        started = time.perf_counter()
        deadline = started + duration_s
        while time.perf_counter() < deadline or count < 20:
            torch.mm(a, b)
            count += 1
        elapsed = time.perf_counter() - started
    return flop * count / elapsed / 1e9 / REFERENCE_GFLOPS


def available_memory_bytes() -> int:
    """Memory the OS says is available now (what a worker could still fill with weights and caches)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - optional; 0 means unknown
        return 0


def host_key() -> str:
    return f"{socket.gethostname()}-{os.cpu_count()}cpu"


def cache_path(cache_dir: Path, model_id: str, checksum: str, dtype: str, shape: tuple[int, int], threads: int) -> Path:
    name = f"{model_id}-{checksum[:12]}-{dtype}-{shape[0]}x{shape[1]}-t{threads}-{host_key()}.json"
    return cache_dir / "placement" / name


def costs_to_json(costs: ModelCosts, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION, **meta,
        "layers": [asdict(c) for c in costs.layers], "first": asdict(costs.first), "last": asdict(costs.last),
    }


def costs_from_json(data: dict[str, Any]) -> ModelCosts:
    if data.get("version") != CACHE_VERSION:
        raise ConfigError("placement cost cache has another version")
    return ModelCosts(
        tuple(LayerCost(**c) for c in data["layers"]), LayerCost(**data["first"]), LayerCost(**data["last"]),
        model_id=str(data.get("model_id", "")),
    )


def _module_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0


def _timed_forward(stage: Any, shape: tuple[int, int], repeats: int) -> tuple[list[float], float, float, int]:
    """Per-layer median seconds, embedding seconds, the rest of the forward (mask, head, pooling), output bytes."""
    import torch

    layers = list(stage.layers)
    first = getattr(stage, "embeddings", None) or getattr(stage, "embed_tokens", None)
    marks: dict[int, float] = {}
    spent: dict[int, list[float]] = {i: [] for i in range(len(layers) + 1)}

    def pre(index: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            marks[index] = time.perf_counter()
        return hook

    def post(index: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            spent[index].append(time.perf_counter() - marks[index])
        return hook

    handles = []
    for index, module in [*enumerate(layers), (len(layers), first)]:
        handles.append(module.register_forward_pre_hook(pre(index)))
        handles.append(module.register_forward_hook(post(index)))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, stage.source.vocab_size, shape, generator=gen)
    mask = torch.ones(shape, dtype=torch.int64)
    totals: list[float] = []
    try:
        out = stage.forward(ids, mask)  # warm-up (allocator, kernels)
        for index in spent:
            spent[index].clear()
        for _ in range(repeats):
            started = time.perf_counter()
            stage.forward(ids, mask)
            totals.append(time.perf_counter() - started)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [statistics.median(spent[i]) for i in range(len(layers))]
    embed = statistics.median(spent[len(layers)])
    rest = max(0.0, statistics.median(totals) - sum(per_layer) - embed)
    return per_layer, embed, rest, out.numel() * out.element_size()


def measure_model_costs(
    model: str, *, shape: tuple[int, int] = DEFAULT_SHAPE, repeats: int = 5, refresh: bool = False,
    cache_dir: Path | None = None, progress: Callable[[str], None] | None = None,
) -> ModelCosts:
    """Per-layer costs of ``model`` on this host at ``shape`` (cached), normalised to speed 1.0."""
    import torch

    from services.layers import LayerSpan
    from services.models.registry import default_cache_dir, load_stage, resolve_model

    source = resolve_model(model)
    threads = torch.get_num_threads()
    path = cache_path(cache_dir or default_cache_dir(), source.model_id, source.checksum, "float32", shape, threads)
    if path.is_file() and not refresh:
        try:
            return costs_from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            log.warning("ignoring unreadable cost cache %s (%s); measuring again", path, exc)
    say = progress or (lambda _: None)
    say(f"measuring {source.model_id} per-layer costs at {shape[0]}x{shape[1]} tokens ({threads} threads)")
    stage = load_stage(source, LayerSpan(0, source.total_layers))
    speed_before = calibrate_speed()
    per_layer, embed, rest, out_bytes = _timed_forward(stage, shape, repeats)
    speed = (speed_before + calibrate_speed()) / 2  # the load may change while measuring
    activation = shape[0] * shape[1] * source.hidden_size * 4
    head = getattr(stage, "lm_head", None)
    last_weights = _module_bytes(getattr(stage, "norm", None)) + _module_bytes(head)
    costs = ModelCosts(
        tuple(LayerCost(t * speed, activation, _module_bytes(layer)) for t, layer in zip(per_layer, stage.layers)),
        first=LayerCost(embed * speed, 0, _module_bytes(getattr(stage, "embeddings", None) or getattr(stage, "embed_tokens", None))),
        last=LayerCost(rest * speed, out_bytes, last_weights),
        model_id=source.model_id,
    )
    meta = {"model_id": source.model_id, "checksum": source.checksum, "shape": list(shape), "threads": threads,
            "host": host_key(), "calibrated_speed": speed, "measured_at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(costs_to_json(costs, meta), indent=1))
    tmp.replace(path)
    return costs


def weight_bytes_by_layer(source: Any) -> tuple[list[int], int, int]:
    """Weight bytes per layer, of the embeddings and of the head, from the safetensors headers (no weights read)."""
    import re

    from safetensors import safe_open

    from services.models.weights import weight_files

    layer_re = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
    per_layer = [0] * source.total_layers
    first = last = 0
    has_head = False
    for path in weight_files(source.model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                if not piece.get_dtype().startswith(("F", "BF")):
                    continue  # integer buffers (position ids) are rebuilt, not loaded as weights
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                nbytes = count * 4  # stages compute in float32 whatever the file stores
                match = layer_re.search(key)
                if match and int(match.group(1)) < source.total_layers:
                    per_layer[int(match.group(1))] += nbytes
                elif "embed" in key:
                    first += nbytes
                elif source.architecture == "llama":  # final norm and lm_head; bert's pooler is not loaded
                    last += nbytes
                    has_head = has_head or key.startswith("lm_head")
    if source.architecture == "llama" and not has_head:
        last += first  # tied embeddings: the last stage reads the embedding matrix for its head
    return per_layer, first, last


def estimated_costs(model: str) -> ModelCosts:
    """Without timing anything: equal compute per layer, real weight bytes from the file headers.

    What self-placing workers use, so every worker on every host computes the same placement from the same
    Consul view (measured costs differ a little per host and run)."""
    from services.models.registry import resolve_model

    source = resolve_model(model)
    per_layer, first, last = weight_bytes_by_layer(source)
    activation = DEFAULT_SHAPE[0] * DEFAULT_SHAPE[1] * source.hidden_size * 4
    return ModelCosts(
        tuple(LayerCost(1.0, activation, w) for w in per_layer), LayerCost(0.0, 0, first), LayerCost(0.0, 0, last),
        model_id=source.model_id,
    )


def load_costs(model: str, *, measure: bool = False, shape: tuple[int, int] = DEFAULT_SHAPE,
               progress: Callable[[str], None] | None = None) -> tuple[ModelCosts, str]:
    """Costs for planning and where they came from: ``measured`` (now, or cached from an earlier measurement
    on this host at this shape and thread count) or ``estimated`` (equal layers; nothing measured yet)."""
    import torch

    from services.models.registry import default_cache_dir, resolve_model

    if measure:
        return measure_model_costs(model, shape=shape, refresh=True, progress=progress), "measured"
    source = resolve_model(model)
    path = cache_path(default_cache_dir(), source.model_id, source.checksum, "float32", shape, torch.get_num_threads())
    if path.is_file():
        try:
            return costs_from_json(json.loads(path.read_text())), "measured"
        except (OSError, ValueError, KeyError, TypeError, ConfigError):
            pass
    return estimated_costs(model), "estimated"


def parse_shape(text: str) -> tuple[int, int]:
    try:
        batch, tokens = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"shape {text!r}: expected BATCHxTOKENS, e.g. 1x128") from None
    if batch < 1 or tokens < 1:
        raise ConfigError(f"shape {text!r}: batch and tokens must be at least 1")
    return batch, tokens
