#!/usr/bin/env python3
"""What tracing costs a request: client p50 of one mesh per tracing setting, measured in interleaved rounds.

Issue 13 asks for tracing "off by default, no cost when off". This starts one local mesh per setting with
``shardmesh up`` (the production processes; the setting goes to router and workers by environment):

- ``off``: the default (``--trace-sample-ratio 0``; opentelemetry is never imported);
- ``on-unsampled``: the SDK on, ratio 1e-9 (traceparent handling, no span recorded);
- ``on-all``: ratio 1, every request recorded and exported by OTLP to a port where nothing listens (the
  batch exporter drops what it cannot send: the cost of a collector that is down).

It then sends back-to-back Infer requests from one client, ``--seconds`` per setting per round, for
``--rounds`` rounds in rotating order (so drifting machine load falls on every setting alike), and prints
one markdown table: p50 per round and the median of the rounds' p50s, with the load average.

    python3 scripts/trace_cost.py --rounds 3 --seconds 8
    python3 scripts/trace_cost.py --compare fast-exit   # the same for the workers' fast-exit allocator (#11)
    python3 scripts/trace_cost.py --compare code --baseline /tmp/old   # this checkout against another one
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SETTINGS: dict[str, dict[str, str]] = {
    "off": {"SHARDMESH_TRACE_SAMPLE_RATIO": "0"},
    "on-unsampled": {"SHARDMESH_TRACE_SAMPLE_RATIO": "1e-9", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
    "on-all": {"SHARDMESH_TRACE_SAMPLE_RATIO": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
}
# --compare fast-exit: the workers' fast-exit allocator (services/memory.py: glibc malloc for Python objects, its
# heap in huge pages, so a killed worker's sockets close in ~20 ms) against Python's own allocator.
COMPARISONS: dict[str, dict[str, dict[str, str]]] = {
    "tracing": SETTINGS,
    "fast-exit": {"fast-exit": {"SHARDMESH_FAST_EXIT": "1"}, "pymalloc": {"SHARDMESH_FAST_EXIT": "0"}},
    "shm-threshold": {"shm-1MiB": {"SHARDMESH_SHM_MIN_BYTES": str(1 << 20)},
                      "shm-64KiB": {"SHARDMESH_SHM_MIN_BYTES": str(1 << 16)}},
}
READY_TIMEOUT_S = 300.0
CODE_DIR = "@code"  # a setting's pseudo-variable: the checkout its mesh runs from


@contextlib.contextmanager
def mesh(name: str, env: dict[str, str], args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    """A ``shardmesh up`` mesh with ``env`` added; yields the router address, stops the mesh after."""
    import yaml

    config = {"model": args.model, "mode": args.mode, "workers": [{"layers": s} for s in args.stages.split(",")],
              "worker_args": ["--threads", "1"]}
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(env)
    code = Path(env.pop(CODE_DIR, REPO))  # --compare code: the mesh runs that checkout's code (python -m from its root)
    child_env = {k: v for k, v in os.environ.items() if k not in ("SHARDMESH_TRACE_FILE",)} | env
    up = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up", str(cfg)], cwd=code, text=True,
                          env=child_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        router = ""
        for line in up.stdout:
            if line.startswith("ready router="):
                router = line.split("=", 1)[1].strip()
                break
            if time.monotonic() > deadline:
                break
        if not router:
            raise RuntimeError(f"mesh {name} did not become ready")
        yield router
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(timeout=30)


def measure(client: object, ids: list[int], seconds: float) -> tuple[float, int]:
    """Client p50 in ms of back-to-back Infers for ``seconds``, and how many were sent."""
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        client.infer(tokens=ids)  # type: ignore[attr-defined]
        latencies.append(1000 * (time.perf_counter() - t))
    return statistics.median(latencies), len(latencies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--stages", default="0:2,2:4,4:6")
    parser.add_argument("--mode", choices=("direct", "relay"), default="direct")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per setting per round")
    parser.add_argument("--compare", choices=sorted([*COMPARISONS, "code"]), default="tracing",
                        help="the settings to compare (the first is the baseline); code: --baseline against this checkout")
    parser.add_argument("--baseline", type=Path, help="--compare code: another checkout (e.g. a git worktree)")
    args = parser.parse_args()
    if args.compare == "code":
        if args.baseline is None or not (args.baseline / "services").is_dir():
            parser.error("--compare code needs --baseline DIR, a checkout of this repository")
        settings = {f"baseline ({args.baseline.name})": {CODE_DIR: str(args.baseline.resolve())}, "this checkout": {}}
    else:
        settings = COMPARISONS[args.compare]

    from services.client import RouterClient

    ids = [101] + [2023] * (args.tokens - 2) + [102]
    loads = [os.getloadavg()[0]]
    p50s: dict[str, list[float]] = {name: [] for name in settings}
    counts: dict[str, int] = dict.fromkeys(settings, 0)
    with tempfile.TemporaryDirectory(prefix="shardmesh-trace-cost-") as tmp, contextlib.ExitStack() as stack:
        clients = {}
        for name, env in settings.items():
            router = stack.enter_context(mesh(name, env, args, Path(tmp)))
            client = stack.enter_context(RouterClient(router))
            for _ in range(30):  # warm-up: connections, first-call paths, the tracing SDK's first spans
                client.infer(tokens=ids)
            clients[name] = client
        names = list(settings)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
                p50, n = measure(clients[name], ids, args.seconds)
                p50s[name].append(p50)
                counts[name] += n
            loads.append(os.getloadavg()[0])
    print(f"{args.model} {args.mode} {args.stages}, {args.tokens} tokens, 1 client, {args.rounds} rounds x "
          f"{args.seconds:.0f} s per setting; load average (1 min) {min(loads):.2f} to {max(loads):.2f}")
    print("| setting | requests | p50 per round (ms) | median of rounds (ms) | vs " + names[0] + " |")
    print("|---|---|---|---|---|")
    base = statistics.median(p50s[names[0]])
    for name in settings:
        med = statistics.median(p50s[name])
        rounds = ", ".join(f"{v:.2f}" for v in p50s[name])
        print(f"| {name} | {counts[name]} | {rounds} | {med:.2f} | {100 * (med / base - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
