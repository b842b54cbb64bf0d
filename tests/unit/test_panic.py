"""The router's ejection rules as the pipeline applies them: full stage membership from the topology,
panic over a span's replicas, and which hop failures count against a worker (issue 14 defects 3, 4)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import grpc
import pytest

from router.pipeline import Pipeline, PipelineSettings
from router.planning.hop_errors import counts_against_worker, is_lost_session, may_fail_over
from router.planning.outlier import OutlierConfig, OutlierDetector
from router.planning.planner import plan_route, stage_groups
from router.planning.retry_budget import RetryBudget
from router.planning.types import WorkerInfo
from services.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShardmeshError,
    Unavailable,
    error_from_status,
)
from services.layers import LayerSpan


def _worker(worker_id: str, start: int, end: int) -> WorkerInfo:
    return WorkerInfo(worker_id, f"127.0.0.1:{5000 + len(worker_id)}", "m", "llama", LayerSpan(start, end), 6, "sum")


def _pipeline(workers: list[WorkerInfo], **config: float) -> Pipeline:
    topology = SimpleNamespace(workers=tuple(workers), stage_groups=lambda: stage_groups(workers))
    outliers = OutlierDetector(OutlierConfig(consecutive_failures=2, **config))  # type: ignore[arg-type]
    return Pipeline(topology, None, PipelineSettings(hop_timeout_s=1.0, max_attempts=3), outliers, RetryBudget())  # type: ignore[arg-type]


FAR = 60.0  # a request deadline far away: the hop's own timeout ran out, not the client's


def test_failures_count_against_the_stage_full_membership() -> None:
    a, b, c = _worker("a", 0, 3), _worker("b", 0, 3), _worker("c", 3, 6)
    pipeline = _pipeline([a, b, c])
    deadline = time.monotonic() + FAR
    for _ in range(2):
        pipeline.record_hop_failure(a, Unavailable("down"), request_deadline=deadline)
    assert pipeline.outliers.ejected(time.monotonic()) == {"a"}
    for _ in range(10):  # the planner no longer lists a, but a is still a member of 0:3
        pipeline.record_hop_failure(b, Unavailable("down"), request_deadline=deadline)
    assert pipeline.outliers.ejected(time.monotonic()) == {"a"}
    for _ in range(10):  # a lone replica (3:6) is never ejected
        pipeline.record_hop_failure(c, DeadlineExceeded("hop timed out"), request_deadline=deadline)
    assert pipeline.outliers.ejected(time.monotonic()) == {"a"}
    plan = plan_route([a, b, c], excluded=pipeline.excluded((), time.monotonic()))
    assert [s.replica_ids for s in plan.stages] == [("b",), ("c",)]


def test_excluded_plans_over_ejected_replicas_when_nothing_else_is_left() -> None:
    a, b, c = _worker("a", 0, 3), _worker("b", 0, 3), _worker("c", 3, 6)
    pipeline = _pipeline([a, b, c])
    now = time.monotonic()
    pipeline.outliers.record_probe_failure("a", now)  # ejected (e.g. by an earlier streak)
    assert pipeline.excluded((), now) == {"a"}
    # b failed this request: the ejected a is the last replica of 0:3, so the request may still use it.
    assert pipeline.excluded({"b"}, now) == {"b"}
    assert [s.replica_ids for s in plan_route([a, b, c], excluded=pipeline.excluded({"b"}, now)).stages] == [("a",), ("c",)]
    pipeline.outliers.record_probe_failure("b", now)  # both ejected (probe failures): panic, both routable
    assert pipeline.excluded((), now) == frozenset()


@pytest.mark.parametrize(
    ("exc", "remaining_s", "counted"),
    [
        (Unavailable("connection refused"), FAR, True),
        (DeadlineExceeded("hop did not answer within 1000 ms"), FAR, True),
        (DeadlineExceeded("hop did not answer within 12 ms"), 0.0, False),  # the client's 12 ms ran out
        (DeadlineExceeded("deadline exceeded before hop started"), -0.5, False),
        (ResourceExhausted("queue full"), FAR, False),
        (Cancelled("caller went away"), FAR, False),
        (error_from_status(grpc.StatusCode.INTERNAL, "boom"), FAR, True),
        (error_from_status(grpc.StatusCode.UNKNOWN, "boom"), FAR, True),
        (InvalidArgument("bad shape"), FAR, False),
    ],
)
def test_which_hop_failures_count_against_the_worker(exc: BaseException, remaining_s: float, counted: bool) -> None:
    assert counts_against_worker(exc, remaining_s) is counted
    a, b = _worker("a", 0, 6), _worker("b", 0, 6)
    pipeline = _pipeline([a, b], max_ejection_percent=50)
    for _ in range(2):
        pipeline.record_hop_failure(a, exc, request_deadline=time.monotonic() + remaining_s)
    assert pipeline.outliers.is_ejected("a", time.monotonic()) is counted


def test_internal_and_unknown_fail_over_but_caller_mistakes_do_not() -> None:
    assert may_fail_over(error_from_status(grpc.StatusCode.INTERNAL, "x"))
    assert may_fail_over(error_from_status(grpc.StatusCode.UNKNOWN, "x"))
    assert may_fail_over(Unavailable("x")) and may_fail_over(DeadlineExceeded("x")) and may_fail_over(ResourceExhausted("x"))
    for exc in (InvalidArgument("x"), FailedPrecondition("x"), NotFound("x"), Cancelled("x")):
        assert not may_fail_over(exc)


def test_lost_sessions_are_recognised() -> None:
    assert is_lost_session(NotFound("unknown session 'k#0' (never opened, closed, or expired); open a new session"))
    assert is_lost_session(
        FailedPrecondition("session 'k#0': step starts at position 7 but the cache holds 4 tokens; replay the session")
    )
    assert not is_lost_session(FailedPrecondition("worker w0 serves minilm, which has no generation sessions"))
    assert not is_lost_session(ShardmeshError("internal error"))


def test_worker_keys_are_unique_per_request_and_carry_the_router_nonce() -> None:
    pipeline = _pipeline([_worker("a", 0, 6)])
    first, second = pipeline.worker_key("client-1"), pipeline.worker_key("client-1")
    assert first != second and first.startswith(pipeline.nonce) and first.endswith(":client-1")
    assert _pipeline([_worker("a", 0, 6)]).nonce != pipeline.nonce
