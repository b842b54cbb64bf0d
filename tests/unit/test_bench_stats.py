"""Benchmark statistics on known numbers: percentiles, ratios, per-hop overhead, transfer rate, rows."""

from __future__ import annotations

import argparse

import pytest

from services.bench import stats
from services.bench.main import NOT_IMPLEMENTED_EXIT, run
from services.bench.records import (
    HopSample,
    Measurement,
    Outcome,
    RequestSample,
    WireSizes,
)
from services.bench.report import markdown_table
from services.bench.workloads import QUICK, Workload, build_plan, parse_concurrency
from services.errors import ConfigError


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        (list(range(1, 101)), 99, 99.01),  # numpy.percentile(range(1, 101), 99)
        ([10.0, 20.0], 25, 12.5),
    ],
)
def test_percentile_matches_numpy_linear(values: list[float], q: float, expected: float) -> None:
    assert stats.percentile(values, q) == pytest.approx(expected)


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_ratio_and_throughput() -> None:
    assert stats.ratio(11.0, 10.0) == pytest.approx(1.1)
    assert stats.ratio(None, 10.0) is None
    assert stats.ratio(1.0, 0.0) is None
    assert stats.throughput_rps(50, 2.0) == 25.0
    assert stats.throughput_rps(0, 2.0) is None


def test_hop_overhead_queue_and_transfer_rate() -> None:
    hops = [HopSample(hop_ms=12.0, compute_ms=10.0, queue_ms=0.0, bytes_moved=8_000_000),
            HopSample(hop_ms=8.0, compute_ms=2.0, queue_ms=2.0, bytes_moved=16_000_000)]  # fmt: skip
    assert stats.hop_overhead_ms(hops) == pytest.approx((2.0 + 6.0) / 2)
    assert stats.hop_queue_ms(hops) == pytest.approx(1.0)
    # 24 MB over (2 + 4) ms of transfer time = 4 GB/s per direction.
    assert stats.transfer_gbps(hops) == pytest.approx(4.0)
    assert stats.transfer_gbps([HopSample(5.0, 5.0, 0.0, 100)]) is None  # no transfer time: no rate


def test_relay_links_unnest_the_chain() -> None:
    # Relay: hop 0's time contains hop 1's, which contains hop 2's.
    nested = (HopSample(30.0, 5.0, 0.0, 1), HopSample(20.0, 6.0, 0.0, 2), HopSample(9.0, 7.0, 0.0, 3))
    links = stats.relay_links(nested)
    assert [link.hop_ms for link in links] == [10.0, 11.0, 9.0]
    assert [link.bytes_moved for link in links] == [1, 2, 3]
    # Overheads add up to the request's non-compute time: 30 - (5 + 6 + 7).
    assert sum(link.hop_ms - link.compute_ms for link in links) == pytest.approx(12.0)


def test_wire_sizes_per_hop() -> None:
    sizes = WireSizes(ids_bytes=10, mask_bytes=1, activation_bytes=100, output_bytes=7)
    assert [sizes.hop_bytes(i, 3) for i in range(3)] == [10 + 1 + 100, 100 + 1 + 100, 100 + 1 + 7]
    assert [sizes.hop_bytes(i, 3, relay=True) for i in range(3)] == [10 + 1 + 7, 100 + 1 + 7, 100 + 1 + 7]


def _measurement(latencies: list[float], wall_s: float, hops: tuple[HopSample, ...] = ()) -> Measurement:
    return Measurement(tuple(RequestSample(lat, hops) for lat in latencies), wall_s, 1)


def test_summarise_ratios_against_single() -> None:
    workload = Workload("m", 1, 8, ("0:1", "1:2"), requests=4, warmup=0, request_timeout_s=1.0)
    sizes = WireSizes(64, 64, 1000, 10)
    single = _measurement([10.0, 10.0, 10.0, 10.0], wall_s=0.04)  # p50 10 ms, 100 req/s
    hops = (HopSample(6.0, 5.0, 0.0, 1128), HopSample(7.0, 5.0, 0.5, 1074))
    system = _measurement([11.0, 11.0, 13.0, 13.0], wall_s=0.05, hops=hops)  # p50 12 ms, 80 req/s
    row = stats.summarise(Outcome("mesh-direct", 1, system, threads=1), single, workload, sizes)
    assert row.p50_ms == pytest.approx(12.0)
    assert row.ratio_to_single == pytest.approx(1.2)  # system p50 / single p50
    assert row.throughput_rps == pytest.approx(80.0)
    assert row.throughput_ratio == pytest.approx(0.8)
    assert row.compute_ms == pytest.approx(10.0)
    assert row.hop_overhead_ms == pytest.approx(1.5)
    assert row.hop_queue_ms == pytest.approx(0.25)
    assert row.activation_bytes == 1000 and row.stages == 2 and row.requests == 4
    assert "error" not in row.to_json()


