"""Per-sequence KV caches for a range of layers, and the batch layout the model runs on.

A batch is a list of `SequenceSlice`s whose tokens are concatenated along the first axis of the hidden states
(a "varlen" layout): sequences of different lengths, some prefilling and some decoding, share every matmul.
Each sequence owns one growing cache per layer; memory follows what sequences actually use.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

_GROWTH_QUANTUM = 256  # capacity grows in whole multiples of this many positions


_DOUBLING_UNTIL = 2048  # past this many positions a cache grows by a quarter: a long one wastes less


def grown_capacity(capacity: int, needed: int) -> int:
    """The positions a cache of `capacity` holds once it holds `needed`: doubled while small, then a quarter more
    (appends stay cheap either way; doubling a long conversation's cache left up to half of it unused, and kept
    caches count what they take), in whole quanta. The engine follows it to count what kept caches take
    (engine/prefix_cache.py)."""
    if needed <= capacity:
        return capacity
    step = capacity if capacity < _DOUBLING_UNTIL else capacity // 4
    return -(-max(needed, capacity + step) // _GROWTH_QUANTUM) * _GROWTH_QUANTUM


def copied_capacity(n_positions: int) -> int:
    """The positions a cache copied from another's first `n_positions` holds: just enough, in whole quanta."""
    return -(-max(n_positions, 1) // _GROWTH_QUANTUM) * _GROWTH_QUANTUM


@dataclass(frozen=True)
class SequenceSlice:
    """`n_tokens` consecutive tokens of sequence `seq_id`, the first at position `start_pos`.

    With `copy_from`, the sequence has no caches yet: they start as a copy of the first `start_pos` positions of
    sequence `copy_from`'s (the choices of an n > 1 request share their prompt's prefill).
    """

    seq_id: int
    start_pos: int
    n_tokens: int
    copy_from: int | None = None


Batch = Sequence[SequenceSlice]


def batch_positions(batch: Batch, device: torch.device | None = None) -> torch.Tensor:
    """The absolute position of every token of the batch, in layout order: (T,)."""
    if len(batch) == 1:
        s = batch[0]
        return torch.arange(s.start_pos, s.start_pos + s.n_tokens, device=device)
    return torch.cat([torch.arange(s.start_pos, s.start_pos + s.n_tokens, device=device) for s in batch])


class LayerCache:
    """Keys and values of one layer for one sequence: (1, n_kv_heads, capacity, head_dim) each."""

    def __init__(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n_kv_heads, self.head_dim, self.dtype, self.device = n_kv_heads, head_dim, dtype, device
        self.keys = torch.empty(1, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def update(self, keys: torch.Tensor, values: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (1, n_kv, t, hd) at `start_pos` and return views of the cache up to the new end."""
        if start_pos > self.length:
            raise ValueError(f"cache holds {self.length} positions; cannot write at position {start_pos}")
        end = start_pos + keys.shape[2]
        if end > self.keys.shape[2]:
            self._grow(end)
        self.keys[:, :, start_pos:end] = keys
        self.values[:, :, start_pos:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def copy_prefix(self, source: LayerCache, n_positions: int) -> None:
        """Become a copy of `source`'s first `n_positions` positions (this cache is new and empty)."""
        shape = (1, self.n_kv_heads, copied_capacity(n_positions), self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)  # see _grow
        self.values = torch.zeros_like(self.keys)
        self.keys[:, :, :n_positions] = source.keys[:, :, :n_positions]
        self.values[:, :, :n_positions] = source.values[:, :, :n_positions]
        self.length = n_positions

    def _grow(self, needed: int) -> None:
        capacity = grown_capacity(self.keys.shape[2], needed)
        # Zeros, not garbage, past the length: a graphed decode step reads the whole capacity, masked, and a NaN
        # there would survive the mask.
        keys = torch.zeros(1, self.n_kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        keys[:, :, : self.length] = self.keys[:, :, : self.length]
        values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values


class KVStore:
    """The caches of every live sequence for `n_layers` consecutive layers of one stage."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self._caches: dict[int, list[LayerCache]] = {}
        self._last_used: dict[int, float] = {}
        # Per sequence, whatever a model keeps beside its caches (a recorded decode step): released with them.
        self.graphs: dict[int, object] = {}

    def for_batch(self, batch: Batch) -> list[list[LayerCache]]:
        """Per sequence of the batch, its per-layer caches (created on first sight, copied for a `copy_from`: a copy
        replaces whatever the sequence held, so a failed step that had copied already can run again)."""
        for piece in batch:
            if piece.copy_from is not None:
                self._copy(piece.copy_from, piece.seq_id, piece.start_pos)
        return [self._get(s.seq_id) for s in batch]

    def check_copy(self, piece: SequenceSlice) -> None:
        """ValueError unless `piece.copy_from` can seed `piece`: a source holding its prefix."""
        if self.length(piece.copy_from or 0) < piece.start_pos:
            raise ValueError(
                f"sequence {piece.seq_id} starts as a copy of {piece.start_pos} positions of sequence "
                f"{piece.copy_from}, which holds {self.length(piece.copy_from or 0)}"
            )

    def _copy(self, source_id: int, seq_id: int, n_positions: int) -> None:
        source = self._caches.get(source_id)
        if source is None or source[0].length < n_positions:
            held = source[0].length if source else 0
            raise ValueError(f"cannot copy {n_positions} positions of sequence {source_id}: it holds {held}")
        self._last_used[source_id] = time.monotonic()  # a kept prefix copied all day is in use, not idle
        caches = self._get(seq_id)
        for cache, original in zip(caches, source, strict=True):
            cache.copy_prefix(original, n_positions)

    def _get(self, seq_id: int) -> list[LayerCache]:
        self._last_used[seq_id] = time.monotonic()
        caches = self._caches.get(seq_id)
        if caches is None:
            caches = [LayerCache(self.n_kv_heads, self.head_dim, self.dtype, self.device) for _ in range(self.n_layers)]
            self._caches[seq_id] = caches
        return caches

    def caches_of(self, seq_id: int) -> list[LayerCache] | None:
        """The sequence's per-layer caches, if it has any (nothing is created); it counts as used now."""
        caches = self._caches.get(seq_id)
        if caches is not None:
            self._last_used[seq_id] = time.monotonic()
        return caches

    def length(self, seq_id: int) -> int:
        caches = self._caches.get(seq_id)
        return caches[0].length if caches else 0

    def release(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            self._caches.pop(seq_id, None)
            self._last_used.pop(seq_id, None)
            self.graphs.pop(seq_id, None)

    def release_idle(self, idle_seconds: float) -> list[int]:
        """Free the sequences untouched for `idle_seconds` (their master died or forgot them); returns their ids."""
        cutoff = time.monotonic() - idle_seconds
        stale = [seq_id for seq_id, used in list(self._last_used.items()) if used < cutoff]
        self.release(stale)
        return stale

    def sequence_ids(self) -> list[int]:
        return list(self._caches)

    @property
    def nbytes(self) -> int:
        # A snapshot first: Info and the dashboard read this while the forward thread adds and drops sequences.
        return sum(c.nbytes for caches in list(self._caches.values()) for c in caches)
