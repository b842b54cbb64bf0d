"""shard_worker.batching: order (priority, deadline, arrival), compatibility, size/token/padding bounds,
and the queue-delay rule. Pure logic, no torch."""

from __future__ import annotations

from shard_worker.batching import (
    DEFAULT_PRIORITY,
    Pending,
    batch_is_full,
    lengths_compatible,
    order_key,
    select_batch,
    wait_for_more_s,
)

KEY = ("forward", "float32", (384,))


def item(
    seq: int, *, length: int = 14, rows: int = 1, priority: int = 0, deadline: float | None = None, key: object = KEY
) -> Pending[str]:
    return Pending(key, rows, length, priority, deadline, seq, enqueued=100.0, payload=f"r{seq}")  # type: ignore[arg-type]


def names(queue: list[Pending[str]], chosen: list[int]) -> list[str]:
    return [queue[i].payload for i in chosen]


def test_empty_queue_selects_nothing() -> None:
    assert select_batch([], max_batch_size=8, max_batch_tokens=1000) == []


def test_order_is_priority_then_deadline_then_arrival() -> None:
    queue = [
        item(1, priority=3),
        item(2, priority=1, deadline=50.0),
        item(3, priority=1, deadline=20.0),
        item(4),  # unset -> the default level
        item(5, priority=1),  # no deadline: after those with one
        item(6, priority=DEFAULT_PRIORITY, deadline=10.0),
    ]
    ordered = sorted(queue, key=order_key)
    assert [q.payload for q in ordered] == ["r3", "r2", "r5", "r6", "r4", "r1"]
    # One request per batch: the head in that order runs next.
    assert names(queue, select_batch(queue, max_batch_size=1, max_batch_tokens=1000)) == ["r3"]


def test_compatible_requests_join_the_head_in_order_up_to_the_batch_size() -> None:
    queue = [item(i) for i in range(1, 7)]
    assert names(queue, select_batch(queue, max_batch_size=4, max_batch_tokens=1000)) == ["r1", "r2", "r3", "r4"]


def test_batch_size_counts_sequences_and_a_large_head_still_runs_alone() -> None:
    queue = [item(1, rows=3), item(2, rows=3), item(3, rows=2), item(4, rows=1)]
    assert names(queue, select_batch(queue, max_batch_size=6, max_batch_tokens=1000)) == ["r1", "r2"]
    assert names(queue, select_batch(queue, max_batch_size=5, max_batch_tokens=1000)) == ["r1", "r3"]
    big = [item(1, rows=12), item(2)]
    assert names(big, select_batch(big, max_batch_size=8, max_batch_tokens=1000)) == ["r1"]


def test_padded_tokens_stay_within_max_batch_tokens() -> None:
    # With the 20-token request: 2 rows x 20 = 40 padded tokens > 30, so it waits for a later batch;
    # two 14-token rows (28) fit, a third (42) does not.
    queue = [item(1, length=14), item(2, length=20), item(3, length=14), item(4, length=14)]
    assert names(queue, select_batch(queue, max_batch_size=8, max_batch_tokens=30)) == ["r1", "r3"]


def test_only_equal_keys_batch_and_opaque_jobs_run_alone() -> None:
    queue = [item(1), item(2, key=("forward", "int64", ())), item(3)]
    assert names(queue, select_batch(queue, max_batch_size=8, max_batch_tokens=1000)) == ["r1", "r3"]
    opaque = [item(1, key=None), item(2, key=None), item(3)]
    assert names(opaque, select_batch(opaque, max_batch_size=8, max_batch_tokens=1000)) == ["r1"]
    assert batch_is_full(opaque, [0], 8)


def test_padding_bound_is_25_percent_or_8_tokens() -> None:
    assert lengths_compatible(14, 22) and not lengths_compatible(14, 23)  # short: 8 tokens of slack
    assert lengths_compatible(100, 125) and not lengths_compatible(100, 126)  # long: 25 %
    queue = [item(1, length=100), item(2, length=130), item(3, length=79), item(4, length=120), item(5, length=96)]
    chosen = names(queue, select_batch(queue, max_batch_size=8, max_batch_tokens=10_000))
    # 130 and 79 are too far from 100; 120 then 96 fit (96..120 is within 25 %).
    assert chosen == ["r1", "r4", "r5"]
    lengths = [queue[int(n[1:]) - 1].length for n in chosen]
    assert lengths_compatible(min(lengths), max(lengths))


def test_a_batch_respects_priority_when_it_is_full() -> None:
    queue = [item(1, priority=3), item(2, priority=1), item(3, priority=2), item(4, priority=1)]
    assert names(queue, select_batch(queue, max_batch_size=2, max_batch_tokens=1000)) == ["r2", "r4"]


def test_queue_delay_waits_only_for_an_unfilled_batch_and_never_past_the_deadline() -> None:
    queue = [item(1), item(2)]
    assert not batch_is_full(queue, [0, 1], 4) and batch_is_full(queue, [0, 1], 2)
    head = item(1)  # enqueued at 100.0
    assert abs(wait_for_more_s(head, 100.0002, 0.0005) - 0.0003) < 1e-9
    assert wait_for_more_s(head, 100.001, 0.0005) == 0.0
    assert abs(wait_for_more_s(item(1, deadline=100.0001), 100.0, 0.0005) - 0.0001) < 1e-9