def test_summarise_reports_errors_as_rows() -> None:
    workload = Workload("m", 1, 8, ("0:2",), requests=1, warmup=0, request_timeout_s=1.0)
    single = _measurement([10.0], wall_s=0.01)
    row = stats.summarise(Outcome("mesh-relay", 8, None, 1, error="relay mode not available: x"), single, workload,
                          WireSizes(1, 1, 1, 1))  # fmt: skip
    data = row.to_json()
    assert data["error"].startswith("relay mode not available")
    assert data["p50_ms"] is None and data["ratio_to_single"] is None
    failed = Measurement((RequestSample(5.0),), 0.01, 1, failures=2, first_failure="Unavailable: gone")
    assert "2 request(s) failed" in (stats.summarise(Outcome("torch-rpc", 1, failed, 1), single, workload, WireSizes(1, 1, 1, 1)).error or "")
    assert "relay mode not available" in markdown_table([row])


def test_plan_quick_and_concurrency() -> None:
    plan = build_plan(quick=True, requests=0, concurrency="1,8", cpu_count=2, environ={})
    assert plan.workloads == (QUICK,) and plan.concurrency == (1, 2) and plan.single_threads == (1, 2)
    assert plan.worker_threads == 2 and ("OMP_WAIT_POLICY", "PASSIVE") in plan.child_env
    plan = build_plan(quick=False, requests=3, concurrency="1,4,4", cpu_count=2, environ={"SHARDMESH_BENCH_WORKER_THREADS": "2"})
    assert plan.concurrency == (1, 4) and plan.worker_threads == 2
    assert {w.model for w in plan.workloads} == {"minilm", "tiny-llama-wide"} and all(w.requests == 3 for w in plan.workloads)
    assert QUICK.requests_at(8) == 8
    for bad in ("", "0", "a,b"):
        with pytest.raises(ConfigError):
            parse_concurrency(bad)
    with pytest.raises(ConfigError):
        build_plan(quick=True, requests=0, concurrency="1", cpu_count=2, environ={"SHARDMESH_BENCH_WORKER_THREADS": "x"})


def test_plan_queue_delay_for_the_batched_mesh() -> None:
    assert build_plan(quick=True, requests=0, concurrency="1", cpu_count=2, environ={}, batching="1,8").max_queue_delay_us == 0
    env = {"SHARDMESH_BENCH_MAX_QUEUE_DELAY_US": "2000"}
    assert build_plan(quick=True, requests=0, concurrency="1", cpu_count=2, environ=env, batching="8").max_queue_delay_us == 2000
    for bad in ("-1", "2ms"):
        with pytest.raises(ConfigError, match="SHARDMESH_BENCH_MAX_QUEUE_DELAY_US"):
            build_plan(quick=True, requests=0, concurrency="1", cpu_count=2,
                       environ={"SHARDMESH_BENCH_MAX_QUEUE_DELAY_US": bad}, batching="8")


def test_plan_batched_mesh_threads_and_coalescing() -> None:
    plan = lambda env, cpus=2: build_plan(quick=False, requests=0, concurrency="1,8", cpu_count=cpus, environ=env, batching="1,8")  # noqa: E731
    assert plan({}).worker_threads == 1 and plan({}, cpus=8).worker_threads == 2  # the cores shared by 3 stages
    assert plan({"SHARDMESH_BENCH_WORKER_THREADS": "2"}).worker_threads == 2
    assert plan({}).coalesce and not plan({"SHARDMESH_BENCH_COALESCE": "0"}).coalesce
    with pytest.raises(ConfigError, match="SHARDMESH_BENCH_COALESCE"):
        plan({"SHARDMESH_BENCH_COALESCE": "yes"})


def test_plan_rounds() -> None:
    plan = lambda **kw: build_plan(requests=0, concurrency="1", cpu_count=2, environ={}, **kw)  # noqa: E731
    assert plan(quick=False).rounds == 3 and plan(quick=True).rounds == 1 and plan(quick=False, batching="8").rounds == 3
    assert plan(quick=True, rounds=2).rounds == 2
    with pytest.raises(ConfigError, match="--rounds"):
        plan(quick=False, rounds=-1)
    assert plan(quick=False, batching="1,8", rounds=3).rounds == 3  # --batching interleaves its meshes too


