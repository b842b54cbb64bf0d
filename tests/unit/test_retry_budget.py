"""Retry budget: a share of recent requests plus a minimum rate, over a sliding window."""

from __future__ import annotations

import pytest

from router.planning.retry_budget import RetryBudget
from services.errors import ConfigError


def drain(budget: RetryBudget, now: float) -> int:
    granted = 0
    while budget.try_acquire_retry(now):
        granted += 1
    return granted


def test_minimum_allows_retries_without_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_s=1, window_s=10)
    assert drain(budget, 0.0) == 10


def test_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_s=0, window_s=10)
    assert not budget.try_acquire_retry(0.0)
    for _ in range(100):
        budget.record_request(0.0)
    assert drain(budget, 0.5) == 20


def test_ratio_and_minimum_add_up() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_s=10, window_s=10)
    for _ in range(1000):
        budget.record_request(1.0)
    assert drain(budget, 1.0) == 200 + 100


def test_window_slides() -> None:
    budget = RetryBudget(ratio=0.5, min_retries_per_s=0, window_s=10)
    for _ in range(10):
        budget.record_request(0.0)
    assert drain(budget, 0.0) == 5
    assert budget.available(9.9) == pytest.approx(0.0)
    # After the window both the requests and the retries have aged out.
    assert budget.available(10.5) == pytest.approx(0.0)
    for _ in range(4):
        budget.record_request(10.5)
    assert drain(budget, 10.5) == 2


def test_retries_age_out_before_a_new_burst() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_s=1, window_s=10)
    assert drain(budget, 0.0) == 10
    assert not budget.try_acquire_retry(5.0)
    assert drain(budget, 10.0) == 10


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ConfigError, match="window_s > 0"):
        RetryBudget(window_s=0)
