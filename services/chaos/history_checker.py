"""Checks a chaos history (a list of :class:`Event`) against the oracle and the scenario's expectations.
Pure: no processes, no sockets, so tests can feed it hand-made histories.

Invariants (any breach fails the scenario):
- nothing lost: every ``invoke`` ends in ``ok``, or in ``fail`` with a status the scenario allows;
- no wrong output: infer digests equal the single-process reference; generated tokens equal greedy
  generation in one process;
- every generation step applied exactly once: streamed token indices are 0, 1, 2, ... with no gap or
  repeat, and the summary reports the same tokens that were streamed;
- every fault hit something: requests overlapped its window and at least one shows it (a failover, a
  failure, or a route through the faulty worker); a fault that hit nothing is reported as such;
- the scenario's stated targets (extra latency, detection time, balancer share, Consul recovery).
Per fault it measures the time from injection to the first good answer that avoided the fault, and the
extra latency of affected requests over the fault-free median.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from services.chaos.checker import median as _median
from services.chaos.history import Event, pairs
from services.chaos.references import Oracle
from services.chaos.scenario import CONSUL_FAULTS, WINDOWED, Expectations, FaultPlan

# Faults whose mere presence on a request's path is the effect (latency, a drain): a route through them is a hit.
ROUTE_IS_EVIDENCE = frozenset({"delay", "bandwidth", "slow", "restart"})
SLOW_FACTOR, SLOW_MARGIN_MS = 2.0, 100.0  # otherwise a request "paid" for the fault if it took this much longer
AVOID_AFTER_S = 2.0  # "within 2 s": the balancer's share is measured on requests sent this long after injection


@dataclass(frozen=True)
class Op:
    invoke: Event
    end: Event | None

    @property
    def start(self) -> float:
        return self.invoke.time

    @property
    def stop(self) -> float:
        return self.end.time if self.end else float("inf")

    @property
    def ok(self) -> bool:
        return self.end is not None and self.end.type == "ok"

    @property
    def latency_ms(self) -> float:
        return 1000 * (self.stop - self.start)

    @property
    def attempts(self) -> int:
        return self.end.attempts if self.end else 0

    @property
    def route(self) -> tuple[str, ...]:
        return self.end.route if self.end else ()


@dataclass(frozen=True)
class FaultReport:
    label: str
    kind: str
    at: float
    window_end: float
    in_flight: int  # requests in flight at the moment of injection
    overlapping: int  # requests that overlapped the fault's window
    hit: int  # of those, requests that show the fault: a failover, a failure, or a route through the target
    failovers: int  # of those, requests answered after a failover (attempts > 1)
    first_good_ms: float | None  # injection -> first good answer that avoided the faulty worker
    extra_ms_p50: float | None  # affected requests: latency over the fault-free median
    extra_ms_max: float | None
    avoid_share: float | None  # share of requests sent >= 2 s into the window that avoided the target
    recovered_s: float | None  # Consul faults: time until the services were registered again
    note: str = ""


@dataclass(frozen=True)
class Verdict:
    requests: int
    ok: int
    failed_allowed: int
    lost: int
    wrong: int
    exactly_once_violations: int
    faults: tuple[FaultReport, ...]
    problems: tuple[str, ...]
    baseline_ms: dict[str, float]

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data


def _ops(events: Sequence[Event]) -> list[Op]:
    return [Op(i, e) for i, e in pairs(list(events))]


def _fault_windows(events: Sequence[Event], faults: Sequence[FaultPlan]) -> list[tuple[FaultPlan, float, float, dict[str, Any]]]:
    starts = {e.id: e for e in events if e.type == "info" and e.op == "fault" and e.status == "start"}
    ends = {e.id: e for e in events if e.type == "info" and e.op == "fault" and e.status == "end"}
    out = []
    for f in faults:
        start = starts.get(f.label)
        if start is None:
            continue
        end = ends.get(f.label)
        window_end = end.time if (end is not None and f.kind in WINDOWED) else start.time + f.window_s
        out.append((f, start.time, window_end, dict(end.extra) if end is not None else {}))
    return out


def check(events: Sequence[Event], oracle: Oracle, faults: Sequence[FaultPlan], expect: Expectations,
          mode: str = "direct") -> Verdict:
    """``mode``: the mesh's default path, which decides who dials whom (a pair fault [router, w1r0] touches
    relay traffic only where w1r0 is the first stage)."""
    ops = _ops(events)
    problems: list[str] = []
    lost = failed_allowed = wrong = once = 0
    for op in ops:
        rid = op.invoke.id
        if op.end is None:
            lost += 1
            if lost <= 5:
                problems.append(f"lost: {op.invoke.op} {rid} was sent at {op.start:.2f}s and never ended")
            continue
        e = op.end
        if e.op == "generate":
            once += _exactly_once(e, problems)
        if e.type == "fail":
            if e.status in expect.allowed_statuses:
                failed_allowed += 1
            else:
                lost += 1
                if lost <= 5:
                    problems.append(f"lost: {e.op} {rid} failed with {e.status}: {e.message[:160]}")
            continue
        expected = oracle.infer_digest.get(e.input) if e.op == "infer" else (
            oracle.generate_digest(e.input) if e.input in oracle.generate_tokens else None)
        if expected is None:
            problems.append(f"no reference for {e.op} input {e.input!r}")
        elif e.digest != expected:
            wrong += 1
            if wrong <= 5:
                detail = f" tokens {list(e.tokens)} != {list(oracle.generate_tokens[e.input])}" if e.op == "generate" else ""
                problems.append(f"wrong output: {e.op} {rid} (route {'->'.join(e.route)}, attempts {e.attempts}){detail}")
    if lost > 5:
        problems.append(f"... {lost} requests lost in all")
    if wrong > 5:
        problems.append(f"... {wrong} wrong outputs in all")
    if once:
        problems.append(f"{once} generations broke exactly-once token delivery")

    windows = _fault_windows(events, faults)
    first_fault = min((at for _, at, _, _ in windows), default=float("inf"))
    baseline = {
        kind: m for kind in ("infer", "generate")
        if (m := _median([o.latency_ms for o in ops if o.ok and o.invoke.op == kind and o.stop < first_fault])) is not None
    }
    reports = []
    for fault, at, window_end, result in windows:
        report = _fault_report(fault, at, window_end, result, ops, baseline, mode)
        reports.append(report)
        problems.extend(_fault_problems(report, fault, expect, result))
    for f in faults:
        if f.label not in {r.label for r in reports}:
            problems.append(f"fault {f.label} was never injected (the load ended first?)")
    return Verdict(
        requests=len(ops), ok=sum(o.ok for o in ops), failed_allowed=failed_allowed, lost=lost, wrong=wrong,
        exactly_once_violations=once, faults=tuple(reports), problems=tuple(problems), baseline_ms=baseline,
    )


def _exactly_once(e: Event, problems: list[str]) -> int:
    if list(e.indices) != list(range(len(e.indices))):
        problems.append(f"generation {e.id}: token indices {list(e.indices)} are not 0..n-1 exactly once")
        return 1
    if e.type == "ok" and tuple(e.summary_tokens) != tuple(e.tokens):
        problems.append(f"generation {e.id}: the summary's tokens {list(e.summary_tokens)} differ from the streamed {list(e.tokens)}")
        return 1
    return 0


def passes_through(route: Sequence[str], target: Sequence[str], mode: str) -> bool:
    """Whether a request on ``route`` used the faulty worker, or for a pair [source, worker] that link."""
    if not target:
        return False
    worker = target[-1]
    if len(target) == 1:
        return worker in route
    source = target[0]
    if source == "router":
        return worker in route if mode == "direct" else bool(route) and route[0] == worker
    return any(a == source and b == worker for a, b in zip(route, route[1:])) and mode == "relay"


def _fault_report(fault: FaultPlan, at: float, window_end: float, result: dict[str, Any], ops: list[Op],
                  baseline: dict[str, float], mode: str) -> FaultReport:
    target = fault.worker
    consul = fault.kind in CONSUL_FAULTS
    in_flight = [o for o in ops if o.start < at < o.stop]
    overlapping = [o for o in ops if o.start < window_end and o.stop > at]

    def shows_fault(o: Op) -> bool:
        if consul or not o.ok or o.attempts > 1:
            return True
        if not passes_through(o.route, fault.target, mode):
            return False
        if fault.kind in ROUTE_IS_EVIDENCE:
            return True
        # An error, a hang, a cut link show on a request that went through the faulty place only if it paid
        # for it (a request that passed at normal speed was not hit: e.g. an error share that never fired).
        base = baseline.get(o.invoke.op)
        return base is not None and o.latency_ms > SLOW_FACTOR * base + SLOW_MARGIN_MS

    hit = [o for o in overlapping if shows_fault(o)]
    failovers = [o for o in overlapping if o.ok and o.attempts > 1]
    good_after = [
        o.stop for o in ops
        if o.ok and o.stop > at and ((o.start >= at and (consul or not passes_through(o.route, fault.target, mode))) or o.attempts > 1)
    ]
    affected = [o for o in overlapping if o.ok and (o.start < at or o.attempts > 1 or passes_through(o.route, fault.target, mode))]
    extras = [o.latency_ms - baseline[o.invoke.op] for o in affected if o.invoke.op in baseline]
    avoid = None
    if target and fault.kind in WINDOWED and not consul:
        late = [o for o in ops if o.ok and at + AVOID_AFTER_S <= o.start < window_end]
        avoid = sum(not passes_through(o.route, fault.target, mode) for o in late) / len(late) if late else None
    return FaultReport(
        label=fault.label, kind=fault.kind, at=round(at, 3), window_end=round(window_end, 3),
        in_flight=len(in_flight), overlapping=len(overlapping), hit=len(hit), failovers=len(failovers),
        first_good_ms=round(1000 * (min(good_after) - at), 1) if good_after else None,
        extra_ms_p50=_round(_median(extras)), extra_ms_max=_round(max(extras) if extras else None),
        avoid_share=_round(avoid, 3), recovered_s=result.get("recovered_s"),
        note=str(result.get("error", "")),
    )


def _round(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(v, digits)


def _fault_problems(r: FaultReport, fault: FaultPlan, expect: Expectations, result: dict[str, Any]) -> list[str]:
    out = []
    if "error" in result:
        out.append(f"fault {r.label} could not be injected: {result['error']}")
    if expect.must_hit and r.hit == 0:
        out.append(f"fault {r.label} hit no request ({r.overlapping} overlapped its window, none failed over, "
                   f"failed or went through {fault.worker or 'Consul'}): nothing was tested")
    if expect.max_extra_ms is not None and r.extra_ms_max is not None and r.extra_ms_max > expect.max_extra_ms:
        out.append(f"target missed: {r.label} added {r.extra_ms_max:.0f} ms to an affected request (target {expect.max_extra_ms:.0f} ms)")
    if expect.max_detect_ms is not None and (r.first_good_ms is None or r.first_good_ms > expect.max_detect_ms):
        out.append(f"target missed: {r.label} first good answer avoiding it after {r.first_good_ms} ms (target {expect.max_detect_ms:.0f} ms)")
    if expect.min_avoid_share is not None and (r.avoid_share is None or r.avoid_share < expect.min_avoid_share):
        out.append(f"target missed: {r.label} only {r.avoid_share} of requests avoided {fault.worker} after {AVOID_AFTER_S:.0f} s "
                   f"(target {expect.min_avoid_share})")
    if expect.recover_within_s is not None and fault.kind in ("deregister", "consul-forget"):
        if r.recovered_s is None or r.recovered_s > expect.recover_within_s:
            out.append(f"target missed: {r.label} services back in the catalog after {r.recovered_s} s "
                       f"(target {expect.recover_within_s} s; missing {result.get('missing', [])})")
    return out
