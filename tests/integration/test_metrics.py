"""Metrics and structured logs of a real mesh: a router and two workers on loopback with --metrics-listen,
--log-format json and tracing on (spans to a file); one Infer and one Generate, then every process's /metrics is
scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from services.client import AsyncRouterClient, RouterClient, build_generate_request
from tests.procs import Proc, retry_until, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MODEL = "tiny-llama"  # both Infer and Generate (sessions, KV cache), and small
REQUEST_ID = "metrics-probe-1"
# [8, 520] token ids: the first stage's output (8 x 520 x 64 float32) is over 1 MiB, so it goes by shared memory.
BATCH, TOKENS = 8, 520


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mesh:
    router: str
    router_metrics: str
    workers: dict[str, str]  # worker id -> metrics address
    procs: dict[str, Proc]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    procs: dict[str, Proc] = {}
    metrics: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as env:
        # Tracing on, spans to a file (no collector): log lines about a request then carry its trace id.
        env.setenv("SHARDMESH_TRACE_FILE", str(tmp_path_factory.mktemp("spans") / "spans.jsonl"))
        yield from _start(procs, metrics)


def _start(procs: dict[str, Proc], metrics: dict[str, str]) -> Iterator[Mesh]:
    try:
        addresses = []
        for worker_id, layers in (("w0", "0:3"), ("w1", "3:6")):
            metrics[worker_id] = f"127.0.0.1:{_free_port()}"
            proc, address = start_worker(
                MODEL, layers, "--worker-id", worker_id, "--metrics-listen", metrics[worker_id],
                "--log-format", "json", "--log-level", "debug", "--trace-sample-ratio", "1",
            )
            procs[worker_id], _ = proc, addresses.append(address)
        for address in addresses:
            wait_serving(address)
        router_metrics = f"127.0.0.1:{_free_port()}"
        procs["router"], router = start_router(
            addresses, "--mode", "direct", "--metrics-listen", router_metrics, "--log-format", "json", "--log-level", "debug",
            "--trace-sample-ratio", "1",
        )
        wait_serving(router)
        yield Mesh(router, router_metrics, metrics, procs)
    finally:
        for proc in procs.values():
            proc.stop()


def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on http://address/metrics: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of ``name`` over samples whose labels include ``labels``; fails if there is none."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def test_one_request_shows_up_in_every_process_metrics(mesh: Mesh) -> None:
    ids = torch.randint(0, 512, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    with RouterClient(mesh.router) as client:
        result = retry_until(lambda: client.infer(tensor=ids, request_id=REQUEST_ID, timeout_s=120))
    assert [h.worker_id for h in result.hops] == ["w0", "w1"]

    router = scrape(mesh.router_metrics)
    for worker_id in mesh.workers:
        assert value(router, "shardmesh_hop_seconds_count", worker=worker_id, mode="direct") >= 1
        assert value(router, "shardmesh_hop_seconds_sum", worker=worker_id, mode="direct") > 0
    assert value(router, "shardmesh_requests_total", component="router", rpc="Infer", code="OK") >= 1
    assert value(router, "shardmesh_request_seconds_count", component="router", rpc="Infer") >= 1
    assert value(router, "shardmesh_queue_seconds_count", kind="infer") >= 1
    assert value(router, "shardmesh_streams_open", direction="outbound") == 2  # one ForwardStream per worker
    assert value(router, "shardmesh_streams_opened_total", direction="outbound") >= 2
    assert value(router, "shardmesh_route_complete") == 1
    assert value(router, "shardmesh_inflight_requests", component="router") == 0
    # The router sent w1 the >1 MiB activation through shared memory, and w0's reply came the same way.
    assert value(router, "shardmesh_shm_written_bytes_total") >= BATCH * TOKENS * 64 * 4
    assert value(router, "shardmesh_shm_read_bytes_total") >= BATCH * TOKENS * 64 * 4

    for worker_id, address in mesh.workers.items():
        worker = scrape(address)
        assert value(worker, "shardmesh_worker_compute_seconds_count", lane="stateless") >= 1, worker_id
        assert value(worker, "shardmesh_worker_compute_seconds_sum", lane="stateless") > 0, worker_id
        assert value(worker, "shardmesh_worker_queue_seconds_count", lane="stateless") >= 1, worker_id
        assert value(worker, "shardmesh_worker_batch_size_count") >= 1, worker_id
        assert value(worker, "shardmesh_worker_batch_size_sum") >= 1, worker_id
        assert value(worker, "shardmesh_streams_open", direction="inbound") >= 1, worker_id
        assert value(worker, "shardmesh_kv_cache_budget_bytes") > 0, worker_id
        assert value(worker, "shardmesh_shm_in_flight_bytes") == 0, worker_id  # every segment was claimed
    assert value(scrape(mesh.workers["w1"]), "shardmesh_shm_read_bytes_total") >= BATCH * TOKENS * 64 * 4


def test_sessions_and_kv_cache_while_generating(mesh: Mesh) -> None:
    prompt = list(range(3, 3 + 40))  # over one 16-token prefix block: the prefix cache keeps its keys and values

    async def generate_and_scrape() -> list[dict[tuple[str, frozenset[tuple[str, str]]], float]]:
        async with AsyncRouterClient(mesh.router) as client:
            during: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = []
            async for event in client.generate_stream(build_generate_request(tokens=prompt, max_new_tokens=200)):
                if event.HasField("token") and not during:  # the session is open on every worker now
                    during = [await asyncio.to_thread(scrape, a) for a in mesh.workers.values()]
            return during

    during = asyncio.run(generate_and_scrape())
    for worker in during:
        assert value(worker, "shardmesh_sessions") == 1
        assert value(worker, "shardmesh_kv_cache_bytes") > 0
    for worker_id, address in mesh.workers.items():
        after = retry_until(lambda a=address: _closed(scrape(a)), timeout_s=30)
        assert value(after, "shardmesh_kv_cache_prefix_bytes") > 0, worker_id
        assert value(after, "shardmesh_kv_cache_bytes") >= value(after, "shardmesh_kv_cache_prefix_bytes")
        assert value(after, "shardmesh_worker_compute_seconds_count", lane="decode") >= 1, worker_id


def _closed(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert value(samples, "shardmesh_sessions") == 0
    return samples


def test_json_logs_carry_the_request_id(mesh: Mesh) -> None:
    """--log-format json: every stderr line of router and workers is one JSON object; the lines about the probe
    request carry its id (router: the client's id; worker: the router's call id, which contains it)."""
    with RouterClient(mesh.router) as client:
        retry_until(lambda: client.infer(tokens=[5, 6, 7], request_id=REQUEST_ID + "-log", timeout_s=60))

    def tagged(name: str) -> list[dict[str, object]]:
        lines = [json.loads(line) for line in list(mesh.procs[name].stderr) if line.strip()]
        assert lines and all({"ts", "level", "component", "logger", "msg"} <= set(entry) for entry in lines)
        return [e for e in lines if REQUEST_ID + "-log" in str(e.get("request_id", ""))]

    def router_lines() -> list[dict[str, object]]:
        found = tagged("router")
        assert found, "no router line carries the request id"
        return found

    router = retry_until(router_lines, timeout_s=10)
    assert any(e["request_id"] == REQUEST_ID + "-log" and e["component"] == "router" for e in router)
    trace_ids = {e.get("trace_id") for e in router}
    assert len(trace_ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", str(next(iter(trace_ids)))), trace_ids
    for worker_id in mesh.workers:

        def worker_lines(name: str = worker_id) -> list[dict[str, object]]:
            found = tagged(name)
            assert any(e["component"] == "worker" for e in found), f"no {name} line carries the request id"
            return found

        lines = retry_until(worker_lines, timeout_s=10)
        assert {e.get("trace_id") for e in lines} == trace_ids, worker_id  # one trace across the mesh
