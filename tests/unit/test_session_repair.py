"""Direct-mode generation failover replays only the failed stage when the other stages keep their workers:
the pure decision (router/planning/session_repair.py) and the router's side over a recorded fake mesh with
two replicas per stage (the production GenerationService and Pipeline, planner and balancer)."""

from __future__ import annotations

import time

import pytest
import torch

import router.generation as generation
from router.planning.planner import plan_route
from router.planning.retry_budget import RetryBudget
from router.planning.session_repair import stage_candidates
from router.planning.types import WorkerInfo
from services.errors import NotFound, Unavailable
from services.gen.shardmesh.v1 import router_pb2
from services.layers import LayerSpan
from tests.unit.test_generation_failover import _generate, _service
from tests.unit.test_replay_batched import RecordingMesh


def _worker(worker_id: str, port: int, start: int, end: int, checksum: str = "sum") -> WorkerInfo:
    return WorkerInfo(worker_id, f"127.0.0.1:{port}", "m", "llama", LayerSpan(start, end), 6, checksum)


PAIRS = (_worker("w0a", 1, 0, 3), _worker("w0b", 2, 0, 3), _worker("w1a", 3, 3, 6), _worker("w1b", 4, 3, 6))


class PairMesh(RecordingMesh):
    def __init__(self, fail_at: dict[int, Exception], workers: tuple[WorkerInfo, ...] = PAIRS) -> None:
        super().__init__(fail_at)
        self.workers = workers


# --- the pure decision -----------------------------------------------------------------------------------


def test_candidates_are_the_failed_stages_other_replicas() -> None:
    plan = plan_route(PAIRS)
    route = [PAIRS[0], PAIRS[2]]
    assert stage_candidates(plan, route, 1) == (PAIRS[3],)
    assert stage_candidates(plan, route, 0) == (PAIRS[1],)


def test_no_candidates_when_another_stage_left_the_plan_or_spans_changed() -> None:
    route = [PAIRS[0], PAIRS[2]]
    # w0a was ejected meanwhile: the route must be planned again as a whole.
    assert stage_candidates(plan_route(PAIRS, excluded=frozenset({"w0a"})), route, 1) == ()
    # The stage's only replica is the one that failed.
    assert stage_candidates(plan_route(PAIRS, excluded=frozenset({"w1b"})), route, 1) == ()
    # Workers were re-placed on other layer spans: 0:2 + 2:6 do not match the route's 0:3 + 3:6.
    moved = (_worker("x0", 5, 0, 2), _worker("x1", 6, 2, 6), _worker("x2", 7, 2, 6))
    assert stage_candidates(plan_route(moved), route, 1) == ()
    assert stage_candidates(plan_route(PAIRS), route, 2) == ()


# --- the router's side -------------------------------------------------------------------------------------


def _session_calls(mesh: PairMesh) -> list[tuple[str, str, int, list[int]]]:
    """(worker, session id, position, replay lengths) per call, in order."""
    return [(w, s, p, n) for (w, s, p, _), (_, _, n, _) in zip(mesh.calls, mesh.sent)]


async def _reference_tokens() -> list[int]:
    service, _ = _service(PairMesh({}), RetryBudget())
    return list((await _generate(service, max_new_tokens=4)).token_ids)


async def test_a_failed_last_stage_moves_alone_and_gets_the_logged_hidden_states() -> None:
    # Calls: 1 stage 0 prompt, 2 stage 1 prompt, 3 stage 0 token 1, 4 stage 1 token 1 -> UNAVAILABLE.
    mesh = PairMesh({4: Unavailable("connection reset")})
    service, _ = _service(mesh, RetryBudget())
    summary = await _generate(service, max_new_tokens=4)
    assert list(summary.token_ids) == await _reference_tokens() and summary.failovers == 1
    calls = _session_calls(mesh)
    stage0, stage1, failed = calls[0][0], calls[1][0], calls[3][0]
    assert failed == stage1
    replay = calls[4]
    assert replay[0] == ({"w1a", "w1b"} - {stage1}).pop() and replay[2:] == (0, [3, 1])
    assert torch.equal(mesh.sent[4][3], torch.tensor([[1.0, 2.0, 3.0, 0.0]]))  # stage 0's outputs, logged
    # The same session and key everywhere: stage 0 kept its cache and never replayed.
    assert {s for _, s, _, _ in calls} == {calls[0][1]} and len({k for *_, k in mesh.calls}) == 1
    assert [c for c in calls if c[3]] == [replay]
    assert calls[5][:3] == (stage0, calls[0][1], 4)
    # Only the failed worker's copy was closed at the failover (then the final route at the end).
    addresses = {w.worker_id: w.address for w in PAIRS}
    assert mesh.closes[0][0] == addresses[failed]
    assert {a for a, _, _ in mesh.closes[1:]} == {addresses[stage0], addresses[replay[0]]}


async def test_a_failed_first_stage_replays_the_token_log_and_the_next_stage_just_steps() -> None:
    mesh = PairMesh({3: NotFound("unknown session")})  # stage 0 restarted before token 1
    service, _ = _service(mesh, RetryBudget())
    summary = await _generate(service, max_new_tokens=4)
    assert list(summary.token_ids) == await _reference_tokens()
    calls = _session_calls(mesh)
    assert calls[3][0] != calls[0][0] and calls[3][2:] == (0, [3, 1])
    assert mesh.sent[3][3].tolist() == [[1, 2, 3, 0]]
    assert calls[4][0] == calls[1][0] and calls[4][2:] == (3, [])  # stage 1 steps on at position 3


async def test_over_the_input_budget_every_stage_replays_on_a_new_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "STAGE_INPUT_BUDGET_BYTES", 8)  # less than the prompt's hidden states
    mesh = PairMesh({4: Unavailable("connection reset")})
    service, _ = _service(mesh, RetryBudget())
    summary = await _generate(service, max_new_tokens=4)
    assert list(summary.token_ids) == await _reference_tokens()
    calls = _session_calls(mesh)
    replays = [c for c in calls if c[3]]
    assert [r[3] for r in replays] == [[3, 1], [3, 1]] and replays[0][1] != calls[0][1]


async def test_a_relayed_session_still_replays_the_whole_chain() -> None:
    mesh = PairMesh({2: Unavailable("connection reset")})  # the chain's second call (token 1)
    service, _ = _service(mesh, RetryBudget())
    request = router_pb2.GenerateRequest(max_new_tokens=3)
    events = [e async for e in service.generate(request, [1, 2, 3], None, time.monotonic() + 30, "c", relay=True)]
    await service.aclose()
    assert events[-1].summary.failovers == 1
    calls = _session_calls(mesh)
    assert calls[2][3] == [3, 1] and calls[2][1] != calls[0][1]  # one replay request, on a new session
