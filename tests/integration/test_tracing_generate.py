"""Tracing of Generate through real router and worker processes (issue 13 part 3, Generate).

As in tests/integration/test_tracing.py every process appends its spans as JSON lines to one file
($SHARDMESH_TRACE_FILE). A Generate must come out as one trace continuing the client's ``traceparent``:
the router's ``router.generate`` span, one ``router.step`` per generated token, the step's ``router.hop``
spans, and the ``worker.forward`` span of every worker on the route as a child of the hop (direct) or of
the previous worker's ``worker.relay`` span (relay). A replay after a lost session is an event on its step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.client import build_generate_request
from services.gen.shardmesh.v1 import router_pb2_grpc
from tests.fault_worker import start_fault_worker
from tests.integration.test_tracing import TRACE_ON, Span, trace_file  # noqa: F401 - trace_file: the fixture
from tests.integration.test_tracing import _spans_of_trace as _trace
from tests.procs import UpMesh, mesh_up, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

WORKER_ARGS = [*TRACE_ON, "--no-batching", "--threads", "1"]
PROMPT = [1, 5, 77, 300, 12, 9]


@pytest.fixture(scope="module")
def mesh(trace_file: Path) -> Iterator[UpMesh]:
    config = {
        "model": "tiny-llama",
        "workers": [{"layers": "0:2"}, {"layers": "2:4"}, {"layers": "4:6"}],
        "router_args": TRACE_ON, "worker_args": WORKER_ARGS,
    }
    with mesh_up(config) as m:
        yield m


def _generate(address: str, trace_id: str, client_span: str, mode: str, max_new_tokens: int) -> list[int]:
    request = build_generate_request(tokens=PROMPT, max_new_tokens=max_new_tokens, mode=mode)
    with grpc.insecure_channel(address) as channel:
        events = list(router_pb2_grpc.RouterStub(channel).Generate(
            request, timeout=60, metadata=(("traceparent", f"00-{trace_id}-{client_span}-01"),)
        ))
    summary = events[-1].summary
    assert summary.token_count == max_new_tokens and summary.finish_reason == "length"
    return list(summary.token_ids)


def _root_and_steps(trace: list[Span], client_span: str, steps: int) -> tuple[Span, list[Span]]:
    (root,) = [s for s in trace if s["name"] == "router.generate"]
    assert root["parent_id"] == client_span and root["service"] == "shardmesh-router" and root["status"] != "ERROR"
    step_spans = sorted((s for s in trace if s["name"] == "router.step"), key=lambda s: s["attributes"]["shardmesh.step"])
    assert [s["attributes"]["shardmesh.step"] for s in step_spans] == list(range(steps))
    assert all(s["parent_id"] == root["span_id"] for s in step_spans)
    assert step_spans[0]["attributes"]["shardmesh.tokens"] == len(PROMPT)  # the prompt, then one token per step
    assert all(s["attributes"]["shardmesh.tokens"] == 1 for s in step_spans[1:])
    return root, step_spans


def test_direct_generate_is_one_trace_with_every_worker_of_every_step(mesh: UpMesh, trace_file: Path) -> None:
    trace_id, client_span, steps = "5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7", 4
    _generate(mesh.router, trace_id, client_span, "direct", steps)
    trace = _trace(trace_file, trace_id, expect_spans=1 + steps * (1 + 3 + 3 * 3))
    root, step_spans = _root_and_steps(trace, client_span, steps)
    spans_by_id = {s["span_id"]: s for s in trace}
    for step in step_spans:
        hops = [s for s in trace if s["name"] == "router.hop" and s["parent_id"] == step["span_id"]]
        assert [h["attributes"]["shardmesh.worker_id"] for h in hops] == ["w0", "w1", "w2"]
        for hop in hops:
            assert hop["attributes"]["shardmesh.mode"] == "direct"
            (forward,) = [s for s in trace if s["name"] == "worker.forward" and s["parent_id"] == hop["span_id"]]
            assert forward["service"] == "shardmesh-worker"
            assert forward["attributes"]["shardmesh.worker_id"] == hop["attributes"]["shardmesh.worker_id"]
    forwards = [s for s in trace if s["name"] == "worker.forward"]
    assert len(forwards) == 3 * steps  # one per worker per step, nothing untraced or duplicated
    for forward in forwards:  # every worker span leads back to the router's Generate span
        node = forward
        while node["parent_id"] in spans_by_id:
            node = spans_by_id[node["parent_id"]]
        assert node is root


def test_relay_generate_links_worker_to_worker(mesh: UpMesh, trace_file: Path) -> None:
    trace_id, client_span, steps = "6bf92f3577b34da6a3ce929d0e0e4736", "20f067aa0ba902b7", 3
    _generate(mesh.router, trace_id, client_span, "relay", steps)
    trace = _trace(trace_file, trace_id, expect_spans=1 + steps * (1 + 1 + 3 * 3 + 2))
    _, step_spans = _root_and_steps(trace, client_span, steps)
    for step in step_spans:
        (hop,) = [s for s in trace if s["name"] == "router.hop" and s["parent_id"] == step["span_id"]]
        assert hop["attributes"]["shardmesh.relay_chain"] == ["w0", "w1", "w2"]
        (first,) = [s for s in trace if s["name"] == "worker.forward" and s["parent_id"] == hop["span_id"]]
        assert first["attributes"]["shardmesh.worker_id"] == "w0"
        sender = first
        for nxt in ("w1", "w2"):
            (relay,) = [s for s in trace if s["name"] == "worker.relay" and s["parent_id"] == sender["span_id"]]
            assert relay["attributes"]["shardmesh.next_worker_id"] == nxt
            (sender,) = [s for s in trace if s["name"] == "worker.forward" and s["parent_id"] == relay["span_id"]]
            assert sender["attributes"]["shardmesh.worker_id"] == nxt


def test_replay_after_a_lost_session_is_an_event_on_its_step(trace_file: Path) -> None:
    """w1 loses the session at its 4th step (as after a restart): the step that met it carries a replay event,
    and the replay's hops (one request per stage) are children of the same step span."""
    started = [start_worker("tiny-llama", "0:2", *WORKER_ARGS),
               start_fault_worker("lose-session:4", "tiny-llama", "2:4", *WORKER_ARGS),
               start_worker("tiny-llama", "4:6", *WORKER_ARGS)]
    router = None
    try:
        for _, address in started:
            wait_serving(address)
        router, router_address = start_router([a for _, a in started], *TRACE_ON, "--mode", "direct")
        wait_serving(router_address)
        trace_id, client_span, steps = "7bf92f3577b34da6a3ce929d0e0e4736", "30f067aa0ba902b7", 8
        _generate(router_address, trace_id, client_span, "direct", steps)
        trace = _trace(trace_file, trace_id, expect_spans=1 + steps * (1 + 3 + 3 * 3) + 3 + 3 * 3)
        _, step_spans = _root_and_steps(trace, client_span, steps)
        replayed = [s for s in step_spans if any(e["name"] == "replay" for e in s["events"])]
        assert len(replayed) == 1, [s["events"] for s in step_spans]
        (event,) = [e for e in replayed[0]["events"] if e["name"] == "replay"]
        assert event["attributes"]["shardmesh.reason"] == "lost session"
        assert event["attributes"]["shardmesh.steps"] == replayed[0]["attributes"]["shardmesh.step"] + 1
        hops = [s for s in trace if s["name"] == "router.hop" and s["parent_id"] == replayed[0]["span_id"]]
        failed = [h for h in hops if h["status"] == "ERROR"]
        assert len(failed) == 1 and len(hops) > 3  # the failed hop, then the replay's hops on the same step
    finally:
        if router is not None:
            router.stop()
        for proc, _ in started:
            proc.stop()
