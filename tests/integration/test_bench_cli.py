"""``shardmesh bench --quick --rounds 2`` end to end: every system measured in two interleaved rounds (or its row
says why not), rows pooling both rounds with the per-round spread, JSON and plot written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.procs import CLI, Proc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUIRED = {"system", "model", "concurrency", "p50_ms", "p99_ms", "throughput_rps", "ratio_to_single"}
SYSTEMS = {"single", "mesh-direct", "mesh-relay", "torch-rpc"}


@pytest.mark.timeout(420)
def test_bench_quick_writes_json_and_plot(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = Proc([*CLI, "bench", "--quick", "--rounds", "2", "--json", str(out_json), "--plot", str(out_png)])
    code = proc.wait(400)
    assert code == 0, "\n".join(proc.stderr[-40:])
    doc = json.loads(out_json.read_text())
    assert {"results", "machine", "started_at"} <= set(doc)
    rows = doc["results"]
    assert all(REQUIRED <= set(row) for row in rows)
    assert {row["system"] for row in rows} >= SYSTEMS
    assert {row["concurrency"] for row in rows} == {1, 2}
    for row in rows:
        if row["system"] == "mesh-relay" and row.get("error"):
            assert row["error"].startswith("relay mode not available")
            continue
        assert "error" not in row, row
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["throughput_rps"] > 0
        assert row["ratio_to_single"] > 0
        assert row["matches_single"] is True, row  # same computation in every system
        if row["system"] != "single":
            assert row["hop_overhead_ms"] is not None and row["transfer_gbps"] is not None
        # two rounds pooled: each round's p50 and ratios kept, and the pooled p50 lies within the rounds' range
        extra = row["extra"]
        assert extra["rounds"] == 2 and len(extra["p50_ms_per_round"]) == 2, extra
        assert min(extra["p50_ms_per_round"]) <= row["p50_ms"] <= max(extra["p50_ms_per_round"]), row
        assert all(r > 0 for r in extra["ratio_to_single_per_round"] + extra["throughput_ratio_per_round"]), extra
    assert doc["settings"]["rounds"] == 2
    assert {r["requests"] for r in rows if r["system"] == "mesh-direct"} == {2 * doc["settings"]["workloads"][0]["requests"]}
    single = [r for r in rows if r["system"] == "single" and r["concurrency"] == 1]
    assert len(single[0]["extra"]["threads_per_round"]) == 2  # it picks its faster setting anew each round
    assert single and single[0]["ratio_to_single"] == pytest.approx(1.0)
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| system |" in "\n".join(proc.stdout) and "p50 / single per round" in "\n".join(proc.stdout)
    assert sum("round 2 of 2" in line for line in proc.stderr + proc.stdout) >= 1


@pytest.mark.timeout(420)
def test_bench_batching_quick_runs_the_coalescing_router(tmp_path: Path) -> None:
    """``--batching``: the batched mesh's router coalesces (--coalesce) and its workers batch; every output
    stays within the batching bound of the single process, and the suite records what it ran. ``--rounds 2``:
    the single process and each mesh run twice, interleaved, and every row pools both rounds."""
    out_json = tmp_path / "batching.json"
    proc = Proc([*CLI, "bench", "infer", "--quick", "--batching", "1,4", "--rounds", "2", "--json", str(out_json)])
    code = proc.wait(400)
    assert code == 0, "\n".join(proc.stderr[-40:])
    doc = json.loads(out_json.read_text())
    settings = doc["settings"]
    assert settings["batching_router_coalesce"] is True and settings["batching_max_batch_sizes"] == [1, 4]
    rows = [r for r in doc["results"] if r["system"] != "single"]
    assert len(rows) == 4 and all("error" not in r and r["matches_single"] is True for r in rows), rows
    assert sum("round 2 of 2: batch:1, batch:4, single" in line for line in proc.stderr + proc.stdout) == 1
    for row in rows:
        extra = row["extra"]
        assert extra["rounds"] == 2 and len(extra["p50_ms_per_round"]) == 2, extra
        assert min(extra["p50_ms_per_round"]) <= row["p50_ms"] <= max(extra["p50_ms_per_round"]), row
        assert extra["max_hop_batch"] >= 1 and extra["mean_hop_batch"] >= 1, extra
    assert {r["threads"] for r in rows} == {max(1, (os.cpu_count() or 1) // 3)}  # the cores shared by 3 stages
