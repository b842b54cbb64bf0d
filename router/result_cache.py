"""The router's optional Infer result cache (``--cache-mb``): an LRU of outputs bounded in bytes.

Same weights and same token ids (and attention mask) give the same output whichever mode or route
computed it, so a repeated request can be answered without touching a worker. Entries are keyed by a
digest of the model checksum, the ids and the mask; the cache holds one checksum at a time and empties
itself when the mesh's checksum changes (new weights must never be answered with old outputs).

Pure: no I/O, no clocks, no protobuf. The router stores each output's serialized wire tensor (exactly
the bytes it answered with), so a hit returns the identical tensor. With ``export=True`` (the router's
instance) every lookup, eviction and invalidation also updates the Prometheus metrics declared here.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

import torch
from prometheus_client import Counter, Gauge

ENTRY_OVERHEAD_BYTES = 160
"""Charged per entry on top of key and value: the ordered-dict node and two bytes objects' headers."""
KEY_BYTES = 32

LOOKUPS = Counter("shardmesh_result_cache_lookups_total", "Infer result cache lookups", ["result"])  # hit | miss
EVICTIONS = Counter("shardmesh_result_cache_evictions_total", "Entries evicted to stay within --cache-mb")
INVALIDATIONS = Counter("shardmesh_result_cache_invalidations_total", "Cache emptied because the model checksum changed")
CACHE_BYTES = Gauge("shardmesh_result_cache_bytes", "Bytes held by the Infer result cache (entries + overhead)")
CACHE_ENTRIES = Gauge("shardmesh_result_cache_entries", "Entries in the Infer result cache")


def result_key(checksum: str, ids: torch.Tensor, mask: torch.Tensor | None) -> bytes:
    """Digest of what determines an Infer output: weights, token ids (as int64, with their shape) and the
    mask (or its absence: a missing mask may take another attention kernel than an all-ones one)."""
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    digest.update(checksum.encode())
    for name, tensor in (("ids", ids), ("mask", mask)):
        digest.update(name.encode())
        if tensor is None:
            digest.update(b"\x00")
            continue
        flat = tensor.detach().to(torch.int64).contiguous()
        digest.update(b"\x01" + struct.pack(f"<{flat.dim() + 1}q", flat.dim(), *flat.shape))
        digest.update(flat.numpy().tobytes())
    return digest.digest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0


class ResultCache:
    """LRU of ``key -> value`` bytes for one model checksum, at most ``max_bytes`` (entries + overhead)."""

    def __init__(self, max_bytes: int, *, export: bool = False) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._export = export
        if export:  # both series exist from the start, so rates and ratios work before the first hit
            LOOKUPS.labels(result="hit")
            LOOKUPS.labels(result="miss")
        self.checksum = ""
        self.used_bytes = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def entry_bytes(key: bytes, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD_BYTES

    def follow(self, checksum: str) -> bool:
        """Adopts the mesh's current ``checksum``; empties the cache when it differs (True then)."""
        if checksum == self.checksum:
            return False
        changed = bool(self.checksum) and bool(self._entries)
        self.checksum = checksum
        self._entries.clear()
        self.used_bytes = 0
        if changed:
            self.stats.invalidations += 1
            if self._export:
                INVALIDATIONS.inc()
        self._publish()
        return changed

    def _publish(self) -> None:
        if self._export:
            CACHE_BYTES.set(self.used_bytes)
            CACHE_ENTRIES.set(len(self._entries))

    def get(self, checksum: str, key: bytes) -> bytes | None:
        """The stored value (now most recently used), or None; a new ``checksum`` empties the cache first."""
        self.follow(checksum)
        value = self._entries.get(key)
        if value is None:
            self.stats.misses += 1
        else:
            self._entries.move_to_end(key)
            self.stats.hits += 1
        if self._export:
            LOOKUPS.labels(result="miss" if value is None else "hit").inc()
        return value

    def put(self, checksum: str, key: bytes, value: bytes) -> bool:
        """Stores ``value``, evicting least recently used entries to fit; False when it alone exceeds the budget."""
        self.follow(checksum)
        size = self.entry_bytes(key, value)
        if size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.used_bytes -= self.entry_bytes(key, old)
        while self._entries and self.used_bytes + size > self.max_bytes:
            evicted_key, evicted = self._entries.popitem(last=False)
            self.used_bytes -= self.entry_bytes(evicted_key, evicted)
            self.stats.evictions += 1
            if self._export:
                EVICTIONS.inc()
        self._entries[key] = value
        self.used_bytes += size
        self._publish()
        return True
