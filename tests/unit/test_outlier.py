"""Envoy-style outlier ejection: consecutive failures, growing back-off, caps, panic and readmission."""

from __future__ import annotations

import pytest

from router.planning.outlier import OutlierConfig, OutlierDetector
from services.errors import ConfigError

STAGE = [f"w{i}" for i in range(10)]


def fail(detector: OutlierDetector, worker_id: str, now: float, times: int, stage: list[str] = STAGE) -> bool:
    return any([detector.record_failure(worker_id, now, stage) for _ in range(times)])


def test_defaults_are_envoys() -> None:
    config = OutlierConfig()
    assert (config.consecutive_failures, config.base_ejection_s, config.max_ejection_s) == (5, 30.0, 300.0)
    assert (config.max_ejection_percent, config.panic_threshold_percent) == (10.0, 50.0)


def test_ejects_after_n_consecutive_failures() -> None:
    detector = OutlierDetector()
    assert not fail(detector, "w0", 0.0, 4)
    assert not detector.is_ejected("w0", 0.0)
    assert detector.record_failure("w0", 0.0, STAGE)
    assert detector.is_ejected("w0", 0.0)
    assert detector.ejected(0.0) == frozenset({"w0"})


def test_success_resets_the_streak() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=3))
    fail(detector, "w0", 0.0, 2)
    detector.record_success("w0", 0.0)
    assert not fail(detector, "w0", 0.0, 2)
    assert detector.record_failure("w0", 0.0, STAGE)


def test_ejection_time_grows_with_times_ejected_and_is_capped() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1, base_ejection_s=30, max_ejection_s=70))
    assert detector.record_failure("w0", 0.0, STAGE)
    assert detector.due_for_probe(29.0) == []
    assert detector.due_for_probe(30.0) == ["w0"]
    detector.readmit("w0", now=30.0)
    assert not detector.is_ejected("w0", 30.0)
    assert detector.record_failure("w0", 31.0, STAGE)  # second ejection: 60 s
    assert detector.due_for_probe(90.0) == []
    assert detector.due_for_probe(91.0) == ["w0"]
    detector.record_probe_failure("w0", 91.0)  # third: 90 s, capped at 70 s
    assert detector.ejection_count("w0") == 3
    assert detector.due_for_probe(160.0) == []
    assert detector.due_for_probe(161.0) == ["w0"]


def test_back_off_is_forgiven_after_healthy_time() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1, base_ejection_s=30))
    detector.record_failure("w0", 0.0, STAGE)
    detector.readmit("w0", now=30.0)
    detector.record_success("w0", 100.0)  # two base periods healthy: multiplier decays to 0
    assert detector.ejection_count("w0") == 0
    detector.record_failure("w0", 100.0, STAGE)
    assert detector.due_for_probe(130.0) == ["w0"]


def test_ejected_stays_out_until_readmitted() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1))
    detector.record_failure("w0", 0.0, STAGE)
    assert detector.is_ejected("w0", 1000.0)
    detector.readmit("w0", now=1000.0)
    assert not detector.is_ejected("w0", 1000.0)
    assert detector.due_for_probe(2000.0) == []


def test_readmit_on_expiry_mode() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1, readmit_on_expiry=True))
    detector.record_failure("w0", 0.0, STAGE)
    assert detector.is_ejected("w0", 29.9)
    assert not detector.is_ejected("w0", 30.0)


def test_max_ejection_percent_with_at_least_one() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1))  # 10 % of 10 replicas: 1
    assert detector.record_failure("w0", 0.0, STAGE)
    assert not detector.record_failure("w1", 0.0, STAGE)
    assert detector.ejected(0.0) == frozenset({"w0"})
    pair = ["a", "b"]  # 10 % of 2 rounds to 0, but one may always be ejected
    assert detector.record_failure("a", 0.0, pair)
    assert not detector.record_failure("b", 0.0, pair)
    detector.readmit("w0", now=1.0)
    assert detector.record_failure("w1", 1.0, STAGE)  # the slot is free again


