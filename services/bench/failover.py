"""``shardmesh bench failover``: what a failure costs, measured under steady load.

For each scenario a local mesh of minilm with 2 replicas per stage serves 4 clients; one worker is
killed (SIGKILL) or hung (SIGSTOP) a third of the way in. The recorded history gives: requests lost
(must be 0), outputs differing from the single-process model (must be 0), time from the fault to the
first success that avoided the faulty worker, and the extra latency of the requests the fault hit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.bench.machine import describe_machine
from services.chaos.checker import check_history
from services.chaos.faults import inject, resume_all
from services.chaos.load import LoadGenerator
from services.localmesh.launcher import LocalMesh
from services.localmesh.spec import parse_spec
from services.models.registry import resolve_model

TEXTS = (
    "The router keeps each stage's input until the stage answers.",
    "A hung worker keeps its socket open and answers nothing.",
    "Failover must not recompute what upstream stages already did.",
    "Every output must equal the single-process reference bit for bit.",
)
HOP_TIMEOUT_MS = 1000


@dataclass(frozen=True)
class Scenario:
    mode: str
    fault: str
    hedge_after_ms: int = 0

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.fault}" + (f"-hedge{self.hedge_after_ms}ms" if self.hedge_after_ms else "")


SCENARIOS = (
    Scenario("direct", "kill"),
    Scenario("relay", "kill"),
    Scenario("direct", "hang"),
    Scenario("direct", "hang", hedge_after_ms=50),
    Scenario("relay", "hang"),
)
QUICK = (Scenario("direct", "kill"), Scenario("direct", "hang", hedge_after_ms=50))


async def _run_scenario(scenario: Scenario, references: Mapping[str, Any], requests_per_client: int) -> dict[str, Any]:
    router_args = ["--hop-timeout-ms", str(HOP_TIMEOUT_MS), "--eject-after-failures", "2", "--eject-base-s", "5"]
    if scenario.hedge_after_ms:
        router_args += ["--hedge-after-ms", str(scenario.hedge_after_ms)]
    spec = parse_spec(
        {
            "model": "minilm",
            "mode": scenario.mode,
            "workers": [{"layers": "0:3", "replicas": 2}, {"layers": "3:6", "replicas": 2}],
            "router_args": router_args,
            "worker_args": ["--threads", "1"],
        }
    )
    mesh = LocalMesh(spec)
    await mesh.start()
    try:
        load = LoadGenerator(mesh.router_address, TEXTS, clients=4, requests_per_client=requests_per_client, mode=scenario.mode)
        running = asyncio.create_task(load.run())
        await load.wait_completed(4 * requests_per_client // 3, timeout_s=300)
        victim = "w1r0" if scenario.mode == "relay" else "w0r0"
        record = await inject(mesh, scenario.fault, victim)
        history = await asyncio.wait_for(running, 600)
        verdict = check_history(history, references, fault_at=record.at, faulty_workers=frozenset({victim}))
    finally:
        await resume_all(mesh)
        await mesh.stop()
    return {
        "scenario": scenario.name,
        "mode": scenario.mode,
        "fault": scenario.fault,
        "hedge_after_ms": scenario.hedge_after_ms,
        "hop_timeout_ms": HOP_TIMEOUT_MS,
        "victim": victim,
        "requests": verdict.requests,
        "lost": verdict.failed,
        "wrong_outputs": verdict.wrong,
        "affected_requests": verdict.affected,
        "baseline_p50_ms": verdict.baseline_p50_ms,
        "first_success_after_fault_ms": verdict.first_success_after_fault_ms,
        "affected_extra_ms_p50": verdict.affected_extra_ms_p50,
        "affected_extra_ms_max": verdict.affected_extra_ms_max,
        "problems": list(verdict.problems),
    }


def _references() -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")
    return {t: model.encode(t, convert_to_tensor=True) for t in TEXTS}


def _table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    head = "| scenario | requests | lost | wrong | affected | baseline p50 ms | fault -> first good ms | affected extra p50 ms | affected extra max ms |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['requests']} | {r['lost']} | {r['wrong_outputs']} | {r['affected_requests']} | "
            f"{f(r['baseline_p50_ms'])} | {f(r['first_success_after_fault_ms'])} | {f(r['affected_extra_ms_p50'])} | "
            f"{f(r['affected_extra_ms_max'])} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["scenario"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(names, [r["affected_extra_ms_max"] or 0 for r in rows], label="affected request: max extra ms")
    ax.bar(names, [r["affected_extra_ms_p50"] or 0 for r in rows], label="affected request: p50 extra ms")
    ax.axhline(100, color="red", linestyle="--", linewidth=1, label="kill target: 100 ms")
    ax.axhline(1000, color="orange", linestyle=":", linewidth=1, label="hang target: 1 s")
    ax.set_ylabel("extra latency (ms)")
    ax.set_title("shardmesh failover cost (minilm, 2 replicas per stage, 4 clients)")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    scenarios = QUICK if args.quick else SCENARIOS
    per_client = args.requests or (15 if args.quick else 60)
    references = _references()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = []
    for scenario in scenarios:
        print(f"failover scenario {scenario.name} ...", flush=True)
        rows.append(asyncio.run(_run_scenario(scenario, references, per_client)))
    print(_table(rows))
    document = {
        "suite": "failover",
        "results": rows,
        "machine": describe_machine(),
        "settings": {"clients": 4, "requests_per_client": per_client, "scenarios": [asdict(s) for s in scenarios]},
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(document, indent=2) + "\n")
    if args.plot:
        _plot(rows, args.plot)
    return 0 if all(r["lost"] == 0 and r["wrong_outputs"] == 0 for r in rows) else 1
