"""Turns an InferRequest into token ids and a mask (tokenising text with the model's tokenizer).

Every input is bounded before work is spent on it: text by ``--max-text-bytes`` (checked by the
servicer, before the request is admitted), token counts by the model's ``max_position_embeddings``
(or, when the router cannot load the model, by ``--max-tensor-mb``). Text is tokenised in a worker
thread: a long text tokenised on the event loop would stall every other request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import torch

from services.errors import InvalidArgument
from services.gen.shardmesh.v1 import router_pb2, tensor_pb2
from services.wire import codec

_ID_DTYPES = (torch.int64, torch.int32)
_ID_BYTES = 8  # token ids become int64
# Texts up to this many characters are tokenised at once (tens of microseconds); longer ones in a thread,
# so a long text never stalls the event loop (measured: 8 MB took 5.6 s on the loop).
INLINE_TEXT_CHARS = 2048


class TokenizerCache:
    """Loads each model's tokenizer once, on first use (the router may start before any worker)."""

    def __init__(self, load: Callable[[str], Any]) -> None:
        self._load = load
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def loaded(self, model: str) -> Any | None:
        """The tokenizer if it is already loaded, else None; never loads (safe on the event loop)."""
        return self._cache.get(model)

    def get(self, model: str) -> Any:
        with self._lock:
            tok = self._cache.get(model)
            if tok is None:
                tok = self._cache[model] = self._load(model)
            return tok


def check_text_size(text: str, max_text_bytes: int, field: str = "text") -> None:
    """INVALID_ARGUMENT naming ``--max-text-bytes`` for a text too long to tokenise."""
    if len(text) * 4 <= max_text_bytes:  # UTF-8 needs at most 4 bytes a character
        return
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > max_text_bytes:
        raise InvalidArgument(
            f"{field}: {size} bytes exceed the router's limit of {max_text_bytes} bytes (--max-text-bytes); "
            "send a shorter text"
        )


def check_token_count(count: int, max_positions: int | None, max_tensor_bytes: int, field: str) -> None:
    if max_positions is not None and count > max_positions:
        raise InvalidArgument(
            f"{field}: {count} tokens exceed the model's maximum of {max_positions} (max_position_embeddings); "
            "shorten the input"
        )
    if count * _ID_BYTES > max_tensor_bytes:
        raise InvalidArgument(
            f"{field}: {count} token ids exceed the router's limit of {max_tensor_bytes // _ID_BYTES} "
            f"(--max-tensor-mb {max_tensor_bytes / 2**20:g} of int64 ids); shorten the input"
        )


def _max_positions(tokenizer: Callable[[], Any]) -> int | None:
    """The model's position limit, or None when this router cannot load the model (the worker still checks)."""
    try:
        return getattr(tokenizer(), "max_positions", None)
    except Exception:  # noqa: BLE001 - no tokenizer here (no files, no worker yet): the worker's check remains
        return None


async def _position_limit(tokenizer: Callable[[], Any], loaded: Callable[[], Any | None]) -> int | None:
    """The model's position limit: from the loaded tokenizer at once, else loaded in a thread (first use).
    Every tensor or token-id request asks, so the common case must not cost an executor hand-off."""
    tok = loaded()
    if tok is not None:
        return getattr(tok, "max_positions", None)
    return await asyncio.to_thread(_max_positions, tokenizer)


def _encode_text(text: str, tokenizer: Callable[[], Any]) -> tuple[list[int], list[int]]:
    tok = tokenizer()
    limit = getattr(tok, "max_positions", None)
    if limit is None:
        return tok.encode(text)  # type: ignore[no-any-return]
    ids, mask = tok.encode(text, max_tokens=limit + 1)  # one past the limit tells "too long"
    if len(ids) > limit:
        raise InvalidArgument(
            f"text: more than the model's maximum of {limit} tokens (max_position_embeddings); shorten the text"
        )
    return ids, mask


