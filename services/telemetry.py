"""Logging and Prometheus metrics, set up once by a process's main()."""

from __future__ import annotations

import logging
import sys

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


def setup_logging(level: str, component: str) -> None:
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