def test_rounds_pool_their_requests_and_keep_each_rounds_ratio() -> None:
    """Round 1: single p50 10 ms, system 12 ms; round 2 (a slower machine): single 20, system 22. The pooled row
    takes every request and all measuring time; the spread compares each round with its own single process."""
    workload = Workload("m", 1, 8, ("0:1", "1:2"), requests=2, warmup=0, request_timeout_s=1.0)
    sizes = WireSizes(64, 64, 1000, 10)
    singles = [_measurement([10.0, 10.0], wall_s=0.02), _measurement([20.0, 20.0], wall_s=0.04)]
    rounds = [Outcome("mesh-direct", 1, _measurement([12.0, 12.0], wall_s=0.024), 1),
              Outcome("mesh-direct", 1, _measurement([22.0, 22.0], wall_s=0.044), 1)]  # fmt: skip
    pooled = stats.pool_rounds(rounds)
    assert pooled.measurement is not None and len(pooled.measurement.samples) == 4
    assert pooled.measurement.wall_s == pytest.approx(0.068)
    single_all = stats.pool_rounds([Outcome("single", 1, m, 1) for m in singles]).measurement
    assert single_all is not None
    row = stats.summarise(pooled, single_all, workload, sizes)
    assert row.requests == 4 and row.throughput_rps == pytest.approx(4 / 0.068)
    spread = stats.round_spread(rounds, singles)
    assert spread["p50_ms_per_round"] == [pytest.approx(12.0), pytest.approx(22.0)]
    assert spread["ratio_to_single_per_round"] == [pytest.approx(1.2), pytest.approx(1.1)]
    assert spread["throughput_ratio_per_round"] == [pytest.approx(100 / 120), pytest.approx(50 / 55)]
    # a round that failed makes the pooled row an error naming the round, not a row of fewer rounds
    failed = stats.pool_rounds([rounds[0], Outcome("mesh-direct", 1, None, 1, error="mesh failed: boom")])
    assert failed.measurement is None and failed.error == "round 2: mesh failed: boom"
    # one round's output differing from the single process shows in the pooled row
    wrong = Measurement(rounds[1].measurement.samples, 0.044, 1, matches_single=False)  # type: ignore[union-attr]
    right = Measurement(rounds[0].measurement.samples, 0.024, 1, matches_single=True)  # type: ignore[union-attr]
    mixed = stats.pool_rounds([Outcome("mesh-direct", 1, right, 1), Outcome("mesh-direct", 1, wrong, 1)])
    assert mixed.measurement is not None and mixed.measurement.matches_single is False


def test_unknown_suite_exits_2() -> None:
    assert run(argparse.Namespace(suite="no-such-suite"), environ={}) == NOT_IMPLEMENTED_EXIT


def test_background_cores_subtracts_own_cpu() -> None:
    from services.bench.noise import CpuSnapshot, background_cores, snapshot

    before, after = CpuSnapshot(busy_s=10.0, own_s=4.0, at=100.0), CpuSnapshot(busy_s=16.0, own_s=7.0, at=102.0)
    assert background_cores(before, after) == pytest.approx(1.5)  # (6 - 3) s of others' CPU over 2 s
    assert background_cores(None, after) is None
    assert snapshot() is not None  # Linux /proc is readable here


def test_the_plot_draws_batching_systems_too(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """--batching rows are named "mesh-direct batch<=8" etc.: the plot must draw them, not only the single process."""
    import matplotlib.axes

    from services.bench.report import plot

    drawn: list[str] = []
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("label"):
            drawn.append(kwargs["label"])
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    workload = Workload("minilm", 1, 14, ("0:2", "2:4", "4:6"), requests=2, warmup=0, request_timeout_s=1.0)
    single = _measurement([10.0, 10.0], wall_s=0.02)
    sizes = WireSizes(1, 1, 1, 1)
    rows = [stats.summarise(Outcome(name, 16, _measurement([5.0, 5.0], wall_s=0.01), 1), single, workload, sizes)
            for name in ("single", "mesh-direct unbatched", "mesh-direct batch<=8")]
    plot(rows, tmp_path / "p.png")
    assert set(drawn) == {"single", "mesh-direct unbatched", "mesh-direct batch<=8"}
