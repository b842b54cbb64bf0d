"""Bounded steady load: N clients, each sending a fixed number of requests, every outcome recorded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.client import AsyncRouterClient
from services.errors import ShardmeshError


@dataclass(frozen=True)
class Op:
    """One request as the client saw it (invoke -> ok/fail), for the checker."""

    client: int
    index: int
    text: str
    started: float  # time.monotonic()
    finished: float
    ok: bool
    error: str = ""
    route: tuple[str, ...] = ()
    attempts: int = 1
    output: torch.Tensor | None = None

    @property
    def latency_ms(self) -> float:
        return 1000 * (self.finished - self.started)


class LoadGenerator:
    def __init__(
        self,
        router: str,
        texts: Sequence[str],
        *,
        clients: int = 4,
        requests_per_client: int = 40,
        mode: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.router = router
        self.texts = tuple(texts)
        self.clients = clients
        self.requests_per_client = requests_per_client
        self.mode = mode
        self.timeout_s = timeout_s
        self.history: list[Op] = []
        self.completed = 0
        self._progress = asyncio.Event()

    async def wait_completed(self, count: int, timeout_s: float) -> None:
        """Returns once ``count`` requests finished (used to inject a fault mid-load)."""
        deadline = time.monotonic() + timeout_s
        while self.completed < count:
            self._progress.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"only {self.completed} of {count} requests completed in {timeout_s}s")
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                pass

    async def _client(self, number: int) -> None:
        async with AsyncRouterClient(self.router) as client:
            for index in range(self.requests_per_client):
                text = self.texts[(number + index) % len(self.texts)]
                started = time.monotonic()
                try:
                    result = await client.infer(text=text, mode=self.mode, timeout_s=self.timeout_s)
                    op = Op(number, index, text, started, time.monotonic(), True, route=result.route,
                            attempts=result.attempts, output=result.output)
                except ShardmeshError as exc:
                    op = Op(number, index, text, started, time.monotonic(), False, error=f"{type(exc).__name__}: {exc}")
                self.history.append(op)
                self.completed += 1
                self._progress.set()

    async def run(self) -> list[Op]:
        await asyncio.gather(*(self._client(n) for n in range(self.clients)))
        return sorted(self.history, key=lambda op: op.started)
