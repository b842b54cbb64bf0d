"""Router-side coalescing: when requests go alone, when and how they are grouped, and that members keep their
own deadlines, errors and cancellation (router/coalescing.py, router/infer_batches.py)."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import pytest
import torch

from router.coalescing import Coalescer, _Waiter, take_group
from router.infer_batches import InferItem, batch_key, split, stack
from router.pipeline import PipelineResult
from services.cli.parser import build_parser
from services.config import RouterConfig
from services.errors import ConfigError, DeadlineExceeded, Unavailable
from services.gen.shardmesh.v1 import tensor_pb2
from services.wire import codec


class FakeRun:
    """Records each call's items; every call waits until the test releases it."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.cancelled: list[list[str]] = []
        self.fail: Exception | None = None

    async def __call__(self, items: list[str]) -> list[str]:
        self.calls.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(list(items))
            raise
        if self.fail is not None:
            raise self.fail
        return [f"{item}!" for item in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _far() -> float:
    return time.monotonic() + 30


async def test_requests_go_alone_while_there_is_room_then_wait_and_leave_together() -> None:
    run = FakeRun()
    coalescer: Coalescer[str, str] = Coalescer(run, max_rows=3, depth=lambda: 1)
    first = asyncio.create_task(coalescer.submit("k", "a", _far()))
    await _settle()
    assert run.calls == [["a"]]  # room: alone, at once
    waiting = [asyncio.create_task(coalescer.submit("k", x, _far())) for x in "bcde"]
    other = asyncio.create_task(coalescer.submit("other", "z", _far()))
    await _settle()
    assert run.calls == [["a"]] and coalescer.waiting == 5
    run.gates[0].set()
    assert await first == "a!"
    await _settle()
    assert run.calls[1] == ["b", "c", "d"]  # oldest first, same key, at most max_rows
    run.gates[1].set()
    await _settle()
    assert run.calls[2] == ["e"]  # then the rest of that key (still ahead of "z")
    run.gates[2].set()
    await _settle()
    assert run.calls[3] == ["z"]
    run.gates[3].set()
    assert [await t for t in waiting] == ["b!", "c!", "d!", "e!"]
    assert await other == "z!"
    assert (coalescer.groups, coalescer.grouped, coalescer.inflight) == (1, 3, 0)


def test_take_group_keeps_the_order_of_what_it_leaves() -> None:
    loop = asyncio.new_event_loop()
    try:
        waiting = collections.deque(_Waiter(k, i, loop.create_future()) for i, k in enumerate("abaab"))
        assert [w.item for w in take_group(waiting, 2)] == [0, 2]
        assert [w.item for w in waiting] == [1, 3, 4]
        assert take_group(collections.deque(), 4) == []
    finally:
        loop.close()


async def test_a_member_that_leaves_does_not_stop_the_others_but_all_leaving_stops_the_work() -> None:
    run = FakeRun()
    coalescer: Coalescer[str, str] = Coalescer(run, max_rows=4, depth=lambda: 1)
    blocker = asyncio.create_task(coalescer.submit("k", "a", _far()))
    await _settle()
    members = [asyncio.create_task(coalescer.submit("k", x, _far())) for x in "bc"]
    await _settle()
    run.gates[0].set()
    await blocker
    await _settle()
    assert run.calls[1] == ["b", "c"]
    members[0].cancel()
    await _settle()
    assert run.cancelled == []  # c still waits for the group
    run.gates[1].set()
    assert await members[1] == "c!"
    with pytest.raises(asyncio.CancelledError):
        await members[0]

    blocker = asyncio.create_task(coalescer.submit("k", "x", _far()))
    await _settle()
    group = [asyncio.create_task(coalescer.submit("k", y, _far())) for y in "yz"]
    await _settle()
    run.gates[2].set()
    await blocker
    await _settle()
    assert run.calls[3] == ["y", "z"]
    for task in group:
        task.cancel()
    await _settle()
    assert run.cancelled == [["y", "z"]]  # nobody is left to answer: the work stops
    assert coalescer.inflight == 0


async def test_a_waiting_member_that_leaves_is_never_sent() -> None:
    run = FakeRun()
    coalescer: Coalescer[str, str] = Coalescer(run, max_rows=4, depth=lambda: 1)
    blocker = asyncio.create_task(coalescer.submit("k", "a", _far()))
    await _settle()
    gone = asyncio.create_task(coalescer.submit("k", "b", _far()))
    stays = asyncio.create_task(coalescer.submit("k", "c", _far()))
    await _settle()
    gone.cancel()
    await _settle()
    assert coalescer.waiting == 1
    run.gates[0].set()
    await blocker
    await _settle()
    assert run.calls[1] == ["c"]
    run.gates[1].set()
    assert await stays == "c!"


async def test_a_group_error_reaches_every_member_and_deadlines_are_each_members_own() -> None:
    run = FakeRun()
    coalescer: Coalescer[str, str] = Coalescer(run, max_rows=4, depth=lambda: 1)
    blocker = asyncio.create_task(coalescer.submit("k", "a", _far()))
    await _settle()
    short = asyncio.create_task(coalescer.submit("k", "s", time.monotonic() + 0.05))
    members = [asyncio.create_task(coalescer.submit("k", x, _far())) for x in "bc"]
    with pytest.raises(DeadlineExceeded, match="ran out of time waiting for its coalesced batch"):
        await short
    assert coalescer.waiting == 2
    run.fail = Unavailable("no healthy replica left for layers 2:4")
    run.gates[0].set()
    with pytest.raises(Unavailable):
        await blocker
    await _settle()
    assert run.calls[1] == ["b", "c"]  # the member whose time ran out was not sent
    run.gates[1].set()
    for task in members:
        with pytest.raises(Unavailable, match="layers 2:4"):
            await task
    assert coalescer.inflight == 0


def test_coalescing_needs_at_least_two_rows() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Coalescer(FakeRun(), max_rows=1, depth=lambda: 1)


# --- building and splitting a batch -------------------------------------------------------------------------


def _item(ids: list[int], mask: bool = True, **kw: Any) -> InferItem:
    t = torch.tensor([ids], dtype=torch.int64)
    return InferItem("r", codec.encode(t), codec.encode(torch.ones_like(t)) if mask else None, 0.0, False, 2, **kw)


def test_only_one_row_inline_requests_of_one_shape_share_a_key() -> None:
    assert batch_key(_item([1, 2, 3])) == batch_key(_item([4, 5, 6]))
    assert batch_key(_item([1, 2, 3])) != batch_key(_item([1, 2]))  # another length
    assert batch_key(_item([1, 2, 3])) != batch_key(_item([1, 2, 3], mask=False))
    two_rows = InferItem("r", codec.encode(torch.ones(2, 3, dtype=torch.int64)), None, 0.0, False, 2)
    assert batch_key(two_rows) is None  # a client's own batch goes alone
    shm = _item([1, 2, 3])
    shm.ids.shm_handle = "shardmesh-1-x"
    assert batch_key(shm) is None


def test_stack_and_split_give_each_member_its_own_row_and_count_the_batch_in_the_hops() -> None:
    items = [_item([1, 2, 3]), _item([4, 5, 6]), _item([7, 8, 9])]
    ids, mask = stack(items)
    assert codec.decode(ids).tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert mask is not None and codec.decode(mask).shape == (3, 3)
    output = torch.arange(3 * 3 * 2, dtype=torch.float32).reshape(3, 3, 2)
    hops = [tensor_pb2.HopRecord(worker_id="w0", batch_size=1), tensor_pb2.HopRecord(worker_id="w1", batch_size=2)]
    for result in (PipelineResult(output=output, hops=hops, attempts=2, checksum="c"),
                   PipelineResult(output=torch.empty(0), hops=hops, checksum="c", output_wire=codec.encode(output))):
        parts = split(result, 3)
        assert [torch.equal(p.output, output[i : i + 1]) for i, p in enumerate(parts)] == [True] * 3
        assert [h.batch_size for h in parts[0].hops] == [3, 4]  # alone: the batch; merged: a lower bound
        assert hops[0].batch_size == 1 and parts[0].output_wire is None
    with pytest.raises(RuntimeError, match="batch of 2 requests came back with 3 rows"):
        split(PipelineResult(output=output), 2)


@pytest.mark.parametrize("flags, expected", [([], (0, 0)), (["--coalesce", "8"], (8, 0)),
                                             (["--coalesce", "8", "--coalesce-depth", "2"], (8, 2))])
def test_the_router_flags(flags: list[str], expected: tuple[int, int]) -> None:
    config = RouterConfig.from_args(build_parser().parse_args(["router", "--workers", "127.0.0.1:1", *flags]), env={})
    assert (config.coalesce, config.coalesce_depth) == expected


@pytest.mark.parametrize("flags, message", [(["--coalesce", "1"], "--coalesce must be 0 \\(off\\) or at least 2"),
                                            (["--coalesce", "-3"], "--coalesce must be"),
                                            (["--coalesce", "4", "--coalesce-depth", "-1"], "--coalesce-depth must be")])
def test_bad_router_flags_name_themselves(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RouterConfig.from_args(build_parser().parse_args(["router", "--workers", "127.0.0.1:1", *flags]), env={})


async def test_with_coalescing_off_every_request_goes_alone_under_its_own_id_and_priority() -> None:
    """--coalesce 0: the router still sends every Infer through InferBatcher (one path), which never groups."""
    from router.infer_batches import InferBatcher
    from router.scheduling.context import current_priority

    calls: list[tuple[str, int, bool, int]] = []

    class Pipeline:
        async def run(self, request_id: str, ids: Any, mask: Any, deadline: float, *, relay: bool) -> str:
            calls.append((request_id, len(ids.shape), relay, current_priority()))
            await asyncio.sleep(0.01)
            return request_id

    batcher = InferBatcher(Pipeline(), max_rows=0, depth=0, stages=lambda: 3)  # type: ignore[arg-type]
    assert batcher.coalescer is None
    one = _item([1, 2, 3])  # one key for all of them were coalescing on
    items = [InferItem(f"r{i}", one.ids, one.mask, _far(), i % 2 == 0, 1 + i % 3) for i in range(6)]
    assert await asyncio.gather(*(batcher.run(item) for item in items)) == [f"r{i}" for i in range(6)]
    assert sorted(calls) == [(f"r{i}", 2, i % 2 == 0, 1 + i % 3) for i in range(6)]  # each alone, [1, 3]
