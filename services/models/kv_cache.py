"""Per-session KV caches of one stage, under a byte budget and an idle TTL.

A worker keeps one :class:`SessionCache` per generation session for its own layer range. Every step
names the position it starts at; a step whose position is not the cache's length is refused with both
numbers (Petals #587: a replacement server silently started at position 0). The router answers such a
refusal by replaying the session's tokens from position 0 on a fresh session.

Pure: time is passed in (``now``, seconds on any monotonic clock), bytes are measured from the cached
tensors themselves, and nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from services.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.models.prefix_cache import PrefixBlock, PrefixCache, block_digests, make_blocks

MIB = 1 << 20


@dataclass(eq=False)
class SessionCache:
    """One session's cache for one stage: transformers' ``DynamicCache`` (local layer indices) + its length."""

    session_id: str
    ttl_s: float = 300.0
    expires_at: float = float("inf")
    cache: DynamicCache = field(default_factory=DynamicCache)
    position: int = 0  # tokens held = the position the next step must start at
    owner: bytes = b""  # sha256 of the session key it was opened with; b"" = opened without one

    def check_owner(self, key: bytes) -> None:
        """Only the caller that opened the session (it holds the key) may step or close it."""
        if not hmac.compare_digest(self.owner, owner_digest(key)):
            raise PermissionDenied(
                f"session {self.session_id!r} belongs to another caller: the session key does not match the "
                "one it was opened with"
            )

    def check_position(self, position: int) -> None:
        """Refuses a step that does not continue exactly where the cache ends."""
        if position != self.position:
            raise FailedPrecondition(
                f"session {self.session_id!r}: step starts at position {position} but the cache holds "
                f"{self.position} tokens; replay the session from position 0 on a new session"
            )

    def advance(self, tokens: int) -> None:
        self.position += tokens

    def rollback(self, position: int) -> None:
        """Drops whatever a failed step appended (to some layers or all), so every layer holds ``position`` tokens."""
        for layer in self.cache.layers:
            kv = _layer_kv(layer)
            if kv is not None and kv[0].shape[-2] > position:
                dynamic = cast(DynamicLayer, layer)  # the only kind with 4-D keys that a stage cache holds
                dynamic.keys = kv[0][..., :position, :].clone()  # clone: a view keeps the longer storage alive
                dynamic.values = kv[1][..., :position, :].clone()
        self.position = position

    def restore(self, layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fills an empty session with ``layer_kv`` (per local layer, e.g. prefix-cache blocks it copied)."""
        if self.position != 0:
            raise FailedPrecondition(f"session {self.session_id!r}: only an empty session takes a cached prefix")
        for layer, (keys, values) in enumerate(layer_kv):
            self.cache.update(keys, values, layer)
        self.position = int(layer_kv[0][0].shape[-2]) if layer_kv else 0

    def layer_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values ``[1, kv_heads, position, head_dim]`` of each layer that holds any."""
        return [kv for layer in self.cache.layers if (kv := _layer_kv(layer)) is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value tensors (their storage, so a cropped view counts in full)."""
        return sum(_storage_bytes(k) + _storage_bytes(v) for k, v in self.layer_kv())


