"""What to measure: workloads (model, input shape, split) and the plan for one run. Pure: no torch.

The plan is built once in :func:`services.bench.main.run` from the parsed flags and an injected
environment mapping, then passed down; nothing here reads ``os.environ`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from services.bench.records import SYSTEM_TORCH_RPC, SYSTEM_TORCH_RPC_SHM
from services.errors import ConfigError

# Env override for the torch intra-op threads of every mesh worker and rpc stage (the bench CLI has no
# flag for it yet); the default is one per core, like the single-process reference.
WORKER_THREADS_ENV = "SHARDMESH_BENCH_WORKER_THREADS"
# Env override for the batched mesh's workers' --max-queue-delay-us (--batching only; default 0 = continuous
# batching): how long a stage waits for a fuller batch, to measure that trade at 16 clients.
QUEUE_DELAY_ENV = "SHARDMESH_BENCH_MAX_QUEUE_DELAY_US"
# Env override (--batching only): 1 (default) = the batched mesh's router also runs --coalesce N (N = the
# workers' --max-batch-size), so waiting requests share one message per hop; 0 = worker batching alone.
COALESCE_ENV = "SHARDMESH_BENCH_COALESCE"
# Environment for every child process (mesh workers, router, rpc processes). torch's OpenMP (libgomp)
# threads spin-wait after each parallel region; with three stage processes on 2 cores the idle stages'
# spinning steals the cores from the one computing (measured: minilm mesh p50 344 ms instead of 37 ms
# with 2 threads per worker). PASSIVE makes waiting threads sleep. Set by the caller around the run,
# since libgomp reads it when a process loads torch.
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
DEFAULT_CONCURRENCY = "1,8"
QUICK_CONCURRENCY = (1, 2)
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Workload:
    """One model, one input shape and one split; every system runs exactly this."""

    model: str
    batch: int
    seq_len: int
    split: tuple[str, ...]  # "START:END" per stage, contiguous
    requests: int  # measured requests per (system, concurrency); at least the concurrency
    warmup: int  # unmeasured requests per system before measuring
    request_timeout_s: float  # deadline of one request end to end
    seed: int = 1234

    @property
    def label(self) -> str:
        return f"{self.model} {self.batch}x{self.seq_len}"

    def requests_at(self, concurrency: int) -> int:
        """Every concurrent client sends at least one request, so a level is really exercised."""
        return max(self.requests, concurrency)


MINILM = Workload(
    model="minilm", batch=1, seq_len=128, split=("0:2", "2:4", "4:6"), requests=100, warmup=5, request_timeout_s=60.0
)
# 16 x 256 tokens x hidden 512 x 4 B = 8 MiB per activation: the large-activation case. 16 x 256 rather
# than 4 x 1024 because it has the same activation size with less attention compute (~4 s per request
# on 2 cores instead of ~4.5-6.5 s), so more requests fit into one run.
LLAMA_WIDE = Workload(
    model="tiny-llama-wide",
    batch=16,
    seq_len=256,
    split=("0:3", "3:6", "6:8"),
    requests=16,
    warmup=2,
    request_timeout_s=600.0,
)
QUICK = Workload(
    model="minilm", batch=1, seq_len=16, split=("0:2", "2:4", "4:6"), requests=6, warmup=2, request_timeout_s=60.0
)
# --batching: the short texts (all-MiniLM-L6-v2 on ~14 tokens), where one request is mostly
# per-call overhead and batching has the most to gain.
MINILM_SHORT = Workload(
    model="minilm", batch=1, seq_len=14, split=("0:2", "2:4", "4:6"), requests=320, warmup=10, request_timeout_s=60.0
)
BATCHING_CONCURRENCY = (1, 16)
QUICK_BATCHING = Workload(
    model="minilm", batch=1, seq_len=14, split=("0:2", "2:4", "4:6"), requests=8, warmup=2, request_timeout_s=60.0
)


DEFAULT_ROUNDS = 3  # the ordinary suite: every system three times, interleaved, so a ratio shows its spread


@dataclass(frozen=True)
class BenchPlan:
    workloads: tuple[Workload, ...]
    concurrency: tuple[int, ...]
    worker_threads: int  # torch intra-op threads in each mesh worker and each rpc stage
    child_env: tuple[tuple[str, str], ...]  # environment added for child processes (see CHILD_ENV)
    single_threads: tuple[int, ...]  # candidate settings; the single-process reference uses the fastest
    rpc_systems: tuple[str, ...] = (SYSTEM_TORCH_RPC,)  # which torch.distributed.rpc variants to run
    start_timeout_s: float = START_TIMEOUT_S
    quick: bool = False
    # --batching: the workers' --max-batch-size values to compare (mesh-direct only; 1 = batching off).
    # Empty = the ordinary suite.
    batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0  # the batched mesh's workers' --max-queue-delay-us (QUEUE_DELAY_ENV)
    coalesce: bool = True  # the batched mesh's router coalesces waiting requests too (COALESCE_ENV)
    rounds: int = 1  # the ordinary suite runs every system this many times, interleaved (--rounds)


def _positive_ints(text: str, flag: str, what: str) -> tuple[int, ...]:
    """``1,8`` -> (1, 8): comma-separated integers >= 1, in order, repeats dropped."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers like 1,8, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise ConfigError(f"{flag}: {what} must be integers >= 1, got {text!r}")
    return tuple(dict.fromkeys(values))  # keep order, drop repeats


