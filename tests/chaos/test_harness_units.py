"""The chaos harness's own parts, without a mesh: scenario validation, the history checker (fed hand-made
histories), the TCP fault proxy (a real echo server behind it) and the fault-injection interceptor (a
real grpc.aio server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.chaos.history import Event, read_history, History, tokens_digest
from services.chaos.history_checker import check
from services.chaos.interceptor import FaultInjectionInterceptor, worker_stream_error
from services.chaos import proxy as proxy_module
from services.chaos.proxy import FaultProxy, Rule
from services.chaos.references import Oracle
from services.chaos.scenario import Expectations, FaultPlan, load_scenario, parse_scenario
from services.errors import ConfigError
from services.gen.shardmesh.v1 import worker_pb2

REPO = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {"mesh": {"model": "tiny-llama", "stages": ["0:3", "3:6"]}, "faults": [{"kind": "kill", "target": "w0r0", "at_s": 1}]}


def _with(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(BASE))
    for path, value in changes.items():
        node = data
        *parents, last = path.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


# -- scenario validation ----------------------------------------------------------------------------
def test_every_matrix_scenario_parses_and_the_matrix_covers_the_issue() -> None:
    scenarios = [load_scenario(p) for p in sorted((REPO / "docs" / "chaos").glob("*.yaml"))]
    assert len(scenarios) >= 24
    kinds = {(s.mesh.mode, f.kind, s.load.generate_share > 0) for s in scenarios for f in s.faults}
    for kind in ("kill", "hang", "restart", "slow", "error", "delay", "bandwidth", "blackhole", "reset", "partition",
                 "flap", "consul-down", "consul-flap", "consul-forget", "deregister"):
        for mode in ("direct", "relay"):
            assert (mode, kind, False) in kinds, (mode, kind)
    for kind in ("kill", "hang", "restart", "delay", "blackhole", "reset"):
        assert any(k == kind and gen for _, k, gen in kinds), kind
    assert all(s.mesh.replicas == 2 for s in scenarios)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(mesh__replicaz=2), "mesh: unknown key(s) replicaz"),
        (_with(load__clients=0), "load.clients: expected an integer"),
        (_with(load__mix={"infer": 0}), "load.mix"),
        (_with(faults__0__kind="explode"), "faults[0].kind: expected one of"),
        (_with(faults__0__target="w9r9"), "faults[0].target: no worker named 'w9r9'"),
        (_with(faults__0__delay_ms=5), "faults[0]: unknown key(s) delay_ms"),
        (_with(faults__0__kind="hang"), "faults[0].duration_s: hang lasts a while"),
        (_with(faults__0__target=["router", "w0r0"]), "only network faults take a pair"),
        (_with(faults__0={"kind": "consul-down", "at_s": 1, "duration_s": 1}), "needs mesh.discovery: consul"),
        (_with(faults__0={"kind": "error", "target": "w0r0", "at_s": 1, "duration_s": 1, "code": "OK"}), "faults[0].code"),
        (_with(mesh__mode="mesh"), "mesh.mode: expected one of direct, relay"),
        (_with(expect__allowed_statuses=["UNAVAILBLE"]), "expect.allowed_statuses[0]"),
        (_with(mesh__model="minilm", load__mix={"generate": 1}), "cannot generate"),
        (_with(mesh__stages=["0:3", "4:6"]), "mesh.stages[1]"),
        (_with(mesh__worker_args=["--threads", "x"]), "--threads takes an integer"),
    ],
)
def test_bad_scenarios_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(data, source="s.yaml")
    assert message in str(info.value)


def test_defaults_and_pair_targets() -> None:
    s = parse_scenario(_with(faults__0={"kind": "blackhole", "target": ["w0r1", "w1r0"], "at_s": 2, "duration_s": 1}))
    assert s.mesh.worker_names() == ["w0r0", "w0r1", "w1r0", "w1r1"]
    assert s.faults[0].worker == "w1r0" and s.faults[0].target == ("w0r1", "w1r0")
    assert s.proxied_workers == {"w1r0"} and not s.needs_fault_injection


# -- the checker on hand-made histories ---------------------------------------------------------------
ORACLE = Oracle({}, {"a": (1, 2)}, {"a": "good"}, {"a": (1, 2, 512)}, {"a": (5, 6, 7)})
KILL = FaultPlan("kill", ("w0r0",), at_s=1.0, observe_s=1.0)


def _fault_events(at: float = 1.0) -> list[Event]:
    return [Event("info", at, "fault", KILL.label, status="start"), Event("info", at + 0.01, "fault", KILL.label, status="end")]


def _infer(rid: str, t0: float, t1: float, *, digest: str = "good", attempts: int = 1, route: tuple[str, ...] = ("w0r1", "w1r0"),
           fail: str = "") -> list[Event]:
    end = Event("fail", t1, "infer", rid, 0, "a", status=fail) if fail else Event(
        "ok", t1, "infer", rid, 0, "a", route=route, attempts=attempts, digest=digest)
    return [Event("invoke", t0, "infer", rid, 0, "a"), end]


def _healthy_history() -> list[Event]:
    return [*_infer("r0", 0.1, 0.2), *_infer("r1", 0.9, 1.3, attempts=2), *_infer("r2", 1.4, 1.5), *_fault_events()]


def test_checker_passes_a_clean_history_and_measures_the_fault() -> None:
    verdict = check(sorted(_healthy_history(), key=lambda e: e.time), ORACLE, [KILL], Expectations())
    assert verdict.passed, verdict.problems
    fault = verdict.faults[0]
    assert fault.in_flight == 1 and fault.hit == 1 and fault.failovers == 1
    assert fault.first_good_ms == pytest.approx(300.0)
    assert fault.extra_ms_max == pytest.approx(400 - 100)


def test_checker_reports_a_lost_request() -> None:
    events = [*_healthy_history(), Event("invoke", 1.2, "infer", "r9", 1, "a")]
    verdict = check(events, ORACLE, [KILL], Expectations())
    assert not verdict.passed and verdict.lost == 1
    assert any("lost: infer r9" in p for p in verdict.problems)


def test_checker_allows_only_the_stated_statuses() -> None:
    events = [*_healthy_history(), *_infer("r8", 1.1, 1.2, fail="UNAVAILABLE")]
    assert check(events, ORACLE, [KILL], Expectations()).lost == 1
    verdict = check(events, ORACLE, [KILL], Expectations(allowed_statuses=frozenset({"UNAVAILABLE"})))
    assert verdict.passed and verdict.failed_allowed == 1


def test_checker_reports_a_wrong_output() -> None:
    events = [*_healthy_history(), *_infer("r7", 2.0, 2.1, digest="bad")]
    verdict = check(events, ORACLE, [KILL], Expectations())
    assert verdict.wrong == 1 and any("wrong output: infer r7" in p for p in verdict.problems)


def test_checker_reports_a_fault_that_hit_nothing() -> None:
    events = [*_infer("r0", 0.1, 0.2), *_infer("r2", 1.4, 1.5), *_fault_events()]
    verdict = check(events, ORACLE, [KILL], Expectations())
    assert not verdict.passed
    assert any("hit no request" in p for p in verdict.problems)
    assert check(events, ORACLE, [KILL], Expectations(must_hit=False)).passed


def test_checker_reports_a_fault_never_injected() -> None:
    verdict = check(_infer("r0", 0.1, 0.2), ORACLE, [KILL], Expectations())
    assert any("never injected" in p for p in verdict.problems)


def test_checker_enforces_exactly_once_and_the_generation_oracle(tmp_path: Path) -> None:
    def gen(rid: str, tokens: tuple[int, ...], indices: tuple[int, ...], summary: tuple[int, ...]) -> list[Event]:
        return [Event("invoke", 0.1, "generate", rid, 0, "a"),
                Event("ok", 0.5, "generate", rid, 0, "a", route=("w0r0", "w1r0"), attempts=1, digest=tokens_digest(tokens),
                      tokens=tokens, indices=indices, summary_tokens=summary)]

    good = gen("g0", (5, 6, 7), (0, 1, 2), (5, 6, 7))
    assert check(good, ORACLE, [], Expectations()).passed
    repeated = check(gen("g1", (5, 6, 7), (0, 1, 1), (5, 6, 7)), ORACLE, [], Expectations())
    assert repeated.exactly_once_violations == 1
    summary = check(gen("g2", (5, 6, 7), (0, 1, 2), (5, 6, 7, 7)), ORACLE, [], Expectations())
    assert summary.exactly_once_violations == 1
    assert check(gen("g3", (5, 6, 8), (0, 1, 2), (5, 6, 8)), ORACLE, [], Expectations()).wrong == 1
    # a history survives a round trip through its JSON lines
    h = History()
    h.events = good
    h.write(tmp_path / "h.jsonl")
    assert read_history(tmp_path / "h.jsonl") == good


# -- the TCP fault proxy -----------------------------------------------------------------------------
@pytest.fixture
async def echo_through_proxy():  # type: ignore[no-untyped-def]
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = FaultProxy(("127.0.0.1", server.sockets[0].getsockname()[1]))
    await proxy.start()
    yield proxy
    await proxy.close()
    server.close()


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes, timeout: float) -> float:
    t0 = time.monotonic()
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
    assert got == payload
    return time.monotonic() - t0


async def test_proxy_delay_blackhole_and_reset(echo_through_proxy: FaultProxy) -> None:
    proxy = echo_through_proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await _round_trip(reader, writer, b"plain", 5) < 0.5

    rule = proxy.add(Rule("delay", delay_ms=150, direction="to"))
    assert await _round_trip(reader, writer, b"slow", 5) >= 0.15
    proxy.remove(rule)

    # Blackhole: the bytes vanish (no answer) but the connection stays open (no EOF, no RST) ...
    rule = proxy.add(Rule("blackhole"))
    writer.write(b"lost?")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(5), 0.5)
    assert not reader.at_eof()
    # ... and when it heals, the held bytes arrive, as TCP would deliver them
    proxy.remove(rule)
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"lost?"

    proxy.add(Rule("reset"))
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _round_trip(reader, writer, b"gone", 5)
    writer.close()
    # while the reset rule holds, new connections are reset too
    r2, w2 = await asyncio.open_connection("127.0.0.1", proxy.port)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _round_trip(r2, w2, b"again", 5)
    w2.close()
    assert proxy.stats["reset"] >= 2


async def test_proxy_pair_rule_spares_other_callers(echo_through_proxy: FaultProxy) -> None:
    proxy = echo_through_proxy
    proxy.add(Rule("partition", source="router"))  # this test's process is not "router": it passes
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await _round_trip(reader, writer, b"spared", 5) < 1.0
    writer.close()


async def test_a_fault_aimed_at_a_caller_holds_while_the_caller_is_still_being_looked_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy attributes a connection to its caller by a process lookup that takes 100s of ms on a loaded
    host; a reset or partition aimed at that caller must apply from the first byte, not once the lookup ends."""
    real_lookup = proxy_module.owner_of_port

    def slow_lookup(*args: Any) -> str:
        time.sleep(0.6)
        return real_lookup(*args)

    monkeypatch.setattr(proxy_module, "owner_of_port", slow_lookup)
    received = bytearray()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                received.extend(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = FaultProxy(("127.0.0.1", server.sockets[0].getsockname()[1]), lambda: {"me": os.getpid()})
    await proxy.start()
    try:
        rule = proxy.add(Rule("reset", source="me"))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _round_trip(reader, writer, b"reset-me", 5)
        writer.close()
        proxy.remove(rule)
        proxy.add(Rule("partition", source="me"))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"cut-off")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(7), 1.5)  # well past the lookup
        writer.close()
        assert bytes(received) == b"", f"the worker got {bytes(received)!r} from a caller the fault cut off"
        # a caller the rule is not aimed at waits for the lookup, then passes
        proxy.rules.clear()
        proxy.add(Rule("partition", source="someone-else"))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await _round_trip(reader, writer, b"spared", 5) < 3
        writer.close()
    finally:
        await proxy.close()
        server.close()


