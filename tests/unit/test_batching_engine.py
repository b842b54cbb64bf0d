"""Dynamic batching in the worker's engine, in process, on the real minilm stage: queued forwards share
one compute, outputs match solo forwards within the documented bound (bit-exact at --max-batch-size 1),
and cancellation, deadlines, failures and priorities act per request, never on batch-mates."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch

from services.errors import DeadlineExceeded
from services.layers import LayerSpan
from services.models.registry import load_stage, resolve_model
from shard_worker.engine import StageEngine

MINILM_BOUND = 1e-5  # docs/architecture.md, "Dynamic batching": measured <= 5.5e-6 on minilm stages


@pytest.fixture(scope="module")
def stage() -> Any:
    loaded = load_stage(resolve_model("minilm"), LayerSpan(0, 6))
    loaded.forward(torch.tensor([[101, 2023, 102]]), None)  # the first forward pays one-off setup
    return loaded


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1000, 20000, (1, length), generator=torch.Generator().manual_seed(seed))


class _Gate:
    """An opaque job that holds the compute thread until released, so requests queue behind it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def job(self) -> str:
        self.started.set()
        self.release.wait(30)
        return "gate"


async def _hold(engine: StageEngine) -> tuple[_Gate, asyncio.Task[Any]]:
    gate = _Gate()
    task = asyncio.create_task(engine.run(gate.job, None))
    await asyncio.to_thread(gate.started.wait, 30)
    return gate, task


