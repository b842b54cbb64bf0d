"""Infer requests as coalesced batches (``--coalesce``): which requests may share one, how one is built and split.

:mod:`router.coalescing` decides when requests travel together; this module makes one pipeline request of a
group (token ids and masks stacked along the batch dimension) and gives each member its own row of the output.
Only one-row, inline inputs coalesce; anything else (a client's own batch, a tensor too large to be inline)
goes alone as before.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

import torch
from prometheus_client import Counter

from services.gen.shardmesh.v1 import tensor_pb2
from services.logging_json import request_scope
from services.wire import codec
from router.coalescing import Coalescer
from router.pipeline import Pipeline, PipelineResult
from router.scheduling import hop_priority

_TRUSTED = 1 << 40  # inputs were checked by router/inputs.py, outputs come from planned workers
GROUPED = Counter("shardmesh_router_coalesced_requests_total", "Infer requests sent in a coalesced batch (--coalesce)")
BATCHES = Counter("shardmesh_router_coalesced_batches_total", "Coalesced batches of two or more Infer requests sent")


@dataclass(frozen=True)
class InferItem:
    request_id: str
    ids: tensor_pb2.Tensor
    mask: tensor_pb2.Tensor | None
    deadline: float
    relay: bool
    priority: int


def batch_key(item: InferItem) -> Hashable | None:
    """Requests with equal keys can be stacked into one batch; None: this one goes alone."""
    if item.ids.shm_handle or len(item.ids.shape) != 2 or item.ids.shape[0] != 1:
        return None
    mask = None if item.mask is None else (item.mask.dtype, tuple(item.mask.shape))
    if item.mask is not None and (item.mask.shm_handle or tuple(item.mask.shape) != tuple(item.ids.shape)):
        return None
    return (item.relay, item.priority, item.ids.dtype, tuple(item.ids.shape), mask)


def stack(items: list[InferItem]) -> tuple[tensor_pb2.Tensor, tensor_pb2.Tensor | None]:
    """One input of len(items) rows: each item's ids (and mask) as a row, in order."""
    ids = torch.cat([codec.decode(i.ids, field="tensor", max_bytes=_TRUSTED) for i in items])
    if items[0].mask is None:
        return codec.encode(ids), None
    mask = torch.cat([codec.decode(i.mask, field="attention_mask", max_bytes=_TRUSTED) for i in items])  # type: ignore[arg-type]
    return codec.encode(ids), codec.encode(mask)


def split(result: PipelineResult, rows: int) -> list[PipelineResult]:
    """Each member's row of a batch's output, with the batch's route, hops and attempts.

    A hop's ``batch_size`` (requests in its forward) counts the batch's ``rows`` requests where the worker
    counted one: exact when the worker ran this batch alone or with single requests, a lower bound when it
    also merged other coalesced batches into the forward (each of those still counts one)."""
    output = result.output if result.output_wire is None else codec.decode(result.output_wire, field="output", max_bytes=_TRUSTED)
    if output.shape[0] != rows:
        raise RuntimeError(f"a coalesced batch of {rows} requests came back with {output.shape[0]} rows")
    hops = []
    for hop in result.hops:
        counted = tensor_pb2.HopRecord()
        counted.CopyFrom(hop)
        counted.batch_size = max(hop.batch_size, 1) - 1 + rows
        hops.append(counted)
    return [replace(result, output=output[i : i + 1], hops=hops, output_wire=None) for i in range(rows)]


class InferBatcher:
    """Sends Infer requests through the pipeline, coalesced into batches of up to ``max_rows`` when they wait
    (``max_rows`` 0: --coalesce off, every request goes alone)."""

    def __init__(self, pipeline: Pipeline, *, max_rows: int, depth: int, stages: Callable[[], int]) -> None:
        self._pipeline = pipeline
        self.coalescer: Coalescer[InferItem, PipelineResult] | None = (
            Coalescer(
                self._run, max_rows=max_rows, depth=(lambda: depth) if depth > 0 else (lambda: stages() + 1),
                on_batch=self._count,
            )
            if max_rows
            else None
        )

    async def run(self, item: InferItem) -> PipelineResult:
        key = batch_key(item) if self.coalescer is not None else None
        if key is None or self.coalescer is None:
            return await self._run_one(item)
        return await self.coalescer.submit(key, item, item.deadline)

    async def _run_one(self, item: InferItem) -> PipelineResult:
        with hop_priority(item.priority):
            return await self._pipeline.run(item.request_id, item.ids, item.mask, item.deadline, relay=item.relay)

    async def _run(self, items: list[InferItem]) -> list[PipelineResult]:
        if len(items) == 1:
            return [await self._run_one(items[0])]
        ids, mask = stack(items)
        group_id = f"{items[0].request_id}+{len(items) - 1}"
        with request_scope(group_id), hop_priority(items[0].priority):
            result = await self._pipeline.run(group_id, ids, mask, max(i.deadline for i in items), relay=items[0].relay)
        return split(result, len(items))

    @staticmethod
    def _count(size: int) -> None:
        BATCHES.inc()
        GROUPED.inc(size)
