"""Distributed tracing (OpenTelemetry), off by default and free when off.

One trace per request: the router's request span (admission, queue, planning, failovers and hedges as
events) with one child span per hop, and on every worker a span per ForwardRequest *message* (queue
and compute as child spans, relay forward as a child span). Streams between processes are long-lived
and shared by many requests, so the W3C ``traceparent`` travels in each message
(``ForwardRequest.traceparent``), not in stream metadata; clients may send one as gRPC metadata.

Off (``--trace-sample-ratio 0``, the default): this module never imports ``opentelemetry``,
:func:`span` returns one shared no-op object, and no traceparent is sent. On: the SDK is imported by
:func:`configure`, the router samples requests at the ratio (a sampled client traceparent is always
followed), and workers record spans only for messages that carry a sampled traceparent.

Exporters: OTLP/gRPC to ``--otlp-endpoint`` (default ``$OTEL_EXPORTER_OTLP_ENDPOINT``, else
localhost:4317), or, when ``$SHARDMESH_TRACE_FILE`` is set, JSON lines appended to that file (tests,
quick looks without a collector).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.errors import ConfigError

log = logging.getLogger(__name__)

TRACE_FILE_ENV = "SHARDMESH_TRACE_FILE"
SAMPLE_RATIO_ENV = "SHARDMESH_TRACE_SAMPLE_RATIO"
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
Attributes = Mapping[str, Any]


class TracingError(ConfigError):
    """A tracing flag with a bad value (the message names the flag)."""


@dataclass(frozen=True)
class TracingSettings:
    sample_ratio: float = 0.0  # 0 = tracing off
    otlp_endpoint: str | None = None  # None = the exporter's default (localhost:4317)
    trace_file: str | None = None  # JSON lines instead of OTLP

    @property
    def enabled(self) -> bool:
        return self.sample_ratio > 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str]) -> TracingSettings:
        """--trace-sample-ratio (default $SHARDMESH_TRACE_SAMPLE_RATIO, else 0) and --otlp-endpoint
        (default $OTEL_EXPORTER_OTLP_ENDPOINT); $SHARDMESH_TRACE_FILE selects the file exporter."""
        raw = getattr(args, "trace_sample_ratio", None)
        if raw is None:
            raw = env.get(SAMPLE_RATIO_ENV) or 0.0
        try:
            ratio = float(raw)
        except ValueError:
            raise TracingError(f"--trace-sample-ratio: {raw!r} is not a number; use 0 (off) to 1 (every request)") from None
        if not 0.0 <= ratio <= 1.0:
            raise TracingError(f"--trace-sample-ratio: {ratio} is outside 0..1; use 0 (off) to 1 (every request)")
        endpoint = getattr(args, "otlp_endpoint", None) or env.get(OTLP_ENDPOINT_ENV) or None
        return cls(sample_ratio=ratio, otlp_endpoint=endpoint, trace_file=env.get(TRACE_FILE_ENV) or None)


class NoopSpan:
    """What every helper returns while tracing is off (or a message is not sampled): does nothing."""

    __slots__ = ()
    recording = False

    def __enter__(self) -> NoopSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        return None

    def set(self, key: str, value: Any) -> None:
        return None

    def interval(self, name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None) -> None:
        return None

    @property
    def traceparent(self) -> str:
        return ""


NOOP = NoopSpan()
_tracer: Any = None  # opentelemetry Tracer once configure() turned tracing on
_provider: Any = None


def enabled() -> bool:
    return _tracer is not None


class Span:
    """A live span, current (in this task's context) between ``__enter__`` and ``__exit__``."""

    __slots__ = ("_span", "_cm")
    recording = True

    def __init__(self, span: Any) -> None:
        self._span = span
        self._cm: Any = None

    def __enter__(self) -> Span:
        from opentelemetry import trace

        self._cm = trace.use_span(self._span, end_on_exit=True)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        self._span.add_event(name, attributes=_clean(attributes))

    def set(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def interval(self, name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None) -> None:
        """A finished child span over [start_ns, end_ns] (time.time_ns clock), for phases measured elsewhere
        (the compute thread's queue wait and forward)."""
        from opentelemetry import trace

        child = _tracer.start_span(
            name, context=trace.set_span_in_context(self._span), start_time=start_ns, attributes=_clean(attributes)
        )
        child.end(end_time=end_ns)

    @property
    def traceparent(self) -> str:
        return format_traceparent(self._span.get_span_context())


def _clean(attributes: Attributes | None) -> dict[str, Any] | None:
    """OTel attribute values are str/bool/int/float or sequences of them; anything else becomes str."""
    if not attributes:
        return None
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, (str, bool, int, float)):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = [v if isinstance(v, (str, bool, int, float)) else str(v) for v in value]
        elif value is not None:
            out[key] = str(value)
    return out


def format_traceparent(ctx: Any) -> str:
    """The W3C traceparent of a sampled span context; empty when it is not sampled (workers skip those)."""
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _context_of(traceparent: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def span(
    name: str,
    attributes: Attributes | None = None,
    *,
    traceparent: str | None = None,
    require_parent: bool = False,
) -> NoopSpan | Span:
    """A span to use as ``with span(...) as s:``; the no-op :data:`NOOP` while tracing is off.

    ``traceparent`` (a W3C header value) is the parent when given and valid; otherwise the current span
    in this task's context is. ``require_parent``: no span at all without a sampled parent (workers,
    hop spans of untraced work), so unsampled requests cost nothing downstream.
    """
    if _tracer is None:
        return NOOP
    from opentelemetry import trace

    if traceparent:
        context = _context_of(traceparent)
        parent = trace.get_current_span(context)
    else:
        context = None
        parent = trace.get_current_span()
    if require_parent and not format_traceparent(parent.get_span_context()):
        return NOOP
    return Span(_tracer.start_span(name, context=context, attributes=_clean(attributes)))


def current() -> NoopSpan | Span:
    """The span current in this task (events on the request span from deep in the pipeline); NOOP when off
    or when none is recording."""
    if _tracer is None:
        return NOOP
    from opentelemetry import trace

    current_span = trace.get_current_span()
    if not current_span.is_recording():
        return NOOP
    wrapped = Span(current_span)
    return wrapped


def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits (log lines about a request), or empty (off / none)."""
    if _tracer is None:
        return ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def traceparent_from_metadata(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The client's ``traceparent`` gRPC metadata (W3C), or empty; only looked at while tracing is on."""
    if _tracer is None or not metadata:
        return ""
    for key, value in metadata:
        if key == "traceparent":
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def configure(settings: TracingSettings, service_name: str, attributes: Attributes | None = None) -> bool:
    """Turns tracing on per ``settings`` (imports the SDK only then); returns whether it is on."""
    global _tracer, _provider
    if not settings.enabled:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise TracingError(
            f"--trace-sample-ratio > 0 needs the OpenTelemetry SDK ({exc.name} is missing): "
            "pip install 'shardmesh[tracing]', or run with --trace-sample-ratio 0"
        ) from exc

    resource = Resource.create({"service.name": service_name, **(_clean(attributes) or {})})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
    if settings.trace_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(settings.trace_file, service_name)))
        where = f"file {settings.trace_file}"
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TracingError(
                "--trace-sample-ratio > 0 exports over OTLP, which needs opentelemetry-exporter-otlp-proto-grpc "
                "(pip install 'shardmesh[tracing]'), or set $SHARDMESH_TRACE_FILE to write spans to a file"
            ) from exc
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint) if settings.otlp_endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        where = f"OTLP {settings.otlp_endpoint or 'default endpoint (localhost:4317)'}"
    _provider = provider
    _tracer = provider.get_tracer("shardmesh")
    log.info("tracing on: %s samples %.3g of requests to %s", service_name, settings.sample_ratio, where)
    return True


