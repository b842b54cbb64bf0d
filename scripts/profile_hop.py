#!/usr/bin/env python3
"""Where a mesh hop's time goes: py-spy samples of the router and every worker under steady closed-loop load.

Issue 11 asks for the per-hop breakdown before any change to the hop path. This starts a local mesh with
``shardmesh up`` (the production processes), sends back-to-back Infer requests from ``--clients`` clients
(default 1), records each process with ``py-spy record --nonblocking --format raw`` (only threads that are on the
CPU), and sorts every sample into one category by the innermost frame that names one (serialise, codec, gRPC,
event loop, executor hand-off, compute...). Prints one markdown table of CPU per request per process, with each
process's CPU by the kernel's account beside py-spy's, plus the client's p50, and keeps the raw stacks in --out.
Needs ``pip install py-spy``; sampling costs a few % of the sampled process.

    python3 scripts/profile_hop.py --mode direct --seconds 20 --out /tmp/profile
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (category, substrings of a frame); the innermost frame matching any entry decides. Order only breaks ties
# within one frame.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("compute (torch / model)", ("torch/nn/", "torch/_tensor", "services/models/", "transformers/", "torch/functional")),
    ("tensor codec (encode/decode, shm)", ("services/wire/",)),
    ("protobuf (de)serialise", ("google/protobuf", "SerializeToString", "FromString", "ParseFromString")),
    ("executor hand-off / threads", ("concurrent/futures", "threading.py", "to_thread", "run_in_executor")),
    ("gRPC (aio core)", ("grpc/aio/", "grpc/_cython", "cygrpc", "grpc/__init__")),
    ("transport streams (services/transport)", ("services/transport/",)),
    ("event loop", ("asyncio/", "selectors.py", "uvloop")),
    ("router logic", ("router/",)),
    ("worker logic", ("shard_worker/",)),
    ("other services/", ("services/",)),
]


def categorise(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other (interpreter, libraries)"


def shares(raw: Path) -> tuple[Counter[str], int]:
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            counts[categorise(stack)] += int(n)
    return counts, sum(counts.values())


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--stages", default="0:2,2:4,4:6")
    parser.add_argument("--mode", choices=("direct", "relay"), default="direct")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--clients", type=int, default=1, help="closed-loop clients sending at once")
    parser.add_argument("--worker-args", default="--threads 1", help="extra worker flags, e.g. '--max-batch-size 8'")
    parser.add_argument("--router-args", default="", help="extra router flags, e.g. '--coalesce 8'")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="shardmesh-profile-")))
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        print("profile_hop: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 2
    import yaml  # after the check: the script's own dependencies are the project's

    from services.client import RouterClient

    args.out.mkdir(parents=True, exist_ok=True)
    config = {"model": args.model, "mode": args.mode, "workers": [{"layers": s} for s in args.stages.split(",")],
              "worker_args": args.worker_args.split(), "router_args": args.router_args.split()}
    cfg = args.out / "mesh.yaml"
    cfg.write_text(yaml.safe_dump(config))
    up = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up", str(cfg)], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    procs: dict[str, int] = {}
    spies: list[subprocess.Popen[bytes]] = []
    try:
        assert up.stdout is not None
        router = ""
        for line in up.stdout:
            if line.startswith("worker "):
                kv = dict(p.split("=", 1) for p in line.split()[1:])
                procs[kv["name"]] = int(kv["pid"])
            elif line.startswith("ready router="):
                router = line.split("=", 1)[1].strip()
                break
        procs["router"] = next(p for p in children(up.pid) if " router " in cmdline(p))
        ids = [101] + [2023] * (args.tokens - 2) + [102]
        latencies: list[float] = []
        with RouterClient(router) as client:
            for _ in range(30):  # warm-up: connections, shm, first-call paths
                client.infer(tokens=ids)
            for name, pid in procs.items():
                spies.append(subprocess.Popen(
                    ["py-spy", "record", "--nonblocking", "--format", "raw", "--rate", str(args.rate),
                     "--duration", str(int(args.seconds)), "--pid", str(pid), "-o", str(args.out / f"{name}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            cpu_before = {name: _cpu_s(pid) for name, pid in procs.items()}
            end = time.monotonic() + args.seconds

            def loop() -> None:
                with RouterClient(router) as own:  # a sync client runs its own loop: one per thread
                    while time.monotonic() < end:
                        t = time.perf_counter()
                        own.infer(tokens=ids)
                        latencies.append(1000 * (time.perf_counter() - t))

            with ThreadPoolExecutor(args.clients) as pool:
                for future in [pool.submit(loop) for _ in range(args.clients)]:
                    future.result()  # a client's failed request ends the run with its error, not silently
        cpu_used = {name: _cpu_s(pid) - cpu_before[name] for name, pid in procs.items()}
        for spy in spies:
            spy.wait(timeout=args.seconds + 60)
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
    p50 = statistics.median(latencies)
    print(f"{args.model} {args.mode} {args.stages} {args.tokens} tokens, {args.clients} clients, workers "
          f"{args.worker_args!r}: {len(latencies)} requests, client p50 "
          f"{p50:.2f} ms; load {os.getloadavg()[0]:.2f}; stacks in {args.out}")
    names = [n for n, _ in CATEGORIES] + ["other (interpreter, libraries)"]
    table = {name: shares(args.out / f"{name}.txt") for name in procs if (args.out / f"{name}.txt").exists()}
    print("| category | " + " | ".join(f"{n} ms/request" for n in table) + " |")
    print("|---|" + "---|" * len(table))
    for cat in names:
        cells = []
        for counts, total in table.values():
            # CPU ms per request: samples / rate over the requests sent while sampling
            cells.append(f"{1000 * counts[cat] / args.rate / max(1, len(latencies)):.3f}")
        print(f"| {cat} | " + " | ".join(cells) + " |")
    print("| **total on CPU** | " + " | ".join(
        f"{1000 * total / args.rate / max(1, len(latencies)):.3f}" for _, total in table.values()) + " |")
    # py-spy's "active" is a heuristic that counts a runnable thread waiting for a core as on the CPU, so under
    # contention (more clients than cores) its totals overstate; the kernel's own account does not.
    print("| **CPU by the kernel's account** | " + " | ".join(
        f"{1000 * cpu_used[name] / max(1, len(latencies)):.3f}" for name in table) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
