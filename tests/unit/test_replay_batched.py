"""A generation replay is one request per stage (ForwardRequest.replay_step_lengths): the router's side over a
recorded fake mesh, the worker's input checks, and the slicing of the replay's output."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from router.generation import last_step_output
from router.planning.retry_budget import RetryBudget
from services.errors import FailedPrecondition, InvalidArgument, NotFound
from services.gen.shardmesh.v1 import worker_pb2
from services.wire import codec
from shard_worker.inputs import replay_lengths
from tests.unit.test_generation_failover import FakeMesh, _generate, _service


class RecordingMesh(FakeMesh):
    """Also records each call's input tensor and replay lengths."""

    def __init__(self, fail_at: dict[int, Exception]) -> None:
        super().__init__(fail_at)
        self.sent: list[tuple[str, int, list[int], torch.Tensor]] = []  # worker, position, lengths, input

    async def call(self, chosen: Any, call_id: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        session = args[3] if len(args) > 3 else kwargs.get("session")
        lengths = list(kwargs.get("replay_step_lengths", ()))
        self.sent.append((chosen[0].worker_id, session[1], lengths, x.clone()))
        return await super().call(chosen, call_id, x, *args, **kwargs)


async def test_a_replay_sends_every_step_in_one_call_per_stage() -> None:
    # Prompt [1, 2, 3] at 0, then tokens 0 (at 3) and 3 (at 4); w1 loses the session at its third call.
    mesh = RecordingMesh({6: NotFound("unknown session")})
    service, _ = _service(mesh, RetryBudget())
    summary = await _generate(service, max_new_tokens=4)
    assert summary.failovers == 1 and list(summary.token_ids) == [0, 3, 4, 5]
    replays = [(w, p, n, x) for w, p, n, x in mesh.sent if n]
    assert [(w, p, n) for w, p, n, _ in replays] == [("w0", 0, [3, 1, 1]), ("w1", 0, [3, 1, 1])]
    assert replays[0][3].tolist() == [[1, 2, 3, 0, 3]]  # the step log, concatenated along the sequence
    # Stage 1 gets stage 0's whole output (one hidden row per token), not only the last step's.
    assert replays[1][3].tolist() == [[1.0, 2.0, 3.0, 0.0, 3.0]]
    # No step of the new session was sent on its own before the replay: after it, decoding resumes at 5.
    new_positions = [(w, p) for w, _, p, _ in mesh.calls[6:]]
    assert new_positions[:4] == [("w0", 0), ("w1", 0), ("w0", 5), ("w1", 5)]


async def test_without_a_failure_no_call_carries_replay_lengths() -> None:
    mesh = RecordingMesh({})
    service, _ = _service(mesh, RetryBudget())
    await _generate(service, max_new_tokens=3)
    assert mesh.sent and not any(n for _, _, n, _ in mesh.sent)


def test_last_step_output_takes_the_last_steps_part() -> None:
    per_step = torch.arange(3 * 4, dtype=torch.float32).reshape(1, 3, 4)  # last stage: one logits row per step
    assert torch.equal(last_step_output(per_step, [5, 1, 1]), per_step[:, 2:])
    per_token = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2)  # every position: the last step's rows
    assert torch.equal(last_step_output(per_token, [3, 2, 2]), per_token[:, 5:])
    with pytest.raises(FailedPrecondition, match="replay of 3 steps .7 tokens. returned 1 rows"):
        last_step_output(torch.zeros(1, 1, 4), [5, 1, 1])


def _request(lengths: list[int], session_id: str = "s#0") -> tuple[worker_pb2.ForwardRequest, torch.Tensor]:
    x = torch.tensor([[1, 2, 3, 4, 5]])
    request = worker_pb2.ForwardRequest(session_id=session_id, input=codec.encode(x))
    request.replay_step_lengths.extend(lengths)
    return request, x


def test_worker_input_checks_of_replay_lengths() -> None:
    assert replay_lengths(*_request([])) == []
    assert replay_lengths(*_request([3, 1, 1])) == [3, 1, 1]
    with pytest.raises(InvalidArgument, match=r"replay_step_lengths: the 2 steps sum to 4 tokens but input holds 5"):
        replay_lengths(*_request([3, 1]))
    with pytest.raises(InvalidArgument, match=r"replay_step_lengths\[1\]: 0 tokens"):
        replay_lengths(*_request([5, 0]))
    with pytest.raises(InvalidArgument, match="replay_step_lengths: only for a generation session; set session_id"):
        replay_lengths(*_request([5], session_id=""))


def test_replay_lengths_survive_the_wire() -> None:
    request, _ = _request([4, 1])
    again = worker_pb2.ForwardRequest.FromString(request.SerializeToString())
    assert list(again.replay_step_lengths) == [4, 1]
