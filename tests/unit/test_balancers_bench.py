"""The pure part of ``shardmesh bench balance`` (services/bench/balance.py): one row per policy and level."""

from __future__ import annotations

import pytest

from services.bench.balance import POLICIES, summarise, table
from router.planning.balancers import POLICIES as ROUTER_POLICIES


def test_suite_covers_every_router_policy() -> None:
    assert set(POLICIES) == set(ROUTER_POLICIES)


def test_summarise_percentiles_throughput_and_slow_share() -> None:
    latencies = [float(ms) for ms in range(1, 101)]  # 1..100 ms
    hops = ["fast"] * 75 + ["slow"] * 25
    row = summarise("least_connections", 8, latencies, hops, wall_s=2.0, failures=0, same_output=True)
    assert row.p50_ms == pytest.approx(50.5)
    assert row.p99_ms == pytest.approx(99.01)
    assert row.throughput_rps == pytest.approx(50.0)
    assert row.slow_share == pytest.approx(0.25)
    assert row.requests == 100


def test_summarise_of_a_run_where_everything_failed() -> None:
    row = summarise("p2c", 1, [], [], wall_s=1.0, failures=3, same_output=None)
    assert (row.p50_ms, row.p99_ms, row.throughput_rps, row.slow_share) == (None, None, None, None)
    assert row.failures == 3


def test_table_has_one_line_per_row_and_flags_differing_outputs() -> None:
    rows = [
        summarise("round_robin", 1, [10.0, 20.0], ["fast", "slow"], 0.03, 0, True),
        summarise("weighted", 1, [10.0], ["slow"], 0.01, 1, False),
    ]
    text = table(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| round_robin | 1 | 2 | 0 | 15.0 |") and "| 50 % | yes |" in lines[2]
    assert lines[3].endswith("| 100 % | NO |")
