"""Pure statistics over measurements: percentiles, ratios, per-hop overhead and transfer rate.

No torch, no sockets: every number in the report comes from these functions, so they are tested on
known inputs (``tests/unit/test_bench_stats.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from services.bench.records import BenchRow, HopSample, Measurement, Outcome, WireSizes
from services.bench.workloads import Workload

BYTES_PER_GB = 1e9


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics.

    Same definition as ``numpy.percentile(values, q)`` (method "linear"), so numbers can be checked
    against any other tool; p99 of fewer than 100 samples is then an interpolation near the maximum.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def throughput_rps(requests: int, wall_s: float) -> float | None:
    return requests / wall_s if wall_s > 0 and requests > 0 else None


def _all_hops(measurement: Measurement) -> list[HopSample]:
    return [hop for sample in measurement.samples for hop in sample.hops]


def hop_overhead_ms(hops: Sequence[HopSample]) -> float | None:
    """Mean of ``hop_ms - compute_ms`` over hops: everything a hop costs besides the forward itself
    (serialisation, transport both ways, scheduling, and the wait for the remote compute slot)."""
    return mean([h.hop_ms - h.compute_ms for h in hops])


def hop_queue_ms(hops: Sequence[HopSample]) -> float | None:
    return mean([h.queue_ms for h in hops])


def transfer_gbps(hops: Sequence[HopSample]) -> float | None:
    """Bytes moved over the hops divided by their transfer time, in GB/s (1e9 bytes).

    Transfer time = ``hop_ms - compute_ms - queue_ms``: a hop's input and output travel one after the
    other, so this is the rate of each direction (an 8 MB input plus an 8 MB output in 4 ms of transfer
    time is 4 GB/s per direction). Fixed per-call costs are included, so small messages show low rates.
    """
    moved = sum(h.bytes_moved for h in hops)
    seconds = sum(h.hop_ms - h.compute_ms - h.queue_ms for h in hops) / 1000.0
    if moved <= 0 or seconds <= 0:
        return None
    return moved / seconds / BYTES_PER_GB


def relay_links(hops: Sequence[HopSample]) -> tuple[HopSample, ...]:
    """Turns relay hop records into per-link samples.

    In relay mode hop k's ``hop_ms`` (timed by its caller) also contains every later hop, because the
    answer returns along the chain. Link k's own time is therefore ``hop_ms[k] - hop_ms[k+1]``; with
    the compute subtracted, the links' overheads add up to the request's total non-compute time,
    exactly as the direct hops' do.
    """
    links = []
    for index, hop in enumerate(hops):
        downstream_ms = hops[index + 1].hop_ms if index + 1 < len(hops) else 0.0
        links.append(HopSample(hop.hop_ms - downstream_ms, hop.compute_ms, hop.queue_ms, hop.bytes_moved))
    return tuple(links)


def compute_per_request_ms(measurement: Measurement) -> float | None:
    """Mean over requests of the summed stage compute: what the latency would be with free transport."""
    return mean([sum(h.compute_ms for h in s.hops) for s in measurement.samples])


def latency_summary(measurement: Measurement) -> tuple[float | None, float | None, float | None]:
    """(p50, p99, mean) of the request latencies in ms; Nones when no request succeeded."""
    latencies = [s.latency_ms for s in measurement.samples]
    if not latencies:
        return None, None, None
    return percentile(latencies, 50), percentile(latencies, 99), mean(latencies)


def hop_summary(measurement: Measurement) -> tuple[float | None, float | None, float | None]:
    """(hop_overhead_ms, hop_queue_ms, transfer_gbps) over every hop of every request."""
    hops = _all_hops(measurement)
    if not hops:
        return None, None, None
    return hop_overhead_ms(hops), hop_queue_ms(hops), transfer_gbps(hops)


def summarise(outcome: Outcome, single: Measurement, workload: Workload, sizes: WireSizes) -> BenchRow:
    """One table row: ``outcome``'s numbers, with ratios against the single-process measurement ``single``."""
    m = outcome.measurement
    error = outcome.error
    if m is not None and m.failures:
        error = error or f"{m.failures} request(s) failed; first: {m.first_failure}"
    row = BenchRow(
        system=outcome.system, model=workload.model, concurrency=outcome.concurrency,
        p50_ms=None, p99_ms=None, mean_ms=None, throughput_rps=None, ratio_to_single=None, throughput_ratio=None,
        compute_ms=None, hop_overhead_ms=None, hop_queue_ms=None, transfer_gbps=None,
        activation_bytes=sizes.activation_bytes, batch=workload.batch, seq_len=workload.seq_len,
        stages=len(workload.split), requests=len(m.samples) if m else 0, threads=outcome.threads,
        matches_single=m.matches_single if m else None,
        background_cores=m.background_cores if m else None, note=outcome.note, error=error,
    )  # fmt: skip
    if m is None or not m.samples:
        return replace(row, error=error or "no request succeeded")
    p50, p99, avg = latency_summary(m)
    rps = throughput_rps(len(m.samples), m.wall_s)
    overhead, queue, gbps = hop_summary(m)
    return replace(
        row,
        p50_ms=p50,
        p99_ms=p99,
        mean_ms=avg,
        throughput_rps=rps,
        ratio_to_single=ratio(p50, latency_summary(single)[0]),
        throughput_ratio=ratio(rps, throughput_rps(len(single.samples), single.wall_s)),
        compute_ms=compute_per_request_ms(m) if m.samples[0].hops else avg,
        hop_overhead_ms=overhead,
        hop_queue_ms=queue,
        transfer_gbps=gbps,
    )


