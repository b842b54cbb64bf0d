"""Load for a chaos run: closed loop (N clients, each sends when its last request ended) or a fixed rate
(open loop, at most ``clients`` outstanding), a seeded mix of infer and generate, bounded in count and
time. Every request is recorded as an ``invoke`` event and then exactly one ``ok`` or ``fail``."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import grpc

from services.chaos.history import Event, History, tensor_digest, tokens_digest
from services.chaos.references import Oracle
from services.chaos.scenario import LoadPlan
from services.client import AsyncRouterClient, build_generate_request
from services.errors import ShardmeshError, status_of

DRAIN_MARGIN_S = 5.0  # after the last request was issued: its own timeout plus this, then it counts as lost


@dataclass(frozen=True)
class OpPlan:
    number: int
    kind: str  # infer | generate
    key: str


def plan_op(number: int, load: LoadPlan, keys: list[str]) -> OpPlan:
    """Deterministic per op number, so a rerun of a scenario sends the same requests in the same order."""
    rng = random.Random(load.seed * 1_000_003 + number)
    kind = "generate" if rng.random() < load.generate_share else "infer"
    return OpPlan(number, kind, keys[number % len(keys)])


def _status(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name, exc.details() or ""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "DEADLINE_EXCEEDED", "client-side timeout"
    if isinstance(exc, ShardmeshError):
        code, message = status_of(exc)
        return code.name, message
    return "CLIENT_ERROR", f"{type(exc).__name__}: {exc}"


class LoadDriver:
    def __init__(self, router: str, load: LoadPlan, oracle: Oracle, history: History) -> None:
        self.router = router
        self.load = load
        self.oracle = oracle
        self.history = history
        self._next = 0
        self.outstanding = 0

    async def run_op(self, client: AsyncRouterClient, plan: OpPlan, client_no: int) -> None:
        rid = f"c{client_no}-op{plan.number}"
        h = self.history
        h.add(Event("invoke", h.now(), plan.kind, rid, client_no, plan.key))
        self.outstanding += 1
        try:
            if plan.kind == "infer":
                await self._infer(client, plan, rid, client_no)
            else:
                await self._generate(client, plan, rid, client_no)
        except Exception as exc:  # noqa: BLE001 - every outcome is recorded, the checker judges it
            status, message = _status(exc)
            h.add(Event("fail", h.now(), plan.kind, rid, client_no, plan.key, status=status, message=message[:300]))
        finally:
            self.outstanding -= 1

    def _input(self, key: str) -> dict[str, object]:
        return {"text": self.oracle.texts[key]} if self.oracle.texts else {"tokens": list(self.oracle.tokens[key])}

    async def _infer(self, client: AsyncRouterClient, plan: OpPlan, rid: str, client_no: int) -> None:
        result = await client.infer(timeout_s=self.load.timeout_s, request_id=rid, **self._input(plan.key))
        output = result.output
        shape = self.oracle.infer_shape.get(plan.key)
        if shape is not None and output.numel() == _numel(shape):
            output = output.reshape(shape)
        h = self.history
        h.add(Event("ok", h.now(), "infer", rid, client_no, plan.key, route=tuple(result.route),
                    attempts=int(result.attempts or 1), digest=tensor_digest(output)))

    async def _generate(self, client: AsyncRouterClient, plan: OpPlan, rid: str, client_no: int) -> None:
        request = build_generate_request(
            tokens=list(self.oracle.tokens[plan.key]), max_new_tokens=self.load.max_new_tokens, request_id=rid
        )
        tokens: list[int] = []
        indices: list[int] = []
        summary = None
        async for event in client.generate_stream(request, self.load.timeout_s):
            if event.HasField("token"):
                tokens.append(int(event.token.token_id))
                indices.append(int(event.token.index))
            else:
                summary = event.summary
        h = self.history
        if summary is None:
            h.add(Event("fail", h.now(), "generate", rid, client_no, plan.key, status="NO_SUMMARY",
                        message="the stream ended without a summary", tokens=tuple(tokens), indices=tuple(indices)))
            return
        h.add(Event("ok", h.now(), "generate", rid, client_no, plan.key, route=tuple(summary.route),
                    attempts=1 + int(summary.failovers), digest=tokens_digest(tokens), tokens=tuple(tokens),
                    indices=tuple(indices), summary_tokens=tuple(int(t) for t in summary.token_ids)))

    def _take(self, deadline: float) -> int | None:
        if self._next >= self.load.requests or time.monotonic() >= deadline:
            return None
        self._next += 1
        return self._next - 1

    async def run(self) -> int:
        """Issues the load; returns how many requests were sent. Requests still open after their timeout plus
        a margin are abandoned here (they show up as invokes without an end: lost)."""
        keys = self.oracle.keys
        deadline = time.monotonic() + self.load.duration_s
        tasks: set[asyncio.Task[None]] = set()
        async with AsyncRouterClient(self.router) as client:
            if self.load.rate > 0:
                slots = asyncio.Semaphore(self.load.clients)
                interval = 1.0 / self.load.rate
                next_at = time.monotonic()
                while (number := self._take(deadline)) is not None:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at += interval
                    await slots.acquire()
                    task = asyncio.create_task(self.run_op(client, plan_op(number, self.load, keys), number % self.load.clients))
                    task.add_done_callback(lambda _t: slots.release())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            else:
                async def closed_loop(client_no: int) -> None:
                    while (number := self._take(deadline)) is not None:
                        await self.run_op(client, plan_op(number, self.load, keys), client_no)

                tasks = {asyncio.create_task(closed_loop(c)) for c in range(self.load.clients)}
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self.load.duration_s + self.load.timeout_s + DRAIN_MARGIN_S)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        return self._next


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
