"""Python clients for the Router: :class:`AsyncRouterClient` and the blocking :class:`RouterClient`.

Used by the CLI, the benchmarks and the tests. Results come back as :class:`InferResult` with the
output as a torch tensor (a copy: safe to modify).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from services.errors import from_rpc_error
from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from services.net import TlsFiles, open_channel
from services.wire import codec

MODE_BY_NAME = {None: tensor_pb2.MODE_UNSPECIFIED, "direct": tensor_pb2.MODE_DIRECT, "relay": tensor_pb2.MODE_RELAY}
MODE_NAME = {tensor_pb2.MODE_DIRECT: "direct", tensor_pb2.MODE_RELAY: "relay", tensor_pb2.MODE_UNSPECIFIED: ""}


@dataclass(frozen=True)
class InferResult:
    output: torch.Tensor
    route: tuple[str, ...]
    mode: str
    hops_ms: tuple[float, ...]
    hops: tuple[tensor_pb2.HopRecord, ...]
    total_ms: float
    attempts: int

    @classmethod
    def from_proto(cls, reply: router_pb2.InferResponse) -> InferResult:
        return cls(
            output=codec.decode(reply.output, field="output", max_bytes=1 << 40).clone(),
            route=tuple(reply.route),
            mode=MODE_NAME.get(reply.mode, ""),
            hops_ms=tuple(h.hop_ms for h in reply.hops),
            hops=tuple(reply.hops),
            total_ms=reply.total_ms,
            attempts=reply.attempts,
        )

    def to_json(self) -> dict[str, object]:
        """The ``shardmesh infer --json`` object."""
        out = self.output
        if out.dim() > 1 and out.shape[0] == 1:
            out = out[0]
        return {
            "output": out.flatten().tolist() if out.dim() <= 1 else out.tolist(),
            "route": list(self.route),
            "mode": self.mode,
            "hops_ms": [round(h, 3) for h in self.hops_ms],
        }


def build_request(
    *,
    text: str | None = None,
    tokens: Sequence[int] | None = None,
    tensor: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mode: str | None = None,
    request_id: str | None = None,
) -> router_pb2.InferRequest:
    if sum(x is not None for x in (text, tokens, tensor)) != 1:
        raise ValueError("give exactly one of text, tokens, tensor")
    req = router_pb2.InferRequest(request_id=request_id or uuid.uuid4().hex, mode=MODE_BY_NAME[mode])  # type: ignore[arg-type]
    if text is not None:
        req.text = text
    elif tokens is not None:
        req.tokens.ids.extend(int(t) for t in tokens)
    else:
        codec.encode(tensor, req.tensor)  # type: ignore[arg-type]
        if attention_mask is not None:
            codec.encode(attention_mask, req.attention_mask)
    return req


TOKEN_ENV = "SHARDMESH_TOKEN"


def _router_error(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    err = from_rpc_error(exc, address=address)
    details = (exc.details() or "").lower()
    if exc.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details:
        err.message = f"cannot reach the router at {address} (is `shardmesh router` or `shardmesh up` running?): {err.message}"
    elif exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details:
        # gRPC refused the message from its length prefix; its text names bytes, not the flag.
        err.message = (
            f"{err.message}: the router accepts messages up to --max-tensor-mb (or --max-text-bytes) plus 1 MiB; "
            "send a smaller input"
        )
    return err


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer-token metadata a router with --auth-tokens-file expects (none without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class AsyncRouterClient:
    """One channel to a router; use as ``async with AsyncRouterClient(addr) as c: await c.infer(text=...)``."""

    def __init__(
        self,
        address: str,
        *,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token: str | None = None,
    ) -> None:
        """``token``: bearer token for a router with --auth-tokens-file; default $SHARDMESH_TOKEN ("" = none)."""
        tls = TlsFiles.from_flags(
            str(tls_cert) if tls_cert else None, str(tls_key) if tls_key else None, str(tls_ca) if tls_ca else None
        )
        tls = tls if tls.enabled else None
        self.address = address
        token = os.environ.get(TOKEN_ENV) if token is None else token
        self._channel = open_channel(address, tls, metadata=auth_metadata(token))
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    async def __aenter__(self) -> AsyncRouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._channel.channel_ready(), timeout_s)

    async def infer(self, *, timeout_s: float = 60.0, **kwargs: object) -> InferResult:
        """Raises a :class:`services.errors.ShardmeshError` subclass carrying the router's status."""
        try:
            reply = await self._stub.Infer(build_request(**kwargs), timeout=timeout_s)  # type: ignore[arg-type]
        except grpc.aio.AioRpcError as exc:
            raise _router_error(exc, self.address) from None
        return InferResult.from_proto(reply)

    async def infer_raw(self, request: router_pb2.InferRequest, timeout_s: float = 60.0) -> router_pb2.InferResponse:
        return await self._stub.Infer(request, timeout=timeout_s)

    async def topology(self, timeout_s: float = 5.0) -> router_pb2.TopologyResponse:
        return await self._stub.Topology(router_pb2.TopologyRequest(), timeout=timeout_s)

    async def generate_stream(
        self, request: router_pb2.GenerateRequest, timeout_s: float = 300.0
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        """Yields each token event as it arrives, then the summary event."""
        call = self._stub.Generate(request, timeout=timeout_s)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise _router_error(exc, self.address) from None
        finally:
            call.cancel()  # no-op when finished; frees the session at once if the caller stopped early

    async def generate(self, timeout_s: float = 300.0, **kwargs: Any) -> GenerateResult:
        """Runs a whole generation; see :func:`build_generate_request` for the arguments."""
        tokens: list[int] = []
        summary = None
        async for event in self.generate_stream(build_generate_request(**kwargs), timeout_s):
            if event.HasField("token"):
                tokens.append(event.token.token_id)
            else:
                summary = event.summary
        assert summary is not None, "the router ended the stream without a summary"
        return GenerateResult.from_proto(summary)


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: tuple[int, ...]
    ttft_ms: float
    tokens_per_s: float
    route: tuple[str, ...]
    finish_reason: str
    failovers: int

    @classmethod
    def from_proto(cls, s: router_pb2.GenerateSummary) -> GenerateResult:
        return cls(s.text, tuple(s.token_ids), s.ttft_ms, s.tokens_per_s, tuple(s.route), s.finish_reason, s.failovers)

    def to_json(self) -> dict[str, object]:
        """The ``shardmesh generate --json`` object."""
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "ttft_ms": round(self.ttft_ms, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "route": list(self.route),
        }


def build_generate_request(
    *,
    text: str | None = None,
    tokens: Sequence[int] | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    mode: str | None = None,
    request_id: str | None = None,
) -> router_pb2.GenerateRequest:
    if (text is None) == (tokens is None):
        raise ValueError("give exactly one of text, tokens")
    req = router_pb2.GenerateRequest(
        request_id=request_id or uuid.uuid4().hex,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        mode=MODE_BY_NAME[mode],  # type: ignore[arg-type]
    )
    if text is not None:
        req.text = text
    else:
        req.tokens.ids.extend(int(t) for t in tokens)  # type: ignore[union-attr]
    req.stop_token_ids.extend(stop_token_ids)
    req.stop_strings.extend(stop_strings)
    return req


class RouterClient:
    """Blocking client for scripts: each call runs on a private event loop."""

    def __init__(self, address: str, **options: str | Path | None) -> None:
        """``options``: ``tls_ca``, ``tls_cert``, ``tls_key``, ``token`` as for :class:`AsyncRouterClient`."""
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(self._make(address, options))

    @staticmethod
    async def _make(address: str, options: dict[str, str | Path | None]) -> AsyncRouterClient:
        return AsyncRouterClient(address, **options)  # type: ignore[arg-type]

    def infer(self, *, timeout_s: float = 60.0, **kwargs: object) -> InferResult:
        return self._loop.run_until_complete(self._client.infer(timeout_s=timeout_s, **kwargs))

    def topology(self, timeout_s: float = 5.0) -> router_pb2.TopologyResponse:
        return self._loop.run_until_complete(self._client.topology(timeout_s))

    def generate(self, timeout_s: float = 300.0, **kwargs: Any) -> GenerateResult:
        return self._loop.run_until_complete(self._client.generate(timeout_s, **kwargs))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
