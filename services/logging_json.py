"""Structured logs (``--log-format json``): one JSON object per line, tagged with the request it is about.

The router and the worker set :data:`REQUEST_ID` where they start handling a request (router: RouterCore.infer
and Generate; both: each request of a multiplexed stream), so every line logged while that request runs, in any
module, carries ``request_id``. ``trace_id`` comes from the active OpenTelemetry span when tracing is on
(services/tracing.py), else from the W3C ``traceparent`` the request carried (a worker's stream lines outside
its spans); it is left out when there is none. Lines logged from compute threads run outside the request's
context and carry neither.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("shardmesh_request_id", default=None)
TRACE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("shardmesh_trace_id", default=None)
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


@contextlib.contextmanager
def request_scope(request_id: str, traceparent: str = "") -> Iterator[None]:
    """Tags log lines with ``request_id`` (and the trace id of a W3C ``traceparent``, if valid) for the
    duration of the block (the current task only)."""
    match = _TRACEPARENT.fullmatch(traceparent) if traceparent else None
    token = REQUEST_ID.set(request_id or None)
    trace_token = TRACE_ID.set(match.group(1) if match and match.group(1) != "0" * 32 else None)
    try:
        yield
    finally:
        TRACE_ID.reset(trace_token)
        REQUEST_ID.reset(token)


def _otel_trace_id() -> Callable[[], str | None]:
    """The active span's trace id as 32 hex digits, or None; a no-op reader without OpenTelemetry."""
    try:
        from opentelemetry import trace
    except ImportError:  # tracing not installed: no trace ids
        return lambda: None

    def read() -> str | None:
        ctx = trace.get_current_span().get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else None

    return read


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``trace_id`` (None when absent) to every record passing the handler."""

    def __init__(self) -> None:
        super().__init__()
        self._trace_id = _otel_trace_id()

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        try:
            record.trace_id = self._trace_id() or TRACE_ID.get()
        except Exception:  # noqa: BLE001 - logging must not fail because tracing did
            record.trace_id = TRACE_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "component", "logger", "msg"[, "request_id"][, "trace_id"][, "exc"]}`` on one line."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "trace_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["exc"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)  # newlines inside values are escaped: one line


def setup_json_logging(level: str, component: str) -> None:
    """Replaces the root logger's handlers with one JSON-lines handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