async def test_proxy_bandwidth_limit(echo_through_proxy: FaultProxy) -> None:
    proxy = echo_through_proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    proxy.add(Rule("bandwidth", kbps=800, direction="from"))  # 100 KB/s
    elapsed = await _round_trip(reader, writer, b"x" * 50_000, 10)
    assert elapsed >= 0.4
    writer.close()


# -- the fault-injection interceptor -----------------------------------------------------------------
async def test_interceptor_aborts_unary_calls_and_answers_stream_requests_in_band(tmp_path: Path) -> None:
    control = tmp_path / "faults.json"
    interceptor = FaultInjectionInterceptor(str(control), worker_stream_error("w0", "127.0.0.1:1"))

    async def ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        # registered with raw bytes, as the worker's ForwardStream is (services/transport/raw.py)
        while (raw := await context.read()) is not grpc.aio.EOF:
            request = worker_pb2.ForwardRequest.FromString(raw)
            await context.write(worker_pb2.ForwardResponse(request_id=request.request_id))

    handler = grpc.method_handlers_generic_handler("test.Svc", {
        "Ping": grpc.unary_unary_rpc_method_handler(ping),
        "ForwardStream": grpc.stream_stream_rpc_method_handler(
            stream, None, worker_pb2.ForwardResponse.SerializeToString),
    })
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/test.Svc/Ping")
            assert await unary(b"hi", timeout=5) == b"hi"  # no control file: no faults
            control.write_text(json.dumps({"abort": {"code": "INTERNAL", "percent": 100}}))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(b"hi", timeout=5)
            assert info.value.code() == grpc.StatusCode.INTERNAL

            control.write_text(json.dumps({"abort": {"code": "UNAVAILABLE", "percent": 50}}))
            call = channel.stream_stream("/test.Svc/ForwardStream", worker_pb2.ForwardRequest.SerializeToString,
                                         worker_pb2.ForwardResponse.FromString)(timeout=10)
            for i in range(200):
                await call.write(worker_pb2.ForwardRequest(request_id=f"r{i}"))
            await call.done_writing()
            replies = [r async for r in call]
            assert sorted(r.request_id for r in replies) == sorted(f"r{i}" for i in range(200))  # one answer each
            errors = [r for r in replies if r.HasField("error")]
            assert 50 < len(errors) < 150  # about half, each in band: the stream itself stays up
            assert all(r.error.code == grpc.StatusCode.UNAVAILABLE.value[0] and r.error.failed_worker_id == "w0" for r in errors)
            control.write_text("")
            assert await unary(b"again", timeout=5) == b"again"
    finally:
        await server.stop(None)


