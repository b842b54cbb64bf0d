"""The decode cohort rules (shard_worker/cohorts.py): which sessions a queued decode batch waits for."""

from __future__ import annotations

from shard_worker.cohorts import DecodeCohorts


def test_a_lone_or_new_session_waits_for_nobody() -> None:
    cohorts = DecodeCohorts()
    assert cohorts.awaited(["a"], 0.0, 0.01) == set()  # never ran here
    cohorts.ran(["a"], 1.0)
    assert cohorts.awaited(["a"], 1.1, 1.11) == set()  # its cohort is itself


def test_a_batch_waits_for_the_rest_of_its_cohort_and_starts_once_all_are_queued() -> None:
    cohorts = DecodeCohorts()
    cohorts.ran(["a", "b", "c"], 1.0)
    cohorts.ran(["x"], 1.0)  # another cohort: not waited for by a, b, c
    assert cohorts.awaited(["a"], 1.1, 1.11) == {"b", "c"}
    assert cohorts.awaited(["a", "c"], 1.1, 1.11) == {"b"}
    assert cohorts.awaited(["c", "a", "b"], 1.1, 1.11) == set()


def test_cohorts_that_meet_in_the_queue_merge() -> None:
    cohorts = DecodeCohorts()
    cohorts.ran(["a", "b"], 1.0)
    cohorts.ran(["c"], 1.0)
    cohorts.ran(["a", "c"], 1.1)  # b was late: a ran with c
    # (a window in which nobody is due by period, so only the cohort rule speaks)
    assert cohorts.awaited(["a"], 1.15, 1.16) == {"c"}
    assert cohorts.awaited(["b"], 1.15, 1.16) == set()  # b's old cohort has moved on without it
    cohorts.ran(["a", "b", "c"], 1.3)
    assert cohorts.awaited(["b"], 1.35, 1.36) == {"a", "c"}


def test_a_steady_session_expected_within_the_wait_is_waited_for() -> None:
    cohorts = DecodeCohorts()
    for t in (1.0, 1.1):  # s steps every 100 ms
        cohorts.ran(["s"], t)
    cohorts.ran(["q"], 1.18)
    # s is expected at 1.2: a batch of q starting at 1.19 with a 20 ms wait waits for it...
    assert cohorts.awaited(["q"], 1.19, 1.21) == {"s"}
    # ...one starting at 1.15 with a 20 ms wait does not (s is due after the wait)...
    assert cohorts.awaited(["q"], 1.15, 1.17) == set()
    # ...nor one at 1.25: s is overdue by more than the wait (its generation ended or it left).
    assert cohorts.awaited(["q"], 1.25, 1.27) == set()
    assert cohorts.awaited(["q", "s"], 1.19, 1.21) == set()


def test_a_forgotten_session_is_not_waited_for() -> None:
    cohorts = DecodeCohorts()
    cohorts.ran(["a", "b"], 1.0)
    cohorts.ran(["a", "b"], 1.1)
    cohorts.forget("b")
    assert cohorts.awaited(["a"], 1.15, 1.25) == set()
    assert len(cohorts) == 1
