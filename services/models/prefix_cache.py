"""Automatic prefix caching for one stage: KV blocks of prompt prefixes, kept for later sessions.

The prompt a stage receives at position 0 (token ids on stage 0, hidden states on later stages) is cut
into full blocks of ``block_tokens`` positions. Each block is named by a chained digest (sha256 over the
previous block's digest and this block's exact bytes, dtype and shape), as vLLM names its blocks: a
block's digest fixes every position before it. A block keeps this stage's keys and values for its
positions and, on every stage but the last, the stage's output there, so a session that hits the cache
still returns the full output and the next stage sees the very same bytes (and hits its own cache).

Why it is exact: a causal stage's keys, values and outputs at position ``i`` depend only on its inputs at
positions ``0..i``; a hit requires those inputs to be identical. Stage 0 compares the stored token ids
(a digest collision cannot alias two prompts); later stages compare the 256-bit digest of the hidden
bytes. A session copies the blocks it uses, so closing it, evicting a block or another session's
steps never change what a session holds.

Pure bookkeeping under the caller's lock: no I/O, no clock (recency is an insertion/touch order).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_TOKENS = 16


@dataclass(eq=False)
class PrefixBlock:
    """One cached block: its digest, the token ids (stage 0 only), keys/values per layer, and the output."""

    digest: bytes
    ids: tuple[int, ...] | None  # stage 0: compared on every hit
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per local layer: [1, kv_heads, block_tokens, head_dim]
    output: torch.Tensor | None  # [1, block_tokens, hidden]; None on the last stage (it returns logits only)

    @property
    def nbytes(self) -> int:
        size = sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in self.kv)
        if self.output is not None:
            size += self.output.untyped_storage().nbytes()
        return size + (8 * len(self.ids) if self.ids is not None else 0)


def block_digests(x: torch.Tensor, block_tokens: int) -> list[bytes]:
    """Chained digests of ``x``'s full blocks (``x``: ids ``[1, T]`` or hidden ``[1, T, H]``)."""
    digests: list[bytes] = []
    parent = b"shardmesh-prefix-v1"
    flat = x.detach().contiguous()
    for start in range(0, int(x.shape[1]) - block_tokens + 1, block_tokens):
        block = flat[:, start : start + block_tokens].contiguous()
        h = hashlib.sha256(parent)
        h.update(f"{block.dtype}|{tuple(block.shape)}|".encode())
        h.update(block.view(torch.uint8).numpy().tobytes() if block.numel() else b"")
        parent = h.digest()
        digests.append(parent)
    return digests


class PrefixCache:
    """The blocks of one stage, least recently used first; the owner enforces the byte budget."""

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1; got {block_tokens}")
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, PrefixBlock] = OrderedDict()
        self.nbytes = 0
        self.hits = 0  # blocks reused
        self.misses = 0  # prompts that reused nothing
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, x: torch.Tensor, digests: Sequence[bytes]) -> list[PrefixBlock]:
        """The longest run of cached blocks from the start of ``x`` (each touched as recently used)."""
        found: list[PrefixBlock] = []
        ids = x[0].tolist() if not x.is_floating_point() else None
        for i, digest in enumerate(digests):
            block = self._blocks.get(digest)
            if block is None:
                break
            if ids is not None:  # stage 0: the very same token ids, never merely the same digest
                if block.ids != tuple(ids[i * self.block_tokens : (i + 1) * self.block_tokens]):
                    break
            elif block.ids is not None:
                break
            found.append(block)
        for block in found:
            self._blocks.move_to_end(block.digest)
        if found:
            self.hits += len(found)
        else:
            self.misses += 1
        return found

    def missing(self, digests: Sequence[bytes]) -> list[int]:
        """Indices of ``digests`` not cached yet (the blocks a finished prefill may add)."""
        return [i for i, d in enumerate(digests) if d not in self._blocks]

    def insert(self, block: PrefixBlock) -> None:
        if block.digest in self._blocks:
            self._blocks.move_to_end(block.digest)
            return
        self._blocks[block.digest] = block
        self.nbytes += block.nbytes

    def evict(self, needed: int) -> int:
        """Drops least recently used blocks until ``needed`` bytes were freed (or none is left); returns bytes freed."""
        freed = 0
        while freed < needed and self._blocks:
            _, block = self._blocks.popitem(last=False)
            freed += block.nbytes
            self.evictions += 1
        self.nbytes -= freed
        return freed

    def clear(self) -> None:
        self.evict(self.nbytes + 1)


def make_blocks(
    x: torch.Tensor,
    digests: Sequence[bytes],
    indices: Sequence[int],
    layer_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    output: torch.Tensor | None,
    block_tokens: int,
) -> list[PrefixBlock]:
    """Copies blocks ``indices`` out of a session's cache (``layer_kv``) and the stage's full ``output``."""
    ids = x[0].tolist() if not x.is_floating_point() else None
    blocks = []
    for i in indices:
        lo, hi = i * block_tokens, (i + 1) * block_tokens
        blocks.append(
            PrefixBlock(
                digest=digests[i],
                ids=tuple(ids[lo:hi]) if ids is not None else None,
                kv=[(k[..., lo:hi, :].clone(), v[..., lo:hi, :].clone()) for k, v in layer_kv],
                output=output[:, lo:hi].clone() if output is not None else None,
            )
        )
    return blocks


def joined_kv(blocks: Sequence[PrefixBlock], tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values of the first ``tokens`` positions of ``blocks`` (fresh tensors)."""
    layers = len(blocks[0].kv)
    joined = []
    for layer in range(layers):
        keys = torch.cat([b.kv[layer][0] for b in blocks], dim=-2)[..., :tokens, :]
        values = torch.cat([b.kv[layer][1] for b in blocks], dim=-2)[..., :tokens, :]
        joined.append((keys.clone(), values.clone()))
    return joined


def joined_output(blocks: Sequence[PrefixBlock], tokens: int) -> torch.Tensor | None:
    if blocks[0].output is None:
        return None
    return torch.cat([b.output for b in blocks if b.output is not None], dim=1)[:, :tokens]
