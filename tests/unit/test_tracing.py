"""services/tracing.py: off = no-ops; on = spans linked through W3C traceparent strings (in-memory exporter)."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from services import tracing
from services.errors import ConfigError
from services.layers import LayerSpan


@pytest.fixture
def exporter() -> Iterator[object]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use_provider(provider)
    try:
        yield memory
    finally:
        tracing.shutdown()


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"trace_sample_ratio": None, "otlp_endpoint": None, **kw})


def test_settings_default_off_env_and_flags() -> None:
    assert not tracing.TracingSettings.from_args(_args(), {}).enabled
    s = tracing.TracingSettings.from_args(
        _args(), {"SHARDMESH_TRACE_SAMPLE_RATIO": "0.25", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    )
    assert (s.sample_ratio, s.otlp_endpoint, s.enabled) == (0.25, "http://c:4317", True)
    s = tracing.TracingSettings.from_args(_args(trace_sample_ratio=1.0, otlp_endpoint="http://x:4317"),
                                          {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "SHARDMESH_TRACE_FILE": "/t"})
    assert (s.sample_ratio, s.otlp_endpoint, s.trace_file) == (1.0, "http://x:4317", "/t")
    for bad in (1.5, -0.1):
        with pytest.raises(ConfigError, match="--trace-sample-ratio"):
            tracing.TracingSettings.from_args(_args(trace_sample_ratio=bad), {})
    with pytest.raises(ConfigError, match="not a number"):
        tracing.TracingSettings.from_args(_args(), {"SHARDMESH_TRACE_SAMPLE_RATIO": "half"})


def test_off_returns_the_shared_noop() -> None:
    assert not tracing.enabled()
    assert not tracing.configure(tracing.TracingSettings(), "x")
    with tracing.span("a", {"k": 1}, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01") as s:
        assert s is tracing.NOOP and s.traceparent == "" and not s.recording
    assert tracing.current() is tracing.NOOP
    assert tracing.traceparent_from_metadata((("traceparent", "00-x"),)) == ""
    assert tracing.current_trace_id() == ""


def test_off_imports_no_opentelemetry() -> None:
    """The modules on the router's and worker's request path import no OpenTelemetry while tracing is off."""
    code = (
        "import sys\n"
        "import router.core, router.pipeline, router.servicer, router.main\n"
        "import shard_worker.core, shard_worker.relay, shard_worker.main, services.config\n"
        "from services import tracing\n"
        "tracing.configure(tracing.TracingSettings(), 'x')\n"
        "with tracing.span('a') as s: s.event('e')\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_traceparent_links_parent_and_child(exporter: object) -> None:
    with tracing.span("root", {"obj": object(), "seq": ["a", 1]}) as root:
        header = root.traceparent
        assert header.startswith("00-") and int(header[-2:], 16) & 1 and len(header) == 55  # sampled flag
        tracing.current().event("planned", {"layer": 0})
    with tracing.span("remote", traceparent=header, require_parent=True) as remote:
        remote.interval("phase", 1_000, 2_000, {"ms": 1.0})
    spans = {s.name: s for s in exporter.get_finished_spans()}  # type: ignore[attr-defined]
    assert set(spans) == {"root", "remote", "phase"}
    root_ctx = spans["root"].context
    assert spans["remote"].context.trace_id == root_ctx.trace_id
    assert spans["remote"].parent.span_id == root_ctx.span_id
    assert spans["phase"].parent.span_id == spans["remote"].context.span_id
    assert (spans["phase"].start_time, spans["phase"].end_time) == (1_000, 2_000)
    assert [e.name for e in spans["root"].events] == ["planned"]
    assert isinstance(spans["root"].attributes["obj"], str)


def test_require_parent_without_sampled_parent_is_noop(exporter: object) -> None:
    assert tracing.span("orphan", require_parent=True) is tracing.NOOP
    unsampled = "00-" + "1" * 32 + "-" + "2" * 16 + "-00"
    assert tracing.span("child", traceparent=unsampled, require_parent=True) is tracing.NOOP
    assert exporter.get_finished_spans() == ()  # type: ignore[attr-defined]


def test_metadata_traceparent_is_continued(exporter: object) -> None:
    header = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    assert tracing.traceparent_from_metadata((("x", "1"), ("traceparent", header.encode()))) == header
    with tracing.span("router.request", traceparent=header):
        assert tracing.current_trace_id() == "ab" * 16
    (span,) = exporter.get_finished_spans()  # type: ignore[attr-defined]
    assert span.parent.span_id == int("cd" * 8, 16)


def test_hop_spans_in_tasks_are_children_of_the_request(exporter: object) -> None:
    """Hedged calls run in their own tasks; they still nest under the request span (context is copied)."""
    from router.pipeline import _hop_span
    from router.planning.types import WorkerInfo

    def worker(wid: str, start: int, end: int) -> WorkerInfo:
        return WorkerInfo(wid, "127.0.0.1:1", "m", "bert", LayerSpan(start, end), 6, "c")

    async def call(chosen: list[WorkerInfo], call_id: str) -> str:
        with _hop_span(chosen, call_id) as hop:
            return hop.traceparent

    async def main() -> list[str]:
        with tracing.span("router.request"):
            return await asyncio.gather(
                asyncio.create_task(call([worker("w0", 0, 3)], "n.1:req/a/0/2")),
                asyncio.create_task(call([worker("w1", 0, 3)], "n.1:req/a/0/2/hedge")),
                call([worker("w0", 0, 3), worker("w2", 3, 6)], "n.1:req/0/0"),
            )

    headers = asyncio.run(main())
    assert all(headers)
    spans = exporter.get_finished_spans()  # type: ignore[attr-defined]
    request = next(s for s in spans if s.name == "router.request")
    hops = [s for s in spans if s.name == "router.hop"]
    assert len(hops) == 3 and all(h.parent.span_id == request.context.span_id for h in hops)
    by_call = {h.attributes["shardmesh.call_id"]: h.attributes for h in hops}
    assert by_call["n.1:req/a/0/2"]["shardmesh.attempt"] == 2 and not by_call["n.1:req/a/0/2"]["shardmesh.hedge"]
    assert by_call["n.1:req/a/0/2/hedge"]["shardmesh.hedge"] and by_call["n.1:req/a/0/2/hedge"]["shardmesh.worker_id"] == "w1"
    assert tuple(by_call["n.1:req/0/0"]["shardmesh.relay_chain"]) == ("w0", "w2")
    assert by_call["n.1:req/0/0"]["shardmesh.layers"] == "0:3"


def test_json_lines_exporter(tmp_path: object) -> None:
    path = tmp_path / "spans.jsonl"  # type: ignore[operator]
    assert tracing.configure(tracing.TracingSettings(sample_ratio=1.0, trace_file=str(path)), "svc")
    try:
        with tracing.span("a") as a:
            with tracing.span("b", {"k": "v"}):
                a.event("e", {"n": 1})
    finally:
        tracing.shutdown()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    b, a_rec = lines
    assert (a_rec["name"], b["name"], b["service"]) == ("a", "b", "svc")
    assert b["parent_id"] == a_rec["span_id"] and b["trace_id"] == a_rec["trace_id"] and a_rec["parent_id"] == ""
    assert b["attributes"] == {"k": "v"} and a_rec["events"] == [{"name": "e", "attributes": {"n": 1}}]


def test_generate_is_wrapped_in_a_span_only_when_tracing_is_on(exporter: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """RouterCore.generate: off, the untraced event stream itself; on, a router.generate span continuing the
    client's traceparent, current while the events are produced, and an abandoned stream closes the inner one."""
    from types import SimpleNamespace

    from router.core import RouterCore
    from services.gen.shardmesh.v1 import router_pb2

    closed: list[bool] = []
    seen_trace: list[str] = []

    async def inner() -> AsyncIterator[str]:
        try:
            seen_trace.append(tracing.current_trace_id())
            yield "first"
            yield "second"
        finally:
            closed.append(True)

    request = router_pb2.GenerateRequest(request_id="g1")
    header = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    core: Any = SimpleNamespace(_generate=lambda *a: inner())
    core._traced_generate = lambda *a: RouterCore._traced_generate(core, *a)
    with monkeypatch.context() as off:
        off.setattr(tracing, "_tracer", None)
        untraced = RouterCore.generate(core, request, None, traceparent=header)
        assert untraced.ag_code is inner.__code__  # type: ignore[attr-defined]  # no wrapper

    async def consume_one() -> None:
        events = RouterCore.generate(core, request, None, traceparent=header)
        assert await events.__anext__() == "first"
        await events.aclose()  # type: ignore[attr-defined]  # the client went away after one event
        assert closed == [True]  # at once, not when the loop shuts its generators down

    asyncio.run(consume_one())
    assert seen_trace == ["ab" * 16] and closed == [True]
    (span,) = exporter.get_finished_spans()  # type: ignore[attr-defined]
    assert span.name == "router.generate" and span.parent.span_id == int("cd" * 8, 16)
    assert span.attributes["shardmesh.request_id"] == "g1"
