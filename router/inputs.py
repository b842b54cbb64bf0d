"""Turns an InferRequest into token ids and a mask (tokenising text with the model's tokenizer)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from services.errors import InvalidArgument
from services.gen.shardmesh.v1 import router_pb2, tensor_pb2
from services.wire import codec

_ID_DTYPES = (torch.int64, torch.int32)


class TokenizerCache:
    """Loads each model's tokenizer once, on first use (the router may start before any worker)."""

    def __init__(self, load: Callable[[str], Any]) -> None:
        self._load = load
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Any:
        with self._lock:
            tok = self._cache.get(model)
            if tok is None:
                tok = self._cache[model] = self._load(model)
            return tok


def request_inputs(
    request: router_pb2.InferRequest, tokenizer: Callable[[], Any], max_tensor_bytes: int
) -> tuple[tensor_pb2.Tensor, tensor_pb2.Tensor | None]:
    """Returns (ids, mask) as wire tensors; ``tokenizer`` is called only for text input."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input: missing; set one of text, tokens or tensor")
    if kind == "text":
        if not request.text.strip():
            raise InvalidArgument("text: empty; send at least one non-blank character")
        ids, mask = tokenizer().encode(request.text)
        return codec.encode(torch.tensor([ids], dtype=torch.int64)), codec.encode(torch.tensor([mask], dtype=torch.int64))
    if kind == "tokens":
        if not request.tokens.ids:
            raise InvalidArgument("tokens: empty; send at least one token id")
        return codec.encode(torch.tensor([list(request.tokens.ids)], dtype=torch.int64)), None
    ids_t = codec.decode(request.tensor, field="tensor", max_bytes=max_tensor_bytes, expect_dtype=_ID_DTYPES, expect_rank=(2,))
    if ids_t.numel() == 0:
        raise InvalidArgument(f"tensor: empty token ids (shape {list(ids_t.shape)})")
    mask = None
    if request.HasField("attention_mask"):
        mask_t = codec.decode(request.attention_mask, field="attention_mask", max_bytes=max_tensor_bytes, expect_rank=(2,))
        if tuple(mask_t.shape) != tuple(ids_t.shape):
            raise InvalidArgument(
                f"attention_mask: shape {list(mask_t.shape)} does not match tensor's {list(ids_t.shape)}"
            )
        mask = request.attention_mask
    return request.tensor, mask
