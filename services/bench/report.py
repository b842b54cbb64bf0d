"""The results as JSON, as a readable table, and as a plot (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.bench.records import SYSTEMS, BenchRow

COLUMNS = (
    ("system", "system"), ("model", "model"), ("concurrency", "conc"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
    ("throughput_rps", "req/s"), ("ratio_to_single", "p50 / single"), ("throughput_ratio", "req/s / single"),
    ("compute_ms", "compute ms"), ("hop_overhead_ms", "hop overhead ms"), ("hop_queue_ms", "of which queue ms"), ("transfer_gbps", "GB/s per dir"),
    ("activation_bytes", "activation"), ("threads", "threads"), ("matches_single", "same output"),
    ("background_cores", "others' cores"),
)  # fmt: skip


def results_document(
    rows: Sequence[BenchRow], *, suite: str, machine: dict[str, Any], settings: dict[str, Any], started_at: str, finished_at: str
) -> dict[str, Any]:
    return {
        "suite": suite,
        "results": [row.to_json() for row in rows],
        "machine": machine,
        "settings": settings,
        "started_at": started_at,
        "finished_at": finished_at,
    }


def write_json(path: str | Path, document: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "activation_bytes":
        return _size(int(value))
    if key in ("ratio_to_single", "throughput_ratio"):
        return f"{value:.2f}x"
    if key == "matches_single":
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _spread_cell(values: Any) -> str:
    """Rounds' ratios as "min-max (n)": the spread to read a ratio against."""
    known = [v for v in values or () if v is not None]
    if not known:
        return "-"
    return f"{min(known):.2f}-{max(known):.2f}x ({len(known)})"


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """A GitHub-markdown table (also readable in a terminal); errors and notes follow as footnotes."""
    spread = any("ratio_to_single_per_round" in row.extra for row in rows)
    titles = [title for _, title in COLUMNS] + (["p50 / single per round"] if spread else [])
    header = "| " + " | ".join(titles) + " |"
    lines = [header, "|" + "|".join("---" for _ in titles) + "|"]
    notes: list[str] = []
    for row in rows:
        data = row.to_json()
        cells = [_cell(key, data.get(key)) for key, _ in COLUMNS]
        if spread:
            cells.append(_spread_cell(row.extra.get("ratio_to_single_per_round")))
        remark = row.error or row.note
        if remark:
            notes.append(remark)
            cells[0] += f" [{len(notes)}]"
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"[{i}] {text}" for i, text in enumerate(notes, 1)] if notes else []
    return "\n".join(lines)


def plot(rows: Sequence[BenchRow], path: str | Path) -> None:
    """p50 latency (top) and throughput (bottom) per system, grouped by concurrency, one column per model;
    each bar is labelled with its ratio to the single-process reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    # The known systems in their usual order, then any others (--batching: "mesh-direct batch<=8", ...) as they come.
    systems = list(dict.fromkeys([*(s for s in SYSTEMS if any(r.system == s for r in rows)), *(r.system for r in rows)]))
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 8), squeeze=False)
    palette = ("#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#ff9896", "#9467bd", "#8c564b", "#e377c2", "#bcbd22")
    colors = {s: palette[i % len(palette)] for i, s in enumerate([*SYSTEMS, *(s for s in systems if s not in SYSTEMS)])}
    width = 0.8 / max(1, len(systems))
    for col, model in enumerate(models):
        model_rows = [r for r in rows if r.model == model]
        levels = sorted({r.concurrency for r in model_rows})
        shape = next((f"batch {r.batch} x seq {r.seq_len}, {r.stages} stages, {_size(r.activation_bytes)}" for r in model_rows), "")
        for row_index, (metric, ratio_key, label) in enumerate(
            (("p50_ms", "ratio_to_single", "p50 latency (ms)"), ("throughput_rps", "throughput_ratio", "throughput (req/s)"))
        ):
            ax = axes[row_index][col]
            for s_index, system in enumerate(systems):
                for l_index, level in enumerate(levels):
                    row = next((r for r in model_rows if r.system == system and r.concurrency == level), None)
                    x = l_index + (s_index - (len(systems) - 1) / 2) * width
                    value = getattr(row, metric) if row else None
                    if value is None:
                        ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                        continue
                    ax.bar(x, value, width, color=colors[system], label=system if l_index == 0 else None)
                    rel = getattr(row, ratio_key)
                    if rel is not None:
                        ax.text(x, value, f"{rel:.2f}x", ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(levels)), [f"concurrency {c}" for c in levels])
            ax.set_ylabel(label)
            ax.set_title(f"{model} ({shape})" if row_index == 0 else f"{model}: throughput", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            if row_index == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle("shardmesh bench infer: labels = ratio to single process (latency: system/single; throughput: system/single)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
