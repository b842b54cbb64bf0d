"""Sharded generation: one session per request, pinned to one replica per stage, tokens streamed.

Each worker on the route keeps the session's KV cache for its layers, so after the prompt every step
sends one position's token (stage 0) or hidden state through the stages. The router keeps the
session's step log (the prompt, then each generated token). If a stage fails mid-generation, the
router picks a healthy route, opens a fresh session there (a new id, so no worker can mistake it for
the old one) and replays the same steps from position 0, which rebuilds every cache as it was (same
steps, same positions, checked by the workers; bit for bit with ``--no-batching``, within float rounding
with batching on, where a worker runs the steps as one chunk), then continues. A replay is one request per
stage (``ForwardRequest.replay_step_lengths``), so a failover costs one round trip per stage, not one per
token so far. The
sampler's state is never replayed, so seeded sampling yields the same tokens as a run without the failure.

In direct mode the router also logs what it sent each stage (the previous stage's outputs, within
STAGE_INPUT_BUDGET_BYTES per session), so when the other stages' workers are still routable only the
failed stage moves: a new replica of it gets those inputs in one replay request (same session id and key)
and the step continues from there; the healthy stages keep their caches and do no work
(router/planning/session_repair.py decides). Otherwise, and always in relay mode, every stage replays.

A worker that lost the session (restarted at the same address: NOT_FOUND) or refuses a step's
position gets the same replay (or its stage moves to another replica), without being counted as failed. Every failover or replay takes a
retry from the router's budget. Worker-side session ids carry the router's nonce and a per-request
number (never the bare client id), and each session has a random key that every step and the final
CloseSession carry, so only this router can step or close it.

Each step runs under the router's scheduler (``gate``, router/scheduling): with mlfq, priority and fair
every step waits for its own pipeline slot, so short requests pass long generations at token boundaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from services import tracing
from services.errors import FailedPrecondition, InvalidArgument, ShardmeshError, Unavailable
from services.gen.shardmesh.v1 import router_pb2, worker_pb2
from services.models.generation import SamplingParams, StopRule, next_token, sampling_generator, streamable_length
from services.telemetry import FAILOVERS
from router.peers import WorkerPool
from router.pipeline import Pipeline, unpack_trusted
from router.planning.hop_errors import is_lost_session, may_fail_over
from router.planning.route_wait import RouteWait
from router.planning.session_repair import stage_candidates
from router.planning.types import RoutePlan, WorkerInfo
from router.topology import Topology

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0
SESSION_KEY_BYTES = 16
DEFAULT_MAX_NEW_TOKENS = 32
# Per direct-mode session: the stage inputs kept so that a failed stage can be replayed alone (SmolLM2:
# 2.3 KiB per token per stage boundary, so about 3600 tokens with three stages); past it a failover
# replays every stage, as relay mode always does.
STAGE_INPUT_BUDGET_BYTES = 16 << 20
StepGate = Callable[[int], contextlib.AbstractAsyncContextManager[None]]


def _new_key() -> bytes:
    return secrets.token_bytes(SESSION_KEY_BYTES)


def last_step_output(out: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """The last step's part of a replay's output (the steps' outputs concatenated along the sequence).

    The last stage returns one position's logits per step, so the part is the last row; an output with
    every position (``sum(lengths)`` rows) gives the last step's ``lengths[-1]`` rows.
    """
    rows = int(out.shape[1])
    if rows == len(lengths):
        return out[:, -1:]
    if rows == sum(lengths):
        return out[:, -lengths[-1]:]
    raise FailedPrecondition(
        f"a replay of {len(lengths)} steps ({sum(lengths)} tokens) returned {rows} rows, not one per step or per"
        " token; is a worker on the route older than replay_step_lengths? upgrade it"
    )


@dataclass
class _Session:
    request_id: str  # the client's id (logs)
    worker_key: str  # namespaced by the router's nonce and this request's number (Pipeline.worker_key)
    relay: bool
    checksum: str
    route: list[WorkerInfo]
    epoch: int = 0
    secret: bytes = field(default_factory=_new_key)  # proves to workers that this router owns the session
    steps: list[list[int]] = field(default_factory=list)  # token ids fed at each step, in order
    position: int = 0
    failovers: int = 0
    failed: set[str] = field(default_factory=set)
    wait: RouteWait | None = None  # --route-wait-s: how long planning may still wait for coverage
    # Direct mode: the current step has run through stages [0, pending); ``carry`` is the next stage's input.
    pending: int = 0
    carry: torch.Tensor | None = None
    # Direct mode: every input stage i >= 1 was sent, one tensor per step (inputs[0] stays empty: stage 0's
    # are the token ids in ``steps``), so one failed stage can be replayed alone; None once over the budget.
    inputs: list[list[torch.Tensor]] | None = None
    input_bytes: int = 0

    @property
    def session_id(self) -> str:
        return f"{self.worker_key}#{self.epoch}"

    def next_epoch(self) -> None:
        """A fresh session (new id and key) for a replay; the old one is closed separately."""
        self.epoch += 1
        self.secret = _new_key()

    def begin_step(self, ids: list[int]) -> None:
        self.steps.append(ids)
        self.pending = 0
        self.carry = torch.tensor([ids], dtype=torch.int64)

    def keep_inputs(self, stage: int, parts: Sequence[torch.Tensor], *, replace: bool = False) -> None:
        """Logs what ``stage`` was sent (one tensor per step), within STAGE_INPUT_BUDGET_BYTES per session."""
        if self.inputs is None or stage == 0:
            return
        if replace:
            self.input_bytes -= sum(_nbytes(t) for t in self.inputs[stage])
            self.inputs[stage] = []
        self.inputs[stage].extend(parts)
        self.input_bytes += sum(_nbytes(t) for t in parts)
        if self.input_bytes > STAGE_INPUT_BUDGET_BYTES:
            self.inputs, self.input_bytes = None, 0  # too long to keep: a failure then replays every stage

    def all_ids(self) -> torch.Tensor:
        return torch.tensor([[token for step in self.steps for token in step]], dtype=torch.int64)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class GenerationService:
    def __init__(self, topology: Topology, pool: WorkerPool, pipeline: Pipeline, max_attempts: int) -> None:
        self._topology = topology
        self._pool = pool
        self._pipeline = pipeline
        self._max_attempts = max_attempts
        self.active_sessions = 0
        self._cleanups: set[asyncio.Task[None]] = set()  # CloseSession calls still running

    async def _pick_route(self, session: _Session) -> list[WorkerInfo]:
        """A replica per stage, planned exactly as Infer plans (ejection, panic, this session's failures,
        waiting for coverage under --route-wait-s)."""

        def plan_now() -> RoutePlan:
            return self._topology.plan(excluded=self._pipeline.excluded(session.failed, time.monotonic()),
                                       checksum=session.checksum)

        wait = session.wait or self._pipeline.route_wait(time.monotonic())
        plan = await self._pipeline.plan_waiting(plan_now, wait, session.failed)
        return [self._pipeline.choose(stage.replicas) for stage in plan.stages]

    async def generate(
        self,
        request: router_pb2.GenerateRequest,
        prompt_ids: list[int],
        tokenizer: Any,
        deadline: float,
        request_id: str,
        relay: bool,
        gate: StepGate | None = None,
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        """``gate(tokens so far)`` wraps each step: the router's scheduler (a slot per step) and priority."""
        if not prompt_ids:
            raise InvalidArgument("prompt: empty; send text or at least one token id")
        params = SamplingParams(
            temperature=request.temperature, top_p=request.top_p or 1.0, top_k=request.top_k, seed=request.seed
        )
        eos = set(request.stop_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        rule = StopRule(request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, frozenset(eos), tuple(request.stop_strings))
        wait = self._pipeline.route_wait(deadline)
        plan = await self._pipeline.plan_waiting(
            lambda: self._topology.plan(excluded=self._pipeline.excluded((), time.monotonic())), wait
        )
        session = _Session(request_id, self._pipeline.worker_key(request_id), relay, plan.checksum, [], wait=wait)
        session.route = await self._pick_route(session)
        session.inputs = None if relay else [[] for _ in session.route]
        generator = sampling_generator(params)
        started = time.monotonic()
        ttft_ms = 0.0
        generated: list[int] = []
        sent_chars = 0
        finish = "length"
        self.active_sessions += 1
        try:
            step_ids = list(prompt_ids)
            while True:
                async with gate(len(generated)) if gate is not None else contextlib.nullcontext():
                    with _step_span(session, len(generated), step_ids):  # tracing: NOOP when off
                        logits = await self._step(session, step_ids, deadline)
                token = next_token(logits.reshape(-1), params, generator)
                generated.append(token)
                if len(generated) == 1:
                    ttft_ms = 1000 * (time.monotonic() - started)
                text = tokenizer.decode(generated) if tokenizer is not None else ""
                reason = rule.reason(generated, text)
                visible = len(text) if reason == "length" else streamable_length(text, rule.stop_strings)
                if reason == "stop_string":
                    visible = streamable_length(text, rule.stop_strings)
                delta = text[sent_chars:visible] if visible > sent_chars else ""
                sent_chars = max(sent_chars, visible)
                yield router_pb2.GenerateEvent(
                    token=router_pb2.GeneratedToken(token_id=token, text=delta, index=len(generated) - 1)
                )
                if reason is not None:
                    finish = "stop" if reason != "length" else "length"
                    break
                step_ids = [token]
            elapsed = time.monotonic() - started
            final_text = tokenizer.decode(generated) if tokenizer is not None else ""
            summary = router_pb2.GenerateSummary(
                token_count=len(generated),
                ttft_ms=ttft_ms,
                tokens_per_s=len(generated) / elapsed if elapsed > 0 else 0.0,
                finish_reason=finish,
                text=final_text[: streamable_length(final_text, rule.stop_strings)] if rule.stop_strings else final_text,
                failovers=session.failovers,
            )
            summary.route.extend(w.worker_id for w in session.route)
            summary.token_ids.extend(generated)
            yield router_pb2.GenerateEvent(summary=summary)
        finally:
            self.active_sessions -= 1
            # Also on client disconnect (cancellation): free the caches on every worker of the route.
            await asyncio.shield(self._close_later(session.route, session.session_id, session.secret))

    async def _step(self, session: _Session, ids: list[int], deadline: float) -> torch.Tensor:
        """Runs one step through the session's route; on a hop failure or a lost session, replays (in direct
        mode only the failed stage when the others can keep their workers, else every stage)."""
        session.begin_step(ids)
        self._pipeline.record_request()
        attempts = 0
        replay: frozenset[int] = frozenset()  # stages new to the session: they get every step so far first
        while True:
            try:
                if session.relay:
                    return await (self._replay_relay(session, deadline) if replay else self._run_relay(session, deadline))
                return await self._run_direct(session, deadline, replay)
            except ShardmeshError as exc:
                lost = is_lost_session(exc)
                if not (lost or may_fail_over(exc)):
                    raise
                attempts += 1
                index = next((i for i, w in enumerate(session.route) if w.worker_id == exc.failed_worker_id), None)
                failed = session.route[index] if index is not None else session.route[0]
                if not lost:  # a worker that lost the session is healthy: replay there too
                    session.failed.add(failed.worker_id)
                    self._pipeline.record_hop_failure(failed, exc, request_deadline=deadline)
                if attempts >= self._max_attempts or time.monotonic() >= deadline:
                    raise
                if not self._pipeline.try_retry():
                    exc.message = f"{exc.message}; not replayed: the router's retry budget is spent, retry later"
                    raise
                replacement = self._replacement(session, index)
                if replacement is not None:  # only this stage replays; the others keep session and caches
                    assert index is not None
                    old_route, session.route = [failed], [*session.route]
                    session.route[index] = replacement
                    replay = frozenset({index})
                    close_id, close_secret = session.session_id, session.secret
                else:
                    old_route, close_id, close_secret = session.route, session.session_id, session.secret
                    try:
                        session.route = await self._pick_route(session)
                    except Unavailable as no_route:
                        # The hop's own error says what happened; the planner says why nothing else can serve.
                        exc.message = f"{exc.message}; {no_route.message}"
                        raise exc from None
                    session.next_epoch()
                    session.pending = 0
                    replay = frozenset(range(len(session.route)))
                session.failovers += 1
                FAILOVERS.labels(reason="generate-" + ("LostSession" if lost else type(exc).__name__)).inc()
                replayed = [session.route[i].worker_id for i in sorted(replay)]
                log.warning(
                    "session %s: hop %s failed at position %d (%s); replaying %d steps on %s",
                    session.request_id, failed.worker_id, session.position, exc, len(session.steps), replayed,
                )
                if tracing.enabled():  # on the step's span (router.step)
                    tracing.current().event("replay", {
                        "shardmesh.reason": "lost session" if lost else "failover",
                        "shardmesh.failed_worker_id": failed.worker_id, "shardmesh.error": str(exc),
                        "shardmesh.steps": len(session.steps), "shardmesh.position": session.position,
                        "shardmesh.route": [w.worker_id for w in session.route],
                        "shardmesh.replayed": replayed,
                    })
                # The old session may still live on workers that are alive (including the one that failed).
                self._close_later(old_route, close_id, close_secret)

    def _replacement(self, session: _Session, stage: int | None) -> WorkerInfo | None:
        """A new worker for the failed ``stage`` alone (direct mode, its inputs logged, every other stage's
        worker still one the planner would use); None when the whole route is re-planned and replayed."""
        if session.relay or stage is None or stage != session.pending or (stage > 0 and session.inputs is None):
            return None
        try:
            plan = self._topology.plan(excluded=self._pipeline.excluded(session.failed, time.monotonic()),
                                       checksum=session.checksum)
        except ShardmeshError:
            return None  # _pick_route waits for coverage (--route-wait-s) and says why nothing can serve
        candidates = stage_candidates(plan, session.route, stage)
        return self._pipeline.choose(candidates) if candidates else None

    async def _run_direct(self, session: _Session, deadline: float, replay: frozenset[int]) -> torch.Tensor:
        """The current step through stages ``session.pending`` onwards (the earlier ones already ran it).

        A stage in ``replay`` is new to the session: it first gets every earlier step, all in one request at
        position 0 with the steps' lengths (its inputs: the token ids for stage 0, the inputs the router logged
        for it, or the previous stage's whole output when that stage replayed too), and the steps it was sent
        replace its log. Returns the last stage's output for the current step."""
        lengths = [len(step) for step in session.steps]
        whole: torch.Tensor | None = None  # every step's input of the current stage, when the last one replayed
        while session.pending < len(session.route):
            index = session.pending
            if index in replay:
                if index == 0:
                    x = session.all_ids()
                elif whole is not None:
                    x = whole
                elif session.inputs is not None and session.carry is not None:
                    x = torch.cat([*session.inputs[index], session.carry], dim=1)
                else:
                    raise FailedPrecondition(
                        f"stage {index} cannot be replayed: stage {index - 1}'s replay did not return one row per token"
                        f" ({sum(lengths)}); is a worker on the route older than replay_step_lengths? upgrade it"
                    )
                if x.shape[1] != sum(lengths):
                    raise FailedPrecondition(
                        f"stage {index} cannot be replayed: its logged inputs have {x.shape[1]} rows for {sum(lengths)}"
                        " tokens; a worker on the route returned a hidden state that is not one row per token"
                    )
                out = await self._send(session, [session.route[index]], x, 0, deadline, lengths)
                session.keep_inputs(index, torch.split(x, lengths, dim=1), replace=True)
                whole = out if index + 1 in replay and out.shape[1] == sum(lengths) else None
                session.carry = last_step_output(out, lengths)
            else:
                assert session.carry is not None
                out = await self._send(session, [session.route[index]], session.carry, session.position, deadline)
                session.keep_inputs(index, [session.carry])
                session.carry, whole = out, None
            session.pending += 1
        session.position += lengths[-1]
        assert session.carry is not None
        return session.carry

    async def _replay_relay(self, session: _Session, deadline: float) -> torch.Tensor:
        """Rebuilds the new route's caches with the same steps at the same positions, all of them in one request
        (``replay_step_lengths``: each worker runs them one after another, as separate steps, and relays the
        whole output); returns the last step's logits, as that step alone would have returned them."""
        lengths = [len(step) for step in session.steps]
        out = await self._send(session, session.route, session.all_ids(), 0, deadline, lengths)
        session.position = sum(lengths)
        return last_step_output(out, lengths)

    async def _run_relay(self, session: _Session, deadline: float) -> torch.Tensor:
        """The current step (``session.carry``: its token ids, from begin_step) along the relay chain."""
        assert session.carry is not None
        out = await self._send(session, session.route, session.carry, session.position, deadline)
        session.position += int(session.carry.shape[1])
        return out

    async def _send(
        self, session: _Session, workers: Sequence[WorkerInfo], x: torch.Tensor, position: int, deadline: float,
        step_lengths: Sequence[int] = (),
    ) -> torch.Tensor:
        """One request of the session: to one stage (direct) or along the relay chain ``workers``."""
        response, _ = await self._pipeline._call(
            workers, f"{session.session_id}@{position}", x, None, session.checksum, deadline,
            (session.session_id, position), session.secret, replay_step_lengths=step_lengths,
        )
        return await unpack_trusted(response.output, "output")

    def _close_later(self, route: Sequence[WorkerInfo], session_id: str, secret: bytes) -> asyncio.Task[None]:
        """Closes the session on every worker of ``route`` in a task this service keeps until it ends."""
        task = asyncio.create_task(self._close(route, session_id, secret), name=f"close:{session_id}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def _close(self, route: Sequence[WorkerInfo], session_id: str, secret: bytes) -> None:
        async def close_one(worker: WorkerInfo) -> None:
            with contextlib.suppress(Exception):  # a dead worker's cache died with it; a live one's TTL is the backstop
                await self._pool.peer(worker.address).stub.CloseSession(
                    worker_pb2.CloseSessionRequest(session_id=session_id, session_key=secret), timeout=CLOSE_TIMEOUT_S
                )

        await asyncio.gather(*(close_one(w) for w in route))

    async def aclose(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Waits (bounded) for CloseSession calls still running, e.g. before the router exits."""
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=timeout_s)


def _step_span(session: _Session, index: int, ids: Sequence[int]) -> tracing.NoopSpan | tracing.Span:
    """The router's span for one generation step (its hops, and a replay's, are children), child of the
    Generate's span; NOOP when tracing is off or the request is not sampled."""
    if not tracing.enabled():
        return tracing.NOOP
    attributes = {"shardmesh.step": index, "shardmesh.position": session.position, "shardmesh.tokens": len(ids)}
    return tracing.span("router.step", attributes, require_parent=True)
