"""A generation replay costs one request per stage (ForwardRequest.replay_step_lengths), through real processes:
the replayed caches are bit-identical to the original ones, the tokens equal one process's greedy generation,
and a worker refuses replay lengths that do not cover its input."""

from __future__ import annotations

import re

import grpc
import pytest
import torch

from services.client import RouterClient
from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.wire import codec
from tests.fault_worker import start_fault_worker
from tests.integration.test_generate import _reference
from tests.procs import Proc, start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

WORKER_ARGS = ("--no-batching", "--threads", "1")
_REPLAYED = re.compile(r"replayed (\d+) steps \((\d+) tokens\) in one request")


def _replays(proc: Proc) -> list[tuple[int, int]]:
    """(steps, tokens) of every replay request this worker ran, from its log."""
    return [(int(m[1]), int(m[2])) for line in proc.stderr if (m := _REPLAYED.search(line))]


@pytest.mark.parametrize("mode", ["direct", "relay"])
def test_a_lost_session_is_replayed_in_one_request_per_stage_with_the_same_tokens(mode: str) -> None:
    """w1 loses every session at its 4th decode step (as after a restart at the same address): the router
    replays prompt + 4 tokens in ONE request to each stage, and the tokens equal one process's greedy run."""
    started = {
        "w0": start_worker("tiny-llama", "0:3", *WORKER_ARGS),
        "w1": start_fault_worker("lose-session:4", "tiny-llama", "3:6", *WORKER_ARGS),
    }
    router = None
    try:
        for _, address in started.values():
            wait_serving(address)
        router, router_address = start_router([address for _, address in started.values()])
        wait_serving(router_address)
        prompt = [1, 5, 77, 300, 12, 9]
        expected = _reference("tiny-llama", prompt, 12)
        with RouterClient(router_address) as client:
            faulted = client.generate(tokens=prompt, max_new_tokens=12, mode=mode)
            clean = client.generate(tokens=prompt, max_new_tokens=12, mode=mode)  # the fault fired once: fault-free
        assert faulted.failovers == 1 and clean.failovers == 0
        assert list(faulted.token_ids) == list(clean.token_ids) == expected
        # One replay request per stage, carrying all 5 steps (the prompt and the 4 tokens fed so far).
        for name, (proc, _) in started.items():
            assert _replays(proc) == [(5, len(prompt) + 4)], (name, proc.stderr[-20:])
    finally:
        if router is not None:
            router.stop()
        for proc, _ in started.values():
            proc.stop()


def _forward(stub: worker_pb2_grpc.ShardWorkerStub, session: str, position: int, ids: list[int],
             lengths: list[int] = ()) -> torch.Tensor:  # type: ignore[assignment]
    request = worker_pb2.ForwardRequest(request_id=f"{session}@{position}", session_id=session, position=position,
                                        session_ttl_s=60, input=codec.encode(torch.tensor([ids])))
    request.replay_step_lengths.extend(lengths)
    return codec.decode(stub.Forward(request, timeout=30).output)


def test_a_worker_runs_a_replay_as_separate_steps_and_refuses_bad_lengths() -> None:
    proc, address = start_worker("tiny-llama", "0:6", *WORKER_ARGS)
    try:
        wait_serving(address)
        steps = [[1, 5, 77, 300], [12], [9]]
        with grpc.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.ShardWorkerStub(channel)
            # Session a: the steps one request each, as they first ran.
            position, separate = 0, []
            for ids in steps:
                separate.append(_forward(stub, "a", position, ids))
                position += len(ids)
            # Session b: the same steps in one replay request.
            replayed = _forward(stub, "b", 0, [t for s in steps for t in s], [len(s) for s in steps])
            assert replayed.shape == (1, 3, separate[0].shape[-1])
            assert torch.equal(replayed, torch.cat(separate, dim=1))  # bit for bit: each step's own logits
            # The caches are identical: the next step gives the same logits on both sessions.
            assert torch.equal(_forward(stub, "a", 6, [40]), _forward(stub, "b", 6, [40]))

            with pytest.raises(grpc.RpcError) as refused:
                _forward(stub, "c", 0, [1, 2, 3], [2, 2])
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "replay_step_lengths: the 2 steps sum to 4 tokens but input holds 3" in refused.value.details()
            # Still up, and the refused request opened nothing.
            reply = stub.Describe(worker_pb2.DescribeRequest(), timeout=5)
            assert reply.state == "serving" and reply.capacity.sessions == 2
            assert _forward(stub, "c", 0, [1, 2, 3], [2, 1]).shape[1] == 2
    finally:
        proc.stop()


def test_direct_mode_replays_only_the_stage_that_lost_the_session() -> None:
    """Stage 1 has two replicas and w1a loses every session at its 4th decode step: the router moves that stage
    alone to w1b, which gets prompt + 4 tokens in one replay request fed from the hidden states the router logged;
    w0 keeps its cache and replays nothing; the tokens equal one process's greedy run."""
    started = {
        "w0": start_worker("tiny-llama", "0:3", *WORKER_ARGS),
        "w1a": start_fault_worker("lose-session:4", "tiny-llama", "3:6", *WORKER_ARGS),
        "w1b": start_worker("tiny-llama", "3:6", *WORKER_ARGS),
    }
    router = None
    try:
        for _, address in started.values():
            wait_serving(address)
        router, router_address = start_router([a for _, a in started.values()], "--balancer", "round_robin")
        wait_serving(router_address)
        prompt = [1, 5, 77, 300, 12, 9]
        expected = _reference("tiny-llama", prompt, 12)
        with RouterClient(router_address) as client:
            results = [client.generate(tokens=prompt, max_new_tokens=12, mode="direct") for _ in range(2)]
        # Round robin puts one of the two generations on w1a, whose 4th step finds the session gone.
        assert sorted(r.failovers for r in results) == [0, 1]
        assert all(list(r.token_ids) == expected for r in results)
        assert _replays(started["w0"][0]) == [], started["w0"][0].stderr[-20:]
        assert _replays(started["w1a"][0]) == []
        assert _replays(started["w1b"][0]) == [(5, len(prompt) + 4)], started["w1b"][0].stderr[-20:]
    finally:
        if router is not None:
            router.stop()
        for proc, _ in started.values():
            proc.stop()