def pool_rounds(outcomes: Sequence[Outcome]) -> Outcome:
    """One system's outcomes at one level over several rounds, as one outcome: the samples of every round,
    the rounds' wall times added (so throughput is all requests over all measuring time), failures added,
    and "same output" only if every round matched. A round that failed outright makes the pooled row an error
    naming it, rather than a row silently built from fewer rounds."""
    if not outcomes:
        raise ValueError("pool_rounds of no outcomes")
    first = outcomes[0]
    errors = [f"round {i + 1}: {o.error}" for i, o in enumerate(outcomes) if o.error or o.measurement is None]
    if errors:
        return replace(first, measurement=None, error="; ".join(e or "" for e in errors)[:800])
    measurements = [o.measurement for o in outcomes if o.measurement is not None]
    matches = [m.matches_single for m in measurements]
    background = [m.background_cores for m in measurements if m.background_cores is not None]
    pooled = Measurement(
        samples=tuple(s for m in measurements for s in m.samples),
        wall_s=sum(m.wall_s for m in measurements),
        concurrency=first.concurrency,
        failures=sum(m.failures for m in measurements),
        first_failure=next((m.first_failure for m in measurements if m.first_failure), ""),
        matches_single=None if any(v is None for v in matches) else all(matches),  # type: ignore[arg-type]
        background_cores=max(background) if background else None,
    )
    return replace(first, measurement=pooled)


def round_spread(rounds: Sequence[Outcome], singles: Sequence[Measurement]) -> dict[str, list[float | None]]:
    """Per round: p50, and the p50 and throughput ratios against the single process *of the same round*
    (systems interleave, so a round's ratio compares runs minutes apart at most); the spread a reader needs
    to tell a difference from noise."""
    p50s: list[float | None] = []
    ratios: list[float | None] = []
    rates: list[float | None] = []
    for outcome, single in zip(rounds, singles, strict=True):
        m = outcome.measurement
        p50 = latency_summary(m)[0] if m is not None and m.samples else None
        rps = throughput_rps(len(m.samples), m.wall_s) if m is not None else None
        p50s.append(p50)
        ratios.append(ratio(p50, latency_summary(single)[0] if single.samples else None))
        rates.append(ratio(rps, throughput_rps(len(single.samples), single.wall_s)))
    return {"p50_ms_per_round": p50s, "ratio_to_single_per_round": ratios, "throughput_ratio_per_round": rates}