def test_a_pair_fault_counts_only_requests_over_that_link() -> None:
    from services.chaos.history_checker import passes_through

    assert passes_through(("w0r0", "w1r0"), ("w0r0", "w1r0"), "relay")
    assert not passes_through(("w0r1", "w1r0"), ("w0r0", "w1r0"), "relay")  # another caller of the same worker
    assert not passes_through(("w0r0", "w1r0"), ("w0r0", "w1r0"), "direct")  # no worker-to-worker link in direct mode
    assert passes_through(("w0r0", "w1r0"), ("router", "w1r0"), "direct")
    assert not passes_through(("w0r0", "w1r0"), ("router", "w1r0"), "relay")  # in relay the router dials stage 0 only
    assert passes_through(("w0r1", "w1r0"), ("w1r0",), "relay")


def test_an_error_fault_that_never_fired_is_not_a_hit() -> None:
    error = FaultPlan("error", ("w0r0",), at_s=1.0, duration_s=1.0, params={"code": "INTERNAL", "percent": 50})
    events = [Event("info", 1.0, "fault", error.label, status="start"), Event("info", 2.0, "fault", error.label, status="end"),
              *_infer("r0", 0.1, 0.2), *_infer("r1", 1.2, 1.3, route=("w0r0", "w1r0")), *_infer("r2", 1.4, 1.5, route=("w0r0", "w1r1"))]
    verdict = check(events, ORACLE, [error], Expectations())
    assert verdict.faults[0].hit == 0 and any("hit no request" in p for p in verdict.problems)
    # the same requests answered after a retry elsewhere show the fault
    events[-1:] = [Event("ok", 1.5, "infer", "r2", 0, "a", route=("w0r1", "w1r1"), attempts=2, digest="good")]
    assert check(events, ORACLE, [error], Expectations()).passed
