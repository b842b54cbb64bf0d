"""Logging and Prometheus metrics, set up once by a process's main().

Every metric of the router and the workers is defined here (except the scheduler's, in
router/scheduling/metrics.py, and the result cache's, in router/result_cache.py) and recorded where its event
happens; docs/observability.md lists names, units and labels, and the chart's Grafana dashboard queries them.
Labels stay bounded: worker ids, modes, error class names, never request ids.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.net import split_host_port

REQUESTS = Counter("shardmesh_requests_total", "Requests handled", ["component", "rpc", "code"])
LATENCY = Histogram(
    "shardmesh_request_seconds",
    "Request latency",
    ["component", "rpc"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INFLIGHT = Gauge("shardmesh_inflight_requests", "Requests admitted and not finished", ["component"])
FAILOVERS = Counter("shardmesh_failovers_total", "Hops retried on another replica", ["reason"])
HEDGES = Counter("shardmesh_hedges_total", "Duplicate hop requests sent to a second replica")
DISCOVERY_STALE = Gauge("shardmesh_discovery_stale", "1 while discovery serves a last-known table")
ROUTE_COMPLETE = Gauge("shardmesh_route_complete", "1 while a complete route over all layers exists")

# Router: one hop (direct) or one relayed chain (relay), from sending the stage input to its answer, per first worker.
HOP_SECONDS = Histogram(
    "shardmesh_hop_seconds",
    "Router-observed latency of a successful hop call (relay: the chain starting at this worker)",
    ["worker", "mode"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HOP_FAILURES = Counter(
    "shardmesh_hop_failures_total", "Hop calls that failed, by worker and error class", ["worker", "reason"]
)
EJECTIONS = Counter(
    "shardmesh_ejections_total", "Outlier ejections of a worker (consecutive failures or a failed probe)", ["worker"]
)

# Worker: time in the compute queue and on the compute thread, and requests per forward pass.
_WORKER_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WORKER_QUEUE_SECONDS = Histogram(
    "shardmesh_worker_queue_seconds",
    "Time a request waited for the worker's compute thread; lane=stateless|decode",
    ["lane"],
    buckets=_WORKER_BUCKETS,
)
WORKER_COMPUTE_SECONDS = Histogram(
    "shardmesh_worker_compute_seconds",
    "Compute time of a request on the worker (its batch's forward pass); lane=stateless|decode",
    ["lane"],
    buckets=_WORKER_BUCKETS,
)
WORKER_BATCH_SIZE = Histogram(
    "shardmesh_worker_batch_size",
    "Requests or session steps per forward pass on the worker (1 = alone); "
    "kind=stateless (Forward, dynamic batching)|prefill (session steps of several tokens)|decode (one-token steps)",
    ["kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


def observe_batch(kind: str, size: int) -> None:
    """One forward pass of ``size`` requests or session steps (``kind`` as in WORKER_BATCH_SIZE); none for 0."""
    if size > 0:
        WORKER_BATCH_SIZE.labels(kind=kind).observe(size)


def step_kind(tokens: int) -> str:
    """A session step's WORKER_BATCH_SIZE kind: ``decode`` for one token, ``prefill`` for several."""
    return "decode" if tokens == 1 else "prefill"


# Worker: generation sessions and their KV caches (read at scrape time from the session store).
KV_CACHE_BYTES = Gauge("shardmesh_kv_cache_bytes", "KV cache bytes held: open sessions plus cached prefix blocks")
KV_CACHE_PREFIX_BYTES = Gauge("shardmesh_kv_cache_prefix_bytes", "KV cache bytes held by cached prefix blocks")
KV_CACHE_BUDGET_BYTES = Gauge("shardmesh_kv_cache_budget_bytes", "KV cache budget (--cache-budget-mb)")
SESSIONS = Gauge("shardmesh_sessions", "Open generation sessions on this worker")
SESSIONS_EXPIRED = Counter("shardmesh_sessions_expired_total", "Sessions closed because they idled past their TTL")

# Shared memory between co-located peers.
SHM_IN_FLIGHT_BYTES = Gauge(
    "shardmesh_shm_in_flight_bytes", "Bytes in shared-memory segments this process wrote that no receiver claimed yet"
)
SHM_WRITTEN_BYTES = Counter("shardmesh_shm_written_bytes_total", "Tensor bytes sent through shared memory")
SHM_READ_BYTES = Counter("shardmesh_shm_read_bytes_total", "Tensor bytes received through shared memory")

# Multiplexed bidi streams: direction=inbound (served: ForwardStream, InferStream) | outbound (ForwardStream to a peer).
STREAMS_OPEN = Gauge("shardmesh_streams_open", "Multiplexed streams open now", ["direction"])
STREAMS_OPENED = Counter("shardmesh_streams_opened_total", "Multiplexed streams opened", ["direction"])


def watch(gauge: Gauge, read: Callable[[], float]) -> None:
    """Makes ``gauge`` read ``read()`` at scrape time (from the metrics server's thread, so ``read`` must be
    thread-safe); nothing is recorded on the request path. The latest caller wins (one store per process)."""

    def safe() -> float:
        try:
            return float(read())
        except Exception:  # noqa: BLE001 - a scrape must never fail because of one gauge
            return float("nan")

    gauge.set_function(safe)


def setup_logging(level: str, component: str, log_format: str = "text") -> None:
    """``log_format``: ``text`` (the default, one readable line) or ``json`` (one JSON object per line, with
    the request id and trace id of the request a line is about; see services/logging_json.py)."""
    if log_format == "json":
        from services.logging_json import setup_json_logging

        setup_json_logging(level, component)
        return
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s",
    )


def start_metrics(listen: str | None) -> None:
    """Serves /metrics over HTTP when ``--metrics-listen`` is given."""
    if listen:
        host, port = split_host_port(listen, what="--metrics-listen")
        start_http_server(port, addr=host)