def test_larger_ejection_percent() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1, max_ejection_percent=30))
    assert [detector.record_failure(w, 0.0, STAGE) for w in STAGE[:4]] == [True, True, True, False]


def test_panic_threshold_makes_all_replicas_eligible() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1, max_ejection_percent=100))
    stage = ["a", "b", "c", "d"]
    detector.record_failure("a", 0.0, stage)
    assert detector.eligible(stage, 0.0) == ["b", "c", "d"]
    detector.record_failure("b", 0.0, stage)
    assert detector.eligible(stage, 0.0) == ["c", "d"]  # 50 % healthy: not below the threshold
    detector.record_failure("c", 0.0, stage)
    assert detector.eligible(stage, 0.0) == stage  # 25 % healthy: panic
    assert not detector.record_failure("d", 0.0, stage)  # the last replica in rotation is never ejected


def test_panic_disabled_with_zero_threshold() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1, panic_threshold_percent=0, max_ejection_percent=100))
    assert detector.record_failure("a", 0.0, ["a", "b"])
    assert detector.eligible(["a", "b"], 0.0) == ["b"]
    detector.readmit("a", 0.0)
    assert detector.record_failure("b", 0.0, ["a", "b"])
    assert detector.eligible(["a", "b"], 0.0) == ["a"]


def test_a_lone_replica_is_never_ejected() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1))
    assert not fail(detector, "only", 0.0, 20, ["only"])
    assert detector.ejected(0.0) == frozenset()


def test_share_counts_full_membership_not_the_replicas_a_request_could_use() -> None:
    """Issue 14 defect 3: with the filtered list (the ejected replica left out) every replica of a stage
    could be ejected in turn. Passing the full membership caps ejection at the stage's share."""
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1))
    pair = ["a", "b"]
    assert detector.record_failure("a", 0.0, pair)
    assert not fail(detector, "b", 0.0, 10, pair)
    assert not detector.is_ejected("b", 0.0)
    # A caller that passes only the worker itself (no other replica known) never ejects it either.
    assert not detector.record_failure("b", 0.0, ["b"])


def test_excluded_applies_panic_and_keeps_the_last_replica() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1, max_ejection_percent=100))
    stages = [["a", "b"], ["c", "d", "e", "f"], ["g"]]
    detector.record_failure("a", 0.0, stages[0])
    assert detector.excluded(stages, (), 0.0) == {"a"}  # 1 of 2 healthy: 50 %, no panic
    assert detector.excluded(stages, ["b"], 0.0) == {"b"}  # b failed this request: a is the last one left
    for w in "cde":
        detector.record_failure(w, 0.0, stages[1])
    assert detector.excluded(stages, (), 0.0) == {"a"}  # 1 of 4 healthy: panic, c d e are routable again
    assert detector.excluded(stages, ["f", "g"], 0.0) == {"a", "f", "g"}  # the request's own failures stay out
    strict = OutlierDetector(OutlierConfig(consecutive_failures=1, panic_threshold_percent=0))
    strict.record_failure("a", 0.0, stages[0])
    assert strict.excluded(stages, (), 0.0) == {"a"}
    assert strict.excluded(stages, ["b"], 0.0) == {"b"}  # no panic, but ejection never removes the last one


def test_forget_clears_history() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=1))
    detector.record_failure("w0", 0.0, STAGE)
    detector.forget("w0")
    assert not detector.is_ejected("w0", 0.0)
    assert detector.ejection_count("w0") == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_failures": 0},
        {"base_ejection_s": 0},
        {"base_ejection_s": 60, "max_ejection_s": 30},
        {"max_ejection_percent": 120},
        {"panic_threshold_percent": -1},
    ],
)
def test_invalid_config_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        OutlierConfig(**kwargs)  # type: ignore[arg-type]
