"""``shardmesh plan``: capacity-proportional layer ranges for N workers, beside the even split.

Prints each stage's range, predicted time and weights, and both splits' predicted throughput. Costs are
measured (``--measure``, or cached from an earlier ``--measure`` on this host) or, failing that, equal
layers, in which case times are in units of one layer at speed 1.0 rather than milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from services.errors import ConfigError
from services.placement.costs import WorkerCapacity, parse_capacities
from services.placement.measure import load_costs, parse_shape
from services.placement.planner import Plan, evaluate, even_spans, plan, split_groups

MIB = 1024 * 1024


def _workers(args: argparse.Namespace) -> list[WorkerCapacity]:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    speeds = parse_capacities(args.capacity, args.workers) if args.capacity else [1.0] * args.workers
    memory = parse_capacities(args.memory_mb, args.workers) if args.memory_mb else [0.0] * args.workers
    if args.bandwidth_mbps < 0:
        raise ConfigError("--bandwidth-mbps must be 0 (free) or positive")
    return [WorkerCapacity(f"w{i}", s, int(m * MIB), args.bandwidth_mbps * 1e6) for i, (s, m) in enumerate(zip(speeds, memory))]


def even_baseline(costs: Any, workers: list[WorkerCapacity], replicas: int, hop_s: float) -> Plan:
    """The even split on the same replica groups: what an operator types without measurements."""
    groups = []
    for group in split_groups(workers, replicas):
        spans = even_spans(costs.total_layers, len(group))
        groups.extend(evaluate(costs, group, spans, hop_overhead_s=hop_s).groups)
    return Plan(tuple(groups))


def _plan_json(result: Plan, workers: dict[str, WorkerCapacity], scale: float) -> dict[str, Any]:
    return {
        "throughput": result.throughput * 1000.0 / scale if scale != 1.0 else result.throughput,  # per second or unit
        "bottleneck": result.bottleneck_s * scale,
        "groups": [[{"worker": s.worker, "layers": str(s.span), "speed": workers[s.worker].speed,
                     "predicted": s.predicted_s * scale, "weight_bytes": s.weight_bytes} for s in g] for g in result.groups],
        "unused": list(result.unused),
    }


def run(args: argparse.Namespace) -> int:
    shape = parse_shape(args.shape)
    workers = _workers(args)
    say = (lambda line: print(line, file=sys.stderr, flush=True))
    costs, origin = load_costs(args.model, measure=args.measure, shape=shape, progress=say)
    hop_s = args.hop_ms / 1000.0
    planned = plan(costs, workers, replicas=args.replicas, hop_overhead_s=hop_s)
    even = even_baseline(costs, workers, args.replicas, hop_s)
    by_name = {w.name: w for w in workers}
    measured = origin == "measured"
    scale, unit = (1000.0, "ms") if measured else (1.0, "layer-units")
    ratio = planned.throughput / even.throughput
    if args.json:
        print(json.dumps({
            "model": args.model, "layers": costs.total_layers, "costs": origin, "shape": list(shape), "unit": unit,
            "layer_costs": [layer.compute_s * scale for layer in costs.layers],
            "planned": _plan_json(planned, by_name, scale), "even": _plan_json(even, by_name, scale),
            "throughput_ratio": ratio,
        }, indent=1))
        return 0
    what = f"measured on this host at {shape[0]}x{shape[1]} tokens" if measured else "estimated (equal layers; --measure to time them)"
    print(f"model {args.model}: {costs.total_layers} layers, costs {what}")
    for title, result in (("planned", planned), ("even split", even)):
        rate = f"{result.throughput:.2f} requests/s" if measured else f"{result.throughput:.3g} per layer-unit"
        print(f"{title}: predicted throughput {rate}, slowest stage {result.bottleneck_s * scale:.2f} {unit}")
        for index, group in enumerate(result.groups):
            prefix = f"  group {index}: " if len(result.groups) > 1 else "  "
            for s in group:
                print(f"{prefix}{s.worker} (speed {by_name[s.worker].speed:g}) layers {str(s.span):>6}  "
                      f"stage {s.predicted_s * scale:8.2f} {unit}  weights {s.weight_bytes / MIB:7.1f} MiB")
        if result.unused:
            print(f"  unused: {', '.join(result.unused)} (the slowest stage would be no faster with them: fewer hops win ties)")
    print(f"planned / even predicted throughput: {ratio:.2f}x")
    return 0