class SessionCacheStore:
    """The sessions of one stage; refuses new sessions or growth beyond ``budget_bytes``.

    ``bytes_per_token`` (keys + values of all this stage's layers for one token) sizes the admission
    checks before a step runs; what is used is always measured from the tensors.

    ``prefix``: the stage's prefix cache (or None). Its blocks share the budget with the sessions but
    are evicted, least recently used first, before a session is refused.
    """

    def __init__(self, budget_bytes: int, bytes_per_token: int, prefix: PrefixCache | None = None) -> None:
        if budget_bytes <= 0 or bytes_per_token <= 0:
            raise InvalidArgument(f"need a positive budget and bytes per token; got {budget_bytes}, {bytes_per_token}")
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self.prefix = prefix
        self._sessions: dict[str, SessionCache] = {}
        self._lock = threading.Lock()  # steps run in worker threads; open/close/expire on the event loop

    @property
    def count(self) -> int:
        return len(self._sessions)

    @property
    def bytes_used(self) -> int:
        """Sessions' caches plus cached prefix blocks (what Describe reports as cache_used_bytes)."""
        with self._lock:
            return self._sessions_bytes() + self._prefix_bytes()

    @property
    def prefix_bytes(self) -> int:
        with self._lock:
            return self._prefix_bytes()

    def prefix_match(self, x: torch.Tensor) -> tuple[list[bytes], list[PrefixBlock]]:
        """The digests of ``x``'s full blocks and the cached blocks it starts with (none without a prefix cache)."""
        if self.prefix is None:
            return [], []
        digests = block_digests(x, self.prefix.block_tokens)  # hashing outside the lock
        with self._lock:
            return digests, self.prefix.match(x, digests)

    def prefix_insert(
        self, x: torch.Tensor, digests: list[bytes], session: SessionCache, output: torch.Tensor | None
    ) -> int:
        """Caches the full blocks of a prompt just prefilled into ``session`` that are not cached yet, if the
        budget has room once older blocks are evicted (sessions are never refused for it); returns blocks added."""
        prefix = self.prefix
        if prefix is None or not digests:
            return 0
        with self._lock:
            missing = prefix.missing(digests)
        if not missing:
            return 0
        blocks = make_blocks(x, digests, missing, session.layer_kv(), output, prefix.block_tokens)
        needed = sum(b.nbytes for b in blocks)
        with self._lock:
            sessions = self._sessions_bytes()
            if sessions + needed > self.budget_bytes:
                return 0  # live sessions fill the budget: cache nothing rather than refuse them later
            over = sessions + prefix.nbytes + needed - self.budget_bytes
            if over > 0:
                prefix.evict(over)
            for block in blocks:
                prefix.insert(block)
        return len(blocks)

    def open(
        self, session_id: str, ttl_s: float, now: float, *, reserve_tokens: int = 1, key: bytes = b""
    ) -> SessionCache:
        """Starts an empty session owned by ``key`` (see :meth:`SessionCache.check_owner`). Re-opening an
        empty one with the same key is a no-op, so a retried open is harmless."""
        if ttl_s <= 0:
            raise InvalidArgument(f"session ttl must be positive; got {ttl_s}")
        with self._lock:
            existing = self._sessions.get(session_id)
            if existing is not None:
                existing.check_owner(key)
                if existing.position != 0:
                    raise FailedPrecondition(
                        f"session {session_id!r} is already open at position {existing.position}; close it first"
                    )
                existing.ttl_s, existing.expires_at = ttl_s, now + ttl_s
                return existing
            self._admit(reserve_tokens, f"a new session of {reserve_tokens} tokens")
            session = SessionCache(session_id, ttl_s=ttl_s, expires_at=now + ttl_s, owner=owner_digest(key))
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str, now: float) -> SessionCache:
        """The live session (its idle timer restarts); NotFound once closed or expired."""
        with self._lock:
            return self._live(session_id, now)

    def prepare_step(
        self, session_id: str, position: int, new_tokens: int, now: float, *, key: bytes = b""
    ) -> SessionCache:
        """Everything a step checks before it runs: the session exists, its owner, the position, room for the growth."""
        with self._lock:
            session = self._live(session_id, now)
            session.check_owner(key)
            session.check_position(position)
            self._admit(new_tokens, f"session {session_id!r} growing by {new_tokens} tokens")
            return session

    def close(self, session_id: str, key: bytes = b"") -> bool:
        """Frees the session's tensors; False if it was not open (closing twice is not an error).
        PermissionDenied if ``key`` is not the one the session was opened with."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return False
            session.check_owner(key)
            del self._sessions[session_id]
            return True

    def expire(self, now: float) -> list[str]:
        """Drops sessions idle past their TTL and returns their ids (call it periodically)."""
        with self._lock:
            expired = [sid for sid, s in self._sessions.items() if s.expires_at <= now]
            for sid in expired:
                del self._sessions[sid]
            return expired

    def __iter__(self) -> Iterator[SessionCache]:
        with self._lock:
            return iter(list(self._sessions.values()))

    def _live(self, session_id: str, now: float) -> SessionCache:
        session = self._sessions.get(session_id)
        if session is not None and session.expires_at <= now:
            del self._sessions[session_id]
            raise NotFound(f"session {session_id!r} expired after {session.ttl_s:g} s idle; open a new session")
        if session is None:
            raise NotFound(f"unknown session {session_id!r} (never opened, closed, or expired); open a new session")
        session.expires_at = now + session.ttl_s
        return session

    def _sessions_bytes(self) -> int:
        return sum(s.nbytes for s in self._sessions.values())

    def _prefix_bytes(self) -> int:
        return self.prefix.nbytes if self.prefix is not None else 0

    def _admit(self, tokens: int, what: str) -> None:
        used = self._sessions_bytes()
        needed = tokens * self.bytes_per_token
        over = used + self._prefix_bytes() + needed - self.budget_bytes
        if over > 0 and self.prefix is not None:
            self.prefix.evict(over)  # cached prefixes go first (least recently used), sessions last
        if used + needed > self.budget_bytes:
            raise ResourceExhausted(
                f"cache budget {_mib(self.budget_bytes)} full: {len(self._sessions)} sessions use {_mib(used)}; "
                f"{what} needs {_mib(needed)} more; retry later, on another replica, or raise --cache-budget-mb"
            )


class LeftPaddedBatchCache:
    """Decode-step adapter that lets transformers' attention run several sessions' caches as one batch.

    Quacks like a ``Cache`` for ``LlamaAttention``: ``update`` appends row ``i``'s new key/value to session
    ``i``'s own ``DynamicCache`` (so each cache ends exactly as after a solo step) and returns all rows
    left-padded with zeros to one length. :meth:`attention_mask` hides the padding.
    """

    def __init__(self, sessions: list[SessionCache]) -> None:
        self.sessions = sessions
        self.lengths = [s.position + 1 for s in sessions]  # after this step's token
        self.width = max(self.lengths)

    def attention_mask(self) -> torch.Tensor:
        """Boolean ``[batch, 1, 1, width]``: True where a row has a real (not padded) key."""
        pad = torch.tensor([self.width - n for n in self.lengths]).unsqueeze(1)
        return (torch.arange(self.width).unsqueeze(0) >= pad)[:, None, None, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, _, head_dim = key_states.shape
        keys = key_states.new_zeros(batch, heads, self.width, head_dim)
        values = value_states.new_zeros(batch, heads, self.width, head_dim)
        for row, session in enumerate(self.sessions):
            row_keys, row_values = session.cache.update(
                key_states[row : row + 1], value_states[row : row + 1], layer_idx
            )
            keys[row, :, self.width - row_keys.shape[-2] :] = row_keys[0]
            values[row, :, self.width - row_values.shape[-2] :] = row_values[0]
        return keys, values


def owner_digest(key: bytes) -> bytes:
    """What a session stores of its key: a digest, so the key itself is never kept (b"" stays b"")."""
    return hashlib.sha256(key).digest() if key else b""


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Keys + values of ``num_layers`` layers for one token."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _layer_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A cache layer's keys and values, or None before its first update (its tensors are then empty stubs)."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == 4:
        return keys, values
    return None


def _storage_bytes(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage().nbytes())


def _mib(n: int) -> str:
    value = n / MIB
    return f"{value:.0f} MiB" if value >= 10 or value == int(value) else f"{value:.2f} MiB"
