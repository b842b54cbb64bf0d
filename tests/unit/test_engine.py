"""The worker's compute engine and session service, in process: the decode lane and its reserve,
the work limit, cancellation between layers, and session drain. Real tiny-llama stages where a model
runs; jobs that block on events where only the scheduling is under test."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from services.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.layers import LayerSpan
from services.models.interrupt import Interrupt, checkpoint, interruptible
from services.models.registry import load_stage, resolve_model
from shard_worker.engine import StageEngine
from shard_worker.sessions import SessionService


@pytest.fixture(scope="module")
def stage() -> Any:
    loaded = load_stage(resolve_model("tiny-llama"), LayerSpan(0, 6))
    loaded.forward(torch.tensor([[1, 2, 3]]), None)  # the first forward pays one-off setup
    return loaded


def _blocker(release: threading.Event, started: list[str], name: str):  # type: ignore[no-untyped-def]
    def job() -> str:
        started.append(name)
        release.wait(30)
        return name

    return job


async def test_decode_steps_use_a_reserve_and_run_before_queued_requests(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=3, decode_reserve=2)
    release, order = threading.Event(), []
    infers = [asyncio.create_task(engine.run(_blocker(release, order, f"infer-{i}"), None)) for i in range(3)]
    await asyncio.sleep(0.1)
    with pytest.raises(ResourceExhausted, match=r"3 requests in flight \(limit --max-inflight 3\)"):
        await engine.run(lambda: "one too many", None)
    # The worker is full of stateless requests; a generation step is still admitted...
    decodes = [asyncio.create_task(engine.run(_blocker(release, order, f"decode-{i}"), None, decode=True)) for i in range(2)]
    await asyncio.sleep(0.1)
    assert engine.inflight == 5
    with pytest.raises(ResourceExhausted, match=r"limit --max-inflight 3 \+ 2 for generation"):
        await engine.run(lambda: "beyond the reserve", None, decode=True)
    release.set()
    await asyncio.gather(*infers, *decodes)
    # ...and runs as soon as the compute running now is done, ahead of the stateless requests queued before it.
    assert order == ["infer-0", "decode-0", "decode-1", "infer-1", "infer-2"]
    assert engine.inflight == 0
    engine.close()


async def test_a_draining_engine_refuses_new_work_but_takes_decode_steps(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=2)
    drained = asyncio.create_task(engine.drain(5))
    await asyncio.sleep(0)
    with pytest.raises(Unavailable, match="worker w-test is draining"):
        await engine.run(lambda: 1, None)
    assert (await engine.run(lambda: 2, None, decode=True)).value == 2
    assert await drained
    engine.close()


async def test_work_beyond_max_batch_tokens_is_refused_before_admission(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=2, max_batch_tokens=4096)
    ran = []
    with pytest.raises(InvalidArgument, match=r"request of 2048 sequences x 64 tokens = 131072 tokens exceeds worker "
                                              r"w-test's limit of 4096 tokens per request \(--max-batch-tokens\)"):
        await engine.run(lambda: ran.append(1), None, work=(2048, 64))
    assert (await engine.run(lambda: "ok", None, work=(64, 64))).value == "ok"
    assert ran == [] and engine.inflight == 0
    engine.close()


def test_checkpoint_raises_only_inside_an_interrupted_compute() -> None:
    checkpoint()  # no compute of a worker: a no-op
    interrupt = Interrupt(None, "w-test")
    with interruptible(interrupt):
        checkpoint()
        interrupt.cancel()
        with pytest.raises(Cancelled, match="compute at hop w-test stopped between layers"):
            checkpoint()
    checkpoint()  # restored
    with interruptible(Interrupt(time.monotonic() - 1, "w-test")), pytest.raises(DeadlineExceeded) as info:
        checkpoint()
    assert info.value.failed_worker_id == "w-test"


def _long_forward(layers_run: list[int]):  # type: ignore[no-untyped-def]
    """400 "layers" of ~10 ms each (4 s if nothing stops it), checking for a stop before each, as stages do."""

    def forward() -> None:
        for layer in range(400):
            checkpoint()
            layers_run.append(layer)
            time.sleep(0.01)

    return forward


async def test_a_cancelled_compute_stops_between_layers_and_frees_its_slot(stage: Any) -> None:
    """A long forward (many layers' worth of work) whose caller is cancelled stops within about one layer,
    and only then gives its slot back; the request queued behind it then runs at once."""
    engine = StageEngine(stage, "w-test", max_inflight=2)
    layers_run: list[int] = []

    long_forward = _long_forward(layers_run)
    big = asyncio.create_task(engine.run(long_forward, None))
    while len(layers_run) < 5:
        await asyncio.sleep(0.01)
    small = asyncio.create_task(engine.run(lambda: stage.forward(torch.tensor([[1, 2, 3]]), None), None))
    await asyncio.sleep(0.05)
    cancelled_at = time.monotonic()
    big.cancel()
    result = await asyncio.wait_for(small, 5)
    waited = time.monotonic() - cancelled_at
    assert result.value.shape == (1, 3, 512)
    assert waited < 1.0, f"the small request waited {waited:.2f}s after the big one was cancelled ({result.queue_ms=})"
    assert len(layers_run) < 100, f"the cancelled compute ran on for {len(layers_run)} layers"
    with pytest.raises(asyncio.CancelledError):
        await big
    assert engine.inflight == 0
    engine.close()


async def test_a_deadline_passing_mid_compute_stops_it(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=2)
    layers_run: list[int] = []

    long_forward = _long_forward(layers_run)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline exceeded during compute at hop w-test"):
        await engine.run(long_forward, time.monotonic() + 0.3)
    assert time.monotonic() - started < 1.5 and len(layers_run) < 100
    engine.close()


# --- sessions ---------------------------------------------------------------------------------------


async def test_drain_refuses_new_sessions_and_waits_for_open_ones(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=4)
    sessions = SessionService(stage, engine, budget_bytes=64 << 20, default_ttl_s=60)
    await sessions.step("open", 0, 0, torch.tensor([[1, 2, 3]]), None, b"k")
    assert await sessions.wait_closed(0.01) is False
    sessions.begin_drain()
    with pytest.raises(Unavailable, match="worker w-test is draining; open the session elsewhere"):
        await sessions.step("new", 0, 0, torch.tensor([[1, 2]]), None, b"k2")
    assert sessions.store.count == 1
    # The open session goes on decoding while the worker drains.
    out = await sessions.step("open", 3, 0, torch.tensor([[4]]), None, b"k")
    assert out.shape == (1, 1, 512)
    waiter = asyncio.create_task(sessions.wait_closed(10))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    started = time.monotonic()
    assert sessions.close("open", b"k")
    assert await waiter is True
    assert time.monotonic() - started < 0.5
    engine.close()


async def test_session_steps_and_close_check_the_key(stage: Any) -> None:
    engine = StageEngine(stage, "w-test", max_inflight=4)
    sessions = SessionService(stage, engine, budget_bytes=64 << 20, default_ttl_s=60, batching=True)
    await sessions.step("s", 0, 0, torch.tensor([[1, 2, 3]]), None, b"owner")
    from services.errors import PermissionDenied

    with pytest.raises(PermissionDenied, match="session 's' belongs to another caller"):
        await sessions.step("s", 3, 0, torch.tensor([[4]]), None, b"thief")
    with pytest.raises(PermissionDenied, match="session 's' belongs to another caller"):
        sessions.close("s", b"thief")
    assert (await sessions.step("s", 3, 0, torch.tensor([[4]]), None, b"owner")).shape == (1, 1, 512)
    assert sessions.close("s", b"owner")
    engine.close()


async def test_every_way_out_gives_the_admission_slot_back_exactly_once(stage: Any) -> None:
    """The slot is returned on the loop after a result, and by the compute's completion for a caller that
    left: a failing job, a queued job whose caller left, a running one whose caller left, a finished one."""
    engine = StageEngine(stage, "w-test", max_inflight=2)

    def fails() -> None:
        raise ValueError("the job failed")

    with pytest.raises(ValueError):
        await engine.run(fails, None)
    assert engine.inflight == 0
    release, order = threading.Event(), []
    running = asyncio.create_task(engine.run(_blocker(release, order, "running"), None))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(engine.run(_blocker(release, order, "queued"), None))
    await asyncio.sleep(0.05)
    assert engine.inflight == 2
    queued.cancel()
    running.cancel()
    await asyncio.sleep(0.05)
    assert engine.inflight == 1  # the queued one never starts; the running one holds its slot until it ends
    release.set()
    for _ in range(100):
        if engine.inflight == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.inflight == 0 and order == ["running"]
    assert (await engine.run(lambda: 3, None)).value == 3 and engine.inflight == 0
    engine.close()


async def test_a_cohort_of_sessions_stays_one_decode_batch_when_its_steps_arrive_apart(
    stage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions that ran in one decode batch run as one again when their next steps arrive a few ms apart
    (as a previous stage's answers reach the router one by one), instead of the first running alone; a
    session that does not come back costs one bounded wait. Every decode job runs a step (none empty)."""
    import shard_worker.sessions as sessions_module

    monkeypatch.setattr(sessions_module, "DECODE_GATHER_SHARE", 1000.0)  # wait up to DECODE_GATHER_MAX_S (50 ms)
    engine = StageEngine(stage, "w-test", max_inflight=8)
    sessions = SessionService(stage, engine, budget_bytes=64 << 20, default_ttl_s=60, batching=True)
    jobs = 0
    run = engine.run

    async def counted(job: Any, deadline: float | None, **kw: Any) -> Any:
        nonlocal jobs
        jobs += kw.get("decode", False)
        return await run(job, deadline, **kw)

    monkeypatch.setattr(engine, "run", counted)
    names = ["a", "b", "c", "d"]
    for name in names:
        await sessions.step(name, 0, 0, torch.tensor([[1, 2, 3]]), None, b"k")
    positions = dict.fromkeys(names, 3)

    async def step(name: str, delay_s: float) -> torch.Tensor:
        await asyncio.sleep(delay_s)
        out = await sessions.step(name, positions[name], 0, torch.tensor([[4]]), None, b"k")
        positions[name] += 1
        return out

    async def one_round(members: list[str], gap_s: float) -> tuple[int, int]:
        batches, steps = sessions.batches_run, sessions.batched_steps
        outs = await asyncio.gather(*(step(n, i * gap_s) for i, n in enumerate(members)))
        assert all(o.shape == (1, 1, 512) for o in outs)
        return sessions.batches_run - batches, sessions.batched_steps - steps

    assert await one_round(names, 0.0) == (1, 4)  # queued together: one batch, and now one cohort
    assert await one_round(names, 0.005) == (1, 4)  # 5 ms apart: still one batch (without cohorts: 4 or 2)
    assert await one_round(names, 0.005) == (1, 4)
    assert sessions.close("d", b"k")
    began = time.monotonic()
    assert await one_round(["a", "b", "c"], 0.0) == (1, 3)  # d closed: nobody waits for it
    # c does not come back (its generation ended without a close yet): a and b wait once, at most 50 ms.
    assert await one_round(["a", "b"], 0.0) == (1, 2)
    assert time.monotonic() - began < 5.0
    assert jobs == sessions.batches_run  # no decode job ran empty
    engine.close()