def parse_concurrency(text: str) -> tuple[int, ...]:
    return _positive_ints(text, "--concurrency", "levels")


def _env_int(environ: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise ConfigError(f"${name}: expected an integer >= {minimum}, got {raw!r}")
    return int(raw)


def _default_worker_threads(workloads: tuple[Workload, ...], cpu_count: int, batching: bool) -> int:
    """One per core, like the single-process reference; but the --batching suite measures throughput with
    every stage busy at once, so there the host's cores are shared out between its stages (on 2 cores, 3
    stages of 2 threads each oversubscribe them: 16-client throughput 57 req/s against 79 with 1 thread)."""
    if not batching:
        return max(1, cpu_count)
    return max(1, cpu_count // max(len(w.split) for w in workloads))


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``--batching 1,8``: the workers' --max-batch-size values to compare (1 = batching off)."""
    return _positive_ints(text, "--batching", "--max-batch-size values")


def build_plan(
    *,
    quick: bool,
    requests: int,
    concurrency: str,
    cpu_count: int,
    environ: Mapping[str, str],
    batching: str | None = None,
    rounds: int = 0,
) -> BenchPlan:
    """The run's plan. ``--quick`` uses a short minilm input and concurrency 1,2 (unless levels are given).

    ``batching`` (``--batching 1,8``): instead of the ordinary workloads, minilm on short texts through
    mesh-direct once per --max-batch-size value, at concurrency 1,16 unless levels are given.
    """
    if requests < 0:
        raise ConfigError(f"--requests: expected an integer >= 0 (0 = suite default), got {requests}")
    if rounds < 0:
        raise ConfigError(f"--rounds: expected an integer >= 0 (0 = suite default), got {rounds}")
    if batching:
        workloads: tuple[Workload, ...] = (QUICK_BATCHING,) if quick else (MINILM_SHORT,)
    else:
        workloads = (QUICK,) if quick else (MINILM, LLAMA_WIDE)
    if requests:
        workloads = tuple(replace(w, requests=requests) for w in workloads)
    levels = QUICK_CONCURRENCY if quick and concurrency == DEFAULT_CONCURRENCY else parse_concurrency(concurrency)
    if batching and concurrency == DEFAULT_CONCURRENCY:
        levels = BATCHING_CONCURRENCY
    return BenchPlan(
        workloads=workloads,
        concurrency=levels,
        worker_threads=_env_int(environ, WORKER_THREADS_ENV, _default_worker_threads(workloads, cpu_count, bool(batching)), 1),
        child_env=tuple(CHILD_ENV.items()),
        single_threads=tuple(sorted({1, max(1, cpu_count)})),
        # The shm variant only in full runs: it is the slower one to run on 2 cores and adds ~40 s per workload.
        rpc_systems=() if batching else (SYSTEM_TORCH_RPC,) if quick else (SYSTEM_TORCH_RPC, SYSTEM_TORCH_RPC_SHM),
        quick=quick,
        batch_sizes=parse_batch_sizes(batching) if batching else (),
        max_queue_delay_us=_env_int(environ, QUEUE_DELAY_ENV, 0, 0),
        coalesce=bool(_env_int(environ, COALESCE_ENV, 1, 0)),
        rounds=rounds or (1 if quick else DEFAULT_ROUNDS),
    )
