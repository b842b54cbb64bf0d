"""``shardmesh chaos`` through its real CLI: a CI-sized subset of the matrix (tests/chaos/scenarios/, the
invariants without timing targets) against real meshes, and the CLI's refusal of a bad scenario."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.procs import CLI, REPO

SCENARIOS = Path(__file__).parent / "scenarios"


def test_bad_scenario_is_refused_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mesh: {model: tiny-llama}\nfaults:\n  - {kind: delay, target: w0r0, at_s: 1, duration_s: 1, delay: 5}\n")
    run = subprocess.run([*CLI, "chaos", str(bad)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2
    assert "faults[0]: unknown key(s) delay" in run.stderr


@pytest.mark.chaos
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ci_scenarios_pass_and_their_faults_hit(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    files = sorted(str(p) for p in SCENARIOS.glob("ci-*.yaml"))
    run = subprocess.run(
        [*CLI, "chaos", *files, "--json", str(out), "--plot", str(tmp_path / "t.png"), "--history-dir", str(tmp_path / "h")],
        capture_output=True, text=True, cwd=REPO, timeout=880,
    )
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"ci-direct-kill", "ci-relay-blackhole", "ci-generate-hang"}
    for name, r in results.items():
        v = r["verdict"]
        assert v["passed"], (name, v["problems"], r.get("error"))
        assert v["lost"] == 0 and v["wrong"] == 0 and v["exactly_once_violations"] == 0
        (fault,) = v["faults"]
        assert fault["in_flight"] > 0, (name, fault)  # requests were in flight at the injection ...
        assert fault["hit"] > 0, (name, fault)  # ... and some of them met the fault
        assert (tmp_path / f"t-{name}.png").stat().st_size > 0
        history = (tmp_path / "h" / f"{name}.jsonl").read_text().splitlines()
        assert sum('"type":"invoke"' in line for line in history) == v["requests"]
    # The kill and the hang must have been survived by failover, not by luck.
    assert results["ci-direct-kill"]["verdict"]["faults"][0]["failovers"] > 0
    generated = [e for e in results["ci-generate-hang"]["history"] if e["type"] == "ok" and e["op"] == "generate"]
    assert generated, "the generation scenario produced no finished generation"
    assert run.returncode == 0, run.stdout[-3000:]
