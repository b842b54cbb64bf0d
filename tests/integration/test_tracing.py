"""Distributed tracing through real router and worker processes (issue 13 part 3).

Every process writes its finished spans as JSON lines to one file ($SHARDMESH_TRACE_FILE, the file exporter
of services/tracing.py). A request must come out as one connected trace: the router's request span, one
router hop span per call, and on every worker it touched one span per message with queue and compute
children; in relay mode each worker's relay-forward span is the parent of the next worker's span, which
proves the traceparent travelled in each message over the shared streams.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from services.client import AsyncRouterClient, RouterClient, build_request
from services.gen.inference import grpc_service_pb2 as oip_pb2
from services.gen.inference import grpc_service_pb2_grpc as oip_pb2_grpc
from services.gen.shardmesh.v1 import router_pb2_grpc
from tests.fault_worker import start_fault_worker
from tests.procs import UpMesh, mesh_up, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

TRACE_ON = ["--trace-sample-ratio", "1"]
Span = dict[str, Any]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SHARDMESH_TRACE_FILE", str(path))  # inherited by the processes started below
        yield path


@pytest.fixture(scope="module")
def mesh(trace_file: Path) -> Iterator[UpMesh]:
    config = {
        "model": "minilm", "mode": "relay",
        "workers": [{"layers": "0:1"}, {"layers": "1:5"}, {"layers": "5:6"}],
        "router_args": TRACE_ON, "worker_args": [*TRACE_ON, "--threads", "1"],
    }
    with mesh_up(config) as m:
        yield m


def _spans(path: Path) -> list[Span]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trace_of(path: Path, request_id: str, expect_spans: int, timeout_s: float = 15.0) -> list[Span]:
    """All spans of the trace whose router.request span carries ``request_id`` (waits for ``expect_spans``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = _spans(path)
        roots = [s for s in spans if s["name"] == "router.request" and s["attributes"].get("shardmesh.request_id") == request_id]
        trace = [s for s in spans if roots and s["trace_id"] == roots[0]["trace_id"]]
        if len(trace) >= expect_spans or time.monotonic() > deadline:
            assert len(roots) == 1, f"{len(roots)} router.request spans for {request_id}"
            return trace
        time.sleep(0.1)


def _one(spans: list[Span], name: str, **attributes: object) -> Span:
    found = [s for s in spans if s["name"] == name and all(s["attributes"].get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, f"{len(found)} {name} spans with {attributes}: {[s['name'] for s in spans]}"
    return found[0]


def _check_worker_spans(trace: list[Span], worker_ids: list[str]) -> dict[str, Span]:
    """One worker.forward span per stage, each with queue and compute children; returns them by worker id."""
    forwards = {s["attributes"]["shardmesh.worker_id"]: s for s in trace if s["name"] == "worker.forward"}
    assert sorted(forwards) == sorted(worker_ids)
    assert len([s for s in trace if s["name"] == "worker.forward"]) == len(worker_ids)  # one span per hop
    for worker_id, forward in forwards.items():
        assert forward["service"] == "shardmesh-worker" and forward["status"] != "ERROR"
        for phase in ("worker.queue", "worker.compute"):
            (child,) = [s for s in trace if s["name"] == phase and s["parent_id"] == forward["span_id"]]
            assert child["start_ns"] <= child["end_ns"]
    return forwards


def test_direct_request_is_one_trace_with_a_span_per_hop(mesh: UpMesh, trace_file: Path) -> None:
    """Direct mode, continuing a client's traceparent sent as gRPC metadata."""
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    request = build_request(text="one trace per request", mode="direct", request_id="trace-direct")
    with grpc.insecure_channel(mesh.router) as channel:
        reply = router_pb2_grpc.RouterStub(channel).Infer(
            request, timeout=60, metadata=(("traceparent", f"00-{client_trace}-{client_span}-01"),)
        )
    assert [h.worker_id for h in reply.hops] == ["w0", "w1", "w2"]
    trace = _trace_of(trace_file, "trace-direct", expect_spans=1 + 3 + 3 * 3)
    assert {s["trace_id"] for s in trace} == {client_trace}  # the client's trace continues through the mesh
    root = _one(trace, "router.request")
    assert root["parent_id"] == client_span and root["service"] == "shardmesh-router"
    events = [e["name"] for e in root["events"]]
    assert events[:2] == ["admitted", "dequeued"] and events.count("route planned") == 3
    forwards = _check_worker_spans(trace, ["w0", "w1", "w2"])
    hops = [s for s in trace if s["name"] == "router.hop"]
    assert len(hops) == 3
    for hop in hops:
        attributes = hop["attributes"]
        assert hop["parent_id"] == root["span_id"]
        assert attributes["shardmesh.mode"] == "direct" and attributes["shardmesh.attempt"] == 0
        # The worker's span for this message is a child of the router's span for this hop.
        assert forwards[attributes["shardmesh.worker_id"]]["parent_id"] == hop["span_id"]
    assert sorted(h["attributes"]["shardmesh.layers"] for h in hops) == ["0:1", "1:5", "5:6"]
    assert not [s for s in trace if s["name"] == "worker.relay"]


def test_relay_request_is_one_trace_linked_hop_to_hop(mesh: UpMesh, trace_file: Path) -> None:
    with RouterClient(mesh.router) as client:
        reply = client.infer(text="a relayed request shows every hop", request_id="trace-relay")
    assert reply.mode == "relay" and [h.worker_id for h in reply.hops] == ["w0", "w1", "w2"]
    trace = _trace_of(trace_file, "trace-relay", expect_spans=1 + 1 + 3 * 3 + 2)
    assert len({s["trace_id"] for s in trace}) == 1
    root = _one(trace, "router.request")
    assert root["parent_id"] == ""  # no client trace: the router starts one
    hop = _one(trace, "router.hop")
    assert hop["parent_id"] == root["span_id"]
    assert hop["attributes"]["shardmesh.relay_chain"] == ["w0", "w1", "w2"]
    forwards = _check_worker_spans(trace, ["w0", "w1", "w2"])
    assert forwards["w0"]["parent_id"] == hop["span_id"]
    relays = {s["attributes"]["shardmesh.next_worker_id"]: s for s in trace if s["name"] == "worker.relay"}
    assert sorted(relays) == ["w1", "w2"]
    for previous, nxt in (("w0", "w1"), ("w1", "w2")):
        relay = relays[nxt]
        assert relay["parent_id"] == forwards[previous]["span_id"]  # the relay forward belongs to the sender...
        assert forwards[nxt]["parent_id"] == relay["span_id"]  # ...and the next worker's span is its child
        assert forwards[nxt]["attributes"]["shardmesh.source_worker_id"] == previous


def _oip_text_request(texts: list[str]) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name="minilm")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)]).contents.bytes_contents.extend(
        t.encode() for t in texts
    )
    return request


