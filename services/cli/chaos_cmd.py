"""``shardmesh chaos SCENARIO.yaml...``: run chaos scenarios against local meshes; exit 0 only if every
scenario's invariants hold (nothing lost, nothing wrong, exactly-once steps, faults that hit)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from services.chaos.scenario import Scenario, load_scenario


def _plot_path(base: str, name: str, many: bool) -> str:
    if not many:
        return base
    p = Path(base)
    return str(p.with_name(f"{p.stem}-{name}{p.suffix or '.png'}"))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s %(message)s")
    scenarios: list[Scenario] = [load_scenario(path) for path in args.scenarios]  # all validated before any runs
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        print(f"shardmesh chaos: error: scenario names must be unique, repeated: {', '.join(dupes)}", file=sys.stderr)
        return 2
    if args.check_only:
        for s in scenarios:
            print(f"ok {s.name}: {len(s.faults)} fault(s), {s.mesh.mode}, {s.mesh.model}")
        return 0

    from services.chaos.history import History
    from services.chaos.report import markdown_table, plot_timeline
    from services.chaos.runner import run_scenario

    results: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for scenario in scenarios:
        t0 = time.monotonic()
        print(f"chaos scenario {scenario.name} ...", flush=True)
        result = run_scenario(scenario, echo=args.log_level == "debug")
        result["wall_s"] = round(time.monotonic() - t0, 1)
        v = result["verdict"]
        print(f"  {'PASS' if v['passed'] else 'FAIL'} {scenario.name}: {v['requests']} requests, {v['lost']} lost, "
              f"{v['wrong']} wrong ({result['wall_s']} s)", flush=True)
        for problem in v["problems"]:
            print(f"    - {problem}", flush=True)
        events = result.pop("events")
        if args.history_dir:
            Path(args.history_dir).mkdir(parents=True, exist_ok=True)
            h = History()
            h.events = list(events)
            h.write(Path(args.history_dir) / f"{scenario.name}.jsonl")
        if args.plot:
            plot_timeline(result, events, _plot_path(args.plot, scenario.name, len(scenarios) > 1))
        result["history"] = [json.loads(e.to_json()) for e in events] if args.json_path else None
        results.append(result)
        _write(args, results, started, len(scenarios))  # after each scenario: a long matrix run keeps what it has
    print(markdown_table(results))
    passed = sum(r["verdict"]["passed"] for r in results)
    print(f"{passed} of {len(results)} scenarios passed")
    return 0 if passed == len(results) else 1


def _write(args: argparse.Namespace, results: list[dict[str, Any]], started: str, planned: int) -> None:
    from services.chaos.report import markdown_table, problems_list

    passed = sum(r["verdict"]["passed"] for r in results)
    summary = f"{passed} of {len(results)} scenarios passed" + (f" ({planned - len(results)} not run yet)" if planned > len(results) else "")
    if args.markdown:
        Path(args.markdown).write_text(f"{markdown_table(results)}\n\n{summary}\n\nProblems:\n{problems_list(results)}\n")
    if args.json_path:
        document = {"suite": "chaos", "started_at": started, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "summary": summary, "results": results}
        Path(args.json_path).write_text(json.dumps(document, indent=1, default=str) + "\n")