def shutdown() -> None:
    """Flushes and stops exporting (tests; processes also flush at exit)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def use_provider(provider: Any) -> None:
    """Tests: trace into ``provider`` (e.g. with an InMemorySpanExporter)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("shardmesh")


def span_record(span: Any, service_name: str = "") -> dict[str, Any]:
    """One finished SDK span as a JSON-able dict (the file exporter's line format)."""
    ctx = span.context
    parent = span.parent
    return {
        "name": span.name,
        "service": service_name or span.resource.attributes.get("service.name", ""),
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else "",
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    }


def _exporter_base() -> type:
    from opentelemetry.sdk.trace.export import SpanExporter

    return SpanExporter


class JsonLinesExporter:
    """Appends one JSON line per finished span to a file; several processes may share the file (each line
    is one O_APPEND write)."""

    def __new__(cls, path: str, service_name: str) -> Any:  # a SpanExporter subclass, built lazily
        base = _exporter_base()

        class _Exporter(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._lock = threading.Lock()

            def export(self, spans: Sequence[Any]) -> Any:
                from opentelemetry.sdk.trace.export import SpanExportResult

                with self._lock:
                    for s in spans:
                        line = json.dumps(span_record(s, service_name), default=str) + "\n"
                        os.write(self._fd, line.encode())
                return SpanExportResult.SUCCESS

            def shutdown(self) -> None:
                with self._lock:
                    if self._fd >= 0:
                        os.close(self._fd)
                        self._fd = -1

        return _Exporter()