def _spans_of_trace(path: Path, trace_id: str, expect_spans: int, timeout_s: float = 15.0) -> list[Span]:
    """The spans of ``trace_id`` (waits until ``expect_spans`` of them were written, at most ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        trace = [s for s in _spans(path) if s["trace_id"] == trace_id]
        if len(trace) >= expect_spans or time.monotonic() > deadline:
            return trace
        time.sleep(0.1)


def _check_oip_trace(trace: list[Span], client_span: str, rows: int) -> None:
    """One router.request per batch row, each a child of the client's span, each relayed through every worker."""
    roots = [s for s in trace if s["name"] == "router.request"]
    assert len(roots) == rows and all(r["parent_id"] == client_span for r in roots)
    assert all(r["attributes"]["shardmesh.request_id"].startswith("oip-") for r in roots)
    for root in roots:
        (hop,) = [s for s in trace if s["name"] == "router.hop" and s["parent_id"] == root["span_id"]]
        (first,) = [s for s in trace if s["name"] == "worker.forward" and s["parent_id"] == hop["span_id"]]
        assert first["attributes"]["shardmesh.worker_id"] == "w0"
    assert len([s for s in trace if s["name"] == "worker.forward"]) == 3 * rows


def test_oip_model_infer_continues_the_client_trace(mesh: UpMesh, trace_file: Path) -> None:
    """KServe v2 ModelInfer with a client traceparent: every batch row's spans are in the client's trace."""
    client_trace, client_span = "8bf92f3577b34da6a3ce929d0e0e4736", "40f067aa0ba902b7"
    with grpc.insecure_channel(mesh.router) as channel:
        reply = oip_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            _oip_text_request(["first row", "second row"]), timeout=60,
            metadata=(("traceparent", f"00-{client_trace}-{client_span}-01"),),
        )
    assert list(reply.outputs[0].shape)[0] == 2
    trace = _spans_of_trace(trace_file, client_trace, expect_spans=2 * (1 + 1 + 3 * 3 + 2))
    _check_oip_trace(trace, client_span, rows=2)


def test_oip_model_stream_infer_continues_the_client_trace(mesh: UpMesh, trace_file: Path) -> None:
    """Triton's ModelStreamInfer: the stream's traceparent metadata applies to each request on it."""
    client_trace, client_span = "9bf92f3577b34da6a3ce929d0e0e4736", "50f067aa0ba902b7"
    with grpc.insecure_channel(mesh.router) as channel:
        replies = list(oip_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([_oip_text_request(["streamed"])]), timeout=60,
            metadata=(("traceparent", f"00-{client_trace}-{client_span}-01"),),
        ))
    assert len(replies) == 1 and not replies[0].error_message
    trace = _spans_of_trace(trace_file, client_trace, expect_spans=1 + 1 + 3 * 3 + 2)
    _check_oip_trace(trace, client_span, rows=1)


