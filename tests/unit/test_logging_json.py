"""--log-format json: one parseable JSON object per line, tagged with the request a line is about."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from services.cli.parser import build_parser
from services.logging_json import REQUEST_ID, JsonFormatter, RequestContextFilter, request_scope


def _logger(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter("router"))
    logger = logging.getLogger("test_logging_json")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_line_is_one_json_object_with_the_request_id_only_inside_its_scope() -> None:
    stream = io.StringIO()
    log = _logger(stream)
    log.info("before")
    with request_scope("req-42"):
        log.warning("hop %s failed:\nsecond line", "w1")
    log.info("after")
    before, during, after = _lines(stream)
    assert during["request_id"] == "req-42" and during["msg"] == "hop w1 failed:\nsecond line"
    assert during["level"] == "warning" and during["component"] == "router" and during["logger"] == "test_logging_json"
    assert "request_id" not in before and "request_id" not in after
    assert REQUEST_ID.get() is None


def test_exceptions_stay_on_one_line() -> None:
    stream = io.StringIO()
    log = _logger(stream)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (line,) = stream.getvalue().splitlines()
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_concurrent_requests_keep_their_own_ids() -> None:
    stream = io.StringIO()
    log = _logger(stream)

    async def handle(request_id: str) -> None:
        with request_scope(request_id):
            await asyncio.sleep(0.01)  # interleave with the other request
            log.info("done %s", request_id)

    async def main() -> None:
        await asyncio.gather(handle("a"), handle("b"))

    asyncio.run(main())
    assert {(e["msg"], e["request_id"]) for e in _lines(stream)} == {("done a", "a"), ("done b", "b")}


def test_trace_id_comes_from_the_active_span_when_there_is_one() -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    stream = io.StringIO()
    log = _logger(stream)
    ctx = trace.SpanContext(trace_id=0xABC, span_id=0x1, is_remote=False, trace_flags=trace.TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(ctx)):
        log.info("traced")
    log.info("untraced")
    traced, untraced = _lines(stream)
    assert traced["trace_id"] == format(0xABC, "032x")
    assert "trace_id" not in untraced


def test_trace_id_from_a_carried_traceparent_outside_any_span() -> None:
    stream = io.StringIO()
    log = _logger(stream)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with request_scope("r1", f"00-{trace_id}-00f067aa0ba902b7-01"):
        log.info("carried")
    with request_scope("r2", "not a traceparent"):
        log.info("malformed")
    with request_scope("r3", f"00-{'0' * 32}-00f067aa0ba902b7-01"):
        log.info("invalid id")
    carried, malformed, invalid = _lines(stream)
    assert carried["trace_id"] == trace_id and carried["request_id"] == "r1"
    assert "trace_id" not in malformed and "trace_id" not in invalid


@pytest.mark.parametrize("command", ["router", "worker"])
def test_log_format_flag_defaults_to_text(command: str) -> None:
    base = {"router": ["router", "--workers", "127.0.0.1:1"], "worker": ["worker", "--model", "minilm", "--layers", "0:1", "--listen", "127.0.0.1:0"]}
    parser = build_parser()
    assert parser.parse_args(base[command]).log_format == "text"
    assert parser.parse_args([*base[command], "--log-format", "json"]).log_format == "json"