async def encode_text(text: str, tokenizer: Callable[[], Any]) -> tuple[list[int], list[int]]:
    """Token ids and mask of ``text`` (an Infer input or a Generate prompt), refused past the model's
    maximum; long texts are tokenised in a worker thread so the event loop keeps serving."""
    if len(text) <= INLINE_TEXT_CHARS:
        return _encode_text(text, tokenizer)
    return await asyncio.to_thread(_encode_text, text, tokenizer)


def resolve_mode(mode: int, default: int) -> int:
    """The request's activation path; 0 means the router's default. An unknown value is refused rather
    than served and echoed back (a client sending a newer enum would otherwise not learn it was ignored)."""
    if mode == tensor_pb2.MODE_UNSPECIFIED:
        return default
    if mode not in (tensor_pb2.MODE_DIRECT, tensor_pb2.MODE_RELAY):
        raise InvalidArgument(
            f"mode: {mode} is not a Mode; use MODE_DIRECT (1), MODE_RELAY (2) or 0 for the router's default"
        )
    return mode


def _refuse_chunk_fields(msg: tensor_pb2.Tensor, field: str) -> None:
    """Chunk fields belong to the mesh's internal streams; a client tensor is always one whole message."""
    if msg.chunk_count or msg.chunk_index:
        raise InvalidArgument(
            f"{field}: chunk_count/chunk_index are for the mesh's internal streams; send the whole tensor in "
            "one message with both unset"
        )


async def request_inputs(
    request: router_pb2.InferRequest,
    tokenizer: Callable[[], Any],
    max_tensor_bytes: int,
    loaded: Callable[[], Any | None] = lambda: None,
) -> tuple[tensor_pb2.Tensor, tensor_pb2.Tensor | None]:
    """Returns (ids, mask) as wire tensors; long texts are tokenised in a worker thread.

    ``tokenizer`` returns the model's tokenizer, loading it if need be; ``loaded`` returns it only if it is
    already loaded (else None), so that the per-request position check stays on the event loop."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input: missing; set one of text, tokens or tensor")
    if kind != "tensor" and request.HasField("attention_mask"):
        raise InvalidArgument(
            f"attention_mask: only accepted with `tensor` input; with `{kind}` the router makes the mask itself "
            "(drop attention_mask, or send ids as `tensor`)"
        )
    if kind == "text":
        if not request.text.strip():
            raise InvalidArgument("text: empty; send at least one non-blank character")
        ids, mask = await encode_text(request.text, tokenizer)
        return codec.encode(torch.tensor([ids], dtype=torch.int64)), codec.encode(torch.tensor([mask], dtype=torch.int64))
    if kind == "tokens":
        count = len(request.tokens.ids)
        if not count:
            raise InvalidArgument("tokens: empty; send at least one token id")
        check_token_count(count, await _position_limit(tokenizer, loaded), max_tensor_bytes, "tokens")
        return codec.encode(torch.tensor([list(request.tokens.ids)], dtype=torch.int64)), None
    _refuse_chunk_fields(request.tensor, "tensor")
    ids_t = codec.decode(request.tensor, field="tensor", max_bytes=max_tensor_bytes, expect_dtype=_ID_DTYPES, expect_rank=(2,))
    if ids_t.numel() == 0:
        raise InvalidArgument(f"tensor: empty token ids (shape {list(ids_t.shape)})")
    check_token_count(ids_t.shape[1], await _position_limit(tokenizer, loaded), max_tensor_bytes, "tensor")
    mask = None
    if request.HasField("attention_mask"):
        _refuse_chunk_fields(request.attention_mask, "attention_mask")
        mask_t = codec.decode(request.attention_mask, field="attention_mask", max_bytes=max_tensor_bytes, expect_rank=(2,))
        if tuple(mask_t.shape) != tuple(ids_t.shape):
            raise InvalidArgument(
                f"attention_mask: shape {list(mask_t.shape)} does not match tensor's {list(ids_t.shape)}"
            )
        if mask_t.is_floating_point() or mask_t.is_complex() or bool(((mask_t != 0) & (mask_t != 1)).any()):
            raise InvalidArgument(
                "attention_mask: values must be 0 (padding) or 1 (token) in an integer or bool tensor"
            )
        mask = request.attention_mask
    return request.tensor, mask