def test_concurrent_requests_on_shared_streams_get_separate_traces(mesh: UpMesh, trace_file: Path) -> None:
    """Requests multiplexed on the same router->worker streams each keep their own trace (traceparent per
    message, not per stream)."""
    ids = [f"trace-concurrent-{i}" for i in range(4)]

    async def send_all() -> None:
        async with AsyncRouterClient(mesh.router) as client:  # one channel: the router's worker streams are shared
            await asyncio.gather(*(client.infer(text=f"request {rid}", request_id=rid, mode="direct") for rid in ids))

    asyncio.run(send_all())
    traces = [_trace_of(trace_file, rid, expect_spans=1 + 3 + 3 * 3) for rid in ids]
    assert len({t[0]["trace_id"] for t in traces}) == len(ids)
    for trace in traces:
        _check_worker_spans(trace, ["w0", "w1", "w2"])
        assert len([s for s in trace if s["name"] == "router.hop"]) == 3


def test_failover_is_an_event_and_the_failed_hop_a_span(trace_file: Path) -> None:
    """A replica answering INTERNAL: the request's trace shows the failed hop (error status), a failover
    event, and the retried hop on the other replica."""
    started = [start_worker("minilm", "0:3", *TRACE_ON, "--threads", "1"),
               start_fault_worker("internal", "minilm", "0:3", *TRACE_ON, "--threads", "1"),
               start_worker("minilm", "3:6", *TRACE_ON, "--threads", "1")]
    router = None
    try:
        for _, address in started:
            wait_serving(address)
        broken = started[1][1]
        router, router_address = start_router([a for _, a in started], *TRACE_ON, "--mode", "direct")
        wait_serving(router_address)
        with RouterClient(router_address) as client:
            broken_id = next(w.worker_id for w in client.topology().workers if w.address == broken)
            retried = None
            for i in range(20):
                result = client.infer(tokens=[101, 2023, 2003, 102], request_id=f"trace-failover-{i}", timeout_s=30)
                if result.attempts > 1:
                    retried = f"trace-failover-{i}"
                    break
            assert retried is not None, "no request met the broken replica"
        trace = _trace_of(trace_file, retried, expect_spans=1 + 3 + 2 * 3 + 1)
        root = _one(trace, "router.request")
        (failover,) = [e for e in root["events"] if e["name"] == "failover"]
        assert failover["attributes"]["shardmesh.failed_worker_id"] == broken_id
        failed_hop = _one(trace, "router.hop", **{"shardmesh.worker_id": broken_id})
        assert failed_hop["status"] == "ERROR" and failed_hop["attributes"]["shardmesh.attempt"] == 0
        retry_hop = _one(trace, "router.hop", **{"shardmesh.layers": "0:3", "shardmesh.attempt": 1})
        assert retry_hop["attributes"]["shardmesh.worker_id"] != broken_id
        broken_forward = _one(trace, "worker.forward", **{"shardmesh.worker_id": broken_id})
        assert broken_forward["status"] == "ERROR" and broken_forward["parent_id"] == failed_hop["span_id"]
        assert torch.is_tensor(result.output)
    finally:
        if router is not None:
            router.stop()
        for proc, _ in started:
            proc.stop()


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default flags: after serving a request, neither router nor worker has imported opentelemetry."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, json, os, sys\n"
        "def _dump():\n"
        "    names = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "    loaded = 'services.tracing' in sys.modules\n"
        f"    with open(os.path.join({str(tmp_path)!r}, f'modules-{{os.getpid()}}.json'), 'w') as f:\n"
        "        json.dump([loaded, names], f)\n"
        "atexit.register(_dump)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("SHARDMESH_TRACE_FILE", raising=False)
    monkeypatch.delenv("SHARDMESH_TRACE_SAMPLE_RATIO", raising=False)
    procs = []
    try:
        worker, address = start_worker("minilm", "0:6", "--threads", "1")
        procs.append(worker)
        wait_serving(address)
        router, router_address = start_router([address])
        procs.append(router)
        wait_serving(router_address)
        with RouterClient(router_address) as client:
            client.infer(text="untraced", mode="direct")
            client.infer(text="untraced", mode="relay")
    finally:
        for proc in reversed(procs):
            proc.stop()
    dumps = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("modules-*.json")}
    pids = {f"modules-{p.pid}.json" for p in procs}
    assert pids <= set(dumps), f"a process did not exit cleanly: {sorted(dumps)}"
    for name in pids:
        loaded, otel = dumps[name]
        assert loaded and otel == [], f"{name}: opentelemetry modules imported with tracing off: {otel}"