async def _queued_together(engine: StageEngine, requests: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[Any]:
    """Holds the compute thread while ``requests`` queue, then lets them run; results (or errors) in order."""
    gate, held = await _hold(engine)
    tasks = [asyncio.create_task(engine.forward(x, m, lambda out: out, None)) for x, m in requests]
    await asyncio.sleep(0.2)
    gate.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await held
    return results


async def test_queued_forwards_run_as_one_batch_within_the_bound(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=16, max_batch_size=8)
    lengths = [14, 12, 16, 9, 14, 40]  # 40 is beyond the padding bound of the others: a batch of its own
    inputs = [_ids(n, i) for i, n in enumerate(lengths)]
    results = await _queued_together(engine, [(x, None) for x in inputs])
    assert [r.batch_size for r in results] == [5, 5, 5, 5, 5, 1]
    for x, result in zip(inputs, results, strict=True):
        solo = stage.forward(x, None)
        assert result.value.shape == solo.shape
        assert (result.value - solo).abs().max().item() <= MINILM_BOUND
    assert engine.inflight == 0
    engine.close()


async def test_max_batch_size_1_runs_each_request_alone_bit_exactly(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=16, max_batch_size=1)
    inputs = [_ids(14, i) for i in range(4)]
    results = await _queued_together(engine, [(x, None) for x in inputs])
    assert [r.batch_size for r in results] == [1, 1, 1, 1]
    for x, result in zip(inputs, results, strict=True):
        assert torch.equal(result.value, stage.forward(x, None))
    engine.close()


async def test_masked_and_unmasked_requests_batch_and_keep_their_own_padding(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=16, max_batch_size=8)
    padded = torch.cat([_ids(12, 1), _ids(12, 2)])
    mask = torch.ones_like(padded)
    mask[1, 9:] = 0  # the request's own padding: its second sequence has 9 tokens
    requests = [(padded, mask), (_ids(15, 3), None)]
    results = await _queued_together(engine, requests)
    assert [r.batch_size for r in results] == [2, 2]
    for (x, m), result in zip(requests, results, strict=True):
        assert (result.value - stage.forward(x, m)).abs().max().item() <= MINILM_BOUND
    engine.close()


async def test_a_request_cancelled_while_queued_leaves_the_batch(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=16, max_batch_size=8)
    inputs = [_ids(14, i) for i in range(3)]
    gate, held = await _hold(engine)
    tasks = [asyncio.create_task(engine.forward(x, None, lambda out: out, None)) for x in inputs]
    await asyncio.sleep(0.2)
    tasks[1].cancel()
    await asyncio.sleep(0.05)
    gate.release.set()
    first, last = await tasks[0], await tasks[2]
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    await held
    assert first.batch_size == last.batch_size == 2
    assert (first.value - stage.forward(inputs[0], None)).abs().max().item() <= MINILM_BOUND
    assert engine.inflight == 0
    engine.close()


class _PausingStage:
    """The real stage, but a batched forward waits for a signal first, so a test can act mid-batch;
    a request whose first token is POISON makes any forward that contains it fail."""

    POISON = 4242

    def __init__(self, stage: Any) -> None:
        self._stage = stage
        self.started = threading.Event()
        self.go = threading.Event()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if bool((x[:, 0] == self.POISON).any()):
            raise RuntimeError("poisoned input")
        return self._stage.forward(x, mask)

    def forward_batch(self, inputs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        self.started.set()
        self.go.wait(30)
        from services.models.base import pad_batch, split_batch

        x, mask, shapes = pad_batch(inputs)
        return split_batch(self.forward(x, mask), shapes, int(x.shape[1]))


async def test_a_request_cancelled_mid_batch_leaves_it_and_batch_mates_finish(stage: Any) -> None:
    pausing = _PausingStage(stage)
    engine = StageEngine(pausing, "w-test", max_inflight=16, max_batch_size=8)  # type: ignore[arg-type]
    inputs = [_ids(14, i) for i in range(3)]
    gate, held = await _hold(engine)
    tasks = [asyncio.create_task(engine.forward(x, None, lambda out: out, None)) for x in inputs]
    await asyncio.sleep(0.2)
    gate.release.set()
    await asyncio.to_thread(pausing.started.wait, 30)
    tasks[0].cancel()  # the batch is computing: the head leaves at the next layer
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    pausing.go.set()
    results = await asyncio.gather(tasks[1], tasks[2])
    await held
    for x, result in zip(inputs[1:], results, strict=True):
        assert result.batch_size == 3
        assert (result.value - stage.forward(x, None)).abs().max().item() <= MINILM_BOUND
    await asyncio.sleep(0.05)
    assert engine.inflight == 0
    engine.close()


async def test_a_failing_request_does_not_fail_its_batch_mates(stage: Any) -> None:
    pausing = _PausingStage(stage)
    pausing.go.set()
    engine = StageEngine(pausing, "w-test", max_inflight=16, max_batch_size=8)  # type: ignore[arg-type]
    inputs = [_ids(14, i) for i in range(3)]
    inputs[1][0, 0] = _PausingStage.POISON
    outcomes = await _queued_together(engine, [(x, None) for x in inputs])
    assert isinstance(outcomes[1], RuntimeError) and "poisoned" in str(outcomes[1])
    for i in (0, 2):
        assert (outcomes[i].value - stage.forward(inputs[i], None)).abs().max().item() <= MINILM_BOUND  # type: ignore[union-attr]
    engine.close()


async def test_queue_order_is_priority_then_deadline_and_expired_requests_never_run(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=16, max_batch_size=1)
    order: list[str] = []
    loop_time = asyncio.get_running_loop().time  # the engine uses time.monotonic(), the loop's clock too
    gate, held = await _hold(engine)
    specs = [("low", 3, None), ("high-late", 1, 60.0), ("high-soon", 1, 30.0), ("default", 0, None), ("expired", 1, 0.05)]
    tasks = [
        asyncio.create_task(
            engine.forward(
                _ids(8, i), None, lambda out, n=name: order.append(n), None if d is None else loop_time() + d, priority=p
            )
        )
        for i, (name, p, d) in enumerate(specs)
    ]
    await asyncio.sleep(0.3)  # "expired" runs out of time while queued
    gate.release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    await held
    assert order == ["high-soon", "high-late", "default", "low"]
    assert isinstance(outcomes[4], DeadlineExceeded) and "before compute started" in str(outcomes[4])
    engine.close()


async def test_queue_delay_lets_a_request_wait_for_batch_mates_and_zero_does_not(stage: Any) -> None:
    waiting = StageEngine(stage, "w-test", max_inflight=16, max_batch_size=8, max_queue_delay_us=400_000)
    first = asyncio.create_task(waiting.forward(_ids(14, 1), None, lambda out: out, None))
    await asyncio.sleep(0.1)  # well inside the 400 ms delay: the first is still waiting
    second = asyncio.create_task(waiting.forward(_ids(14, 2), None, lambda out: out, None))
    results = await asyncio.gather(first, second)
    assert [r.batch_size for r in results] == [2, 2]
    assert results[0].queue_ms >= 90
    waiting.close()
    eager = StageEngine(stage, "w-test", max_inflight=16, max_batch_size=8, max_queue_delay_us=0)
    alone = await eager.forward(_ids(14, 1), None, lambda out: out, None)
    assert alone.batch_size == 1 and alone.queue_ms < 90
    eager.close()
