"""Per-sequence KV caches for a range of layers, and the batch layout the model runs on.

A batch is a list of `SequenceSlice`s whose tokens are concatenated along the first axis of the hidden states
(a "varlen" layout): sequences of different lengths, some prefilling and some decoding, share every matmul.
Each sequence owns one cache per layer; memory follows what sequences actually use: a layer that attends to every
position keeps them all in a growing buffer, a sliding-window layer only the window its queries can still read
(kv_layout.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from cake_py.errors import KVMemoryError
from cake_py.models.kv_layout import Layout, after_copy, after_write, can_copy, first_read
from cake_py.models.kv_pool import PoolSet, RowPool, cache_bytes, check_room

# A padded decode step attends over a view of its pool's rows from its first sequence's to its last's when at most one
# row in this many more lies between them: a row attended needlessly costs about 1.5x a row gathered (32 rows of 1000
# positions, one thread: gathered 4.2 ms, in place 2.5 ms).
SPAN_SLACK = 4


@dataclass(frozen=True)
class SequenceSlice:
    """`n_tokens` consecutive tokens of sequence `seq_id`, the first at position `start_pos`.

    With `copy_from`, the sequence has no caches yet: they start as a copy of the first `start_pos` positions of
    sequence `copy_from`'s (the choices of an n > 1 request share their prompt's prefill). `rope_end` is the length
    the sequence is known to reach when this slice is computed (its whole prompt, while a prompt is prefilled in
    pieces; 0: this slice's own end): LongRoPE rotates every piece of a long prompt with its long factors.
    """

    seq_id: int
    start_pos: int
    n_tokens: int
    copy_from: int | None = None
    rope_end: int = 0

    @property
    def extent(self) -> int:
        """The sequence length this slice is computed for: what LongRoPE picks its factors by."""
        return max(self.start_pos + self.n_tokens, self.rope_end)


Batch = Sequence[SequenceSlice]


def batch_positions(batch: Batch, device: torch.device | None = None) -> torch.Tensor:
    """The absolute position of every token of the batch, in layout order: (T,)."""
    if len(batch) == 1:
        s = batch[0]
        return torch.arange(s.start_pos, s.start_pos + s.n_tokens, device=device)
    return torch.cat([torch.arange(s.start_pos, s.start_pos + s.n_tokens, device=device) for s in batch])


class LayerCache:
    """Keys and values of one layer for one sequence: (1, n_kv_heads, capacity, head_dim) each, holding positions
    [start, length) from the front of the buffer. `start` stays 0 without a `window`; with one, the oldest
    positions are dropped as kv_layout.py says, and attention reads only the window (`update` returns it)."""

    def __init__(
        self,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        window: int | None = None,
        pools: PoolSet | None = None,
    ) -> None:
        self.n_kv_heads, self.head_dim, self.dtype, self.device = n_kv_heads, head_dim, dtype, device
        self.window = window
        self.keys = torch.empty(1, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.start = 0  # the first position held (at the buffer's front)
        self.length = 0  # one past the last position held
        self._pools = pools  # the layer's pools (kv_pool.py); None: a buffer of its own whatever its size
        self.pool: RowPool | None = None  # the pool whose row the buffer is, if any
        self.row = -1

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    @property
    def layout(self) -> Layout:
        return Layout(self.start, self.keys.shape[2])

    def bind(self, pool: RowPool, row: int) -> None:
        """Make the buffer `row` of `pool` (taken for this cache, or moved there)."""
        self.pool, self.row = pool, row
        self.keys, self.values = pool.keys[row : row + 1], pool.values[row : row + 1]

    def free(self) -> None:
        """Give the buffer back (its row to the pool): the cache holds nothing."""
        if self.pool is not None:
            self.pool.give(self.row)
            self.pool, self.row = None, -1
        self.keys = torch.empty(1, self.n_kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.empty_like(self.keys)
        self.start = self.length = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (1, n_kv, t, hd) at `start_pos` and return views of the positions its queries read, from
        `first_read(window, start_pos)` up to the new end."""
        end = start_pos + keys.shape[2]
        reads_from = self.make_room(start_pos, end)
        self.keys[:, :, start_pos - self.start : end - self.start] = keys
        self.values[:, :, start_pos - self.start : end - self.start] = values
        return self.keys[:, :, reads_from - self.start : end - self.start], self.values[
            :, :, reads_from - self.start : end - self.start
        ]

    def make_room(self, start_pos: int, end: int) -> int:
        """Lay the buffer out for a write of positions [start_pos, end), which the caller then makes, and count them
        held; returns the first position the write's queries read."""
        if self.window is None and start_pos <= self.length and end <= self.keys.shape[2]:
            self.length = end  # the common case, a decode step within the buffer: nothing moves, it reads from 0
            return 0
        if start_pos > self.length:
            raise ValueError(f"cache holds {self.length} positions; cannot write at position {start_pos}")
        reads_from = first_read(self.window, start_pos)
        if start_pos and reads_from < self.start:  # a write at 0 starts over and reads nothing held
            raise ValueError(
                f"a {self.window}-position window's cache holds positions from {self.start}; a write at position "
                f"{start_pos} reads from {reads_from}"
            )
        if self.window is not None or end > self.keys.shape[2]:  # else: the layout stays (a decode step's case)
            layout = after_write(self.layout, self.window, start_pos, end)
            if layout != self.layout:
                self._relayout(layout, start_pos)
        self.length = end
        return reads_from

    def holds_prefix(self, n_positions: int) -> bool:
        """Whether a copy of this cache's first `n_positions` can be made: it holds that many and, for a window,
        has not dropped what the copy needs."""
        return self.length >= n_positions and can_copy(self.start, self.window, n_positions)

    def copy_prefix(self, source: LayerCache, n_positions: int) -> None:
        """Become a copy of `source`'s first `n_positions` positions (this cache is new and empty): all of them, or
        for a window those a write at `n_positions` reads."""
        if not source.holds_prefix(n_positions):
            raise ValueError(
                f"cannot copy {n_positions} positions of a cache that holds positions [{source.start}, {source.length})"
            )
        layout = after_copy(self.window, n_positions)
        held = n_positions - layout.start
        offset = layout.start - source.start
        self._move(layout.capacity, source, offset, held)
        self.start, self.length = layout.start, n_positions

    def _relayout(self, layout: Layout, keep_until: int) -> None:
        """Move positions [layout.start, keep_until) into a new buffer of `layout.capacity` (what lies past
        `keep_until` is being rewritten)."""
        first = max(layout.start, self.start)  # a write at 0 keeps nothing
        self._move(layout.capacity, self, first - self.start, max(0, keep_until - first))
        self.start = layout.start

    def _move(self, capacity: int, source: LayerCache, offset: int, held: int) -> None:
        """Take a new buffer of `capacity` positions, all zeros, and copy `held` positions of `source`'s buffer
        from `offset` to its front; the old buffer goes back."""
        # Zeros, not garbage, past the length: a graphed or padded decode step reads past it, masked, and a NaN
        # there would survive the mask.
        try:
            pool, row = self._allocate(capacity)
        except (KVMemoryError, torch.OutOfMemoryError):
            if self._pools is None:
                raise
            self._pools.trim_all()  # the pools' spare rows first
            pool, row = self._allocate(capacity)
        if pool is None:
            keys = torch.zeros(1, self.n_kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)
            values = torch.zeros_like(keys)
        else:  # taking the row may have moved the pool's rows, this cache's or the source's too: read after it
            keys, values = pool.keys[row : row + 1], pool.values[row : row + 1]
        keys[:, :, :held] = source.keys[:, :, offset : offset + held]
        values[:, :, :held] = source.values[:, :, offset : offset + held]
        old_pool, old_row = self.pool, self.row
        if pool is None:
            self.keys, self.values, self.pool, self.row = keys, values, None, -1
        else:
            self.bind(pool, row)
        if old_pool is not None:  # bound to the new buffer first: giving a row back may move the others
            old_pool.give(old_row)

    def _allocate(self, capacity: int) -> tuple[RowPool | None, int]:
        """A row of the pool for `capacity` positions taken for this cache, or (None, -1) for a buffer of its own,
        once there is room for it (KVMemoryError otherwise)."""
        pool = self._pools.pool(capacity) if self._pools is not None else None
        if pool is None:
            check_room(cache_bytes(self.n_kv_heads, capacity, self.head_dim, self.dtype), self.device)
            return None, -1
        return pool, pool.take(self)


class KVStore:
    """The caches of every live sequence for `n_layers` consecutive layers of one stage."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        windows: Sequence[int | None] = (),
    ) -> None:
        if windows and len(windows) != n_layers:
            raise ValueError(f"{len(windows)} sliding windows for {n_layers} layers")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.windows: tuple[int | None, ...] = tuple(windows) or (None,) * n_layers  # each layer's, None: no window
        self.dtype, self.device = dtype, device
        self._pools: list[PoolSet] = []
        self._pools += [PoolSet(n_kv_heads, head_dim, dtype, device, self._pools) for _ in range(n_layers)]
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
        """ValueError unless `piece.copy_from` can seed `piece`: a source holding its prefix (and, in a windowed
        layer, the window before it)."""
        source = self._caches.get(piece.copy_from or 0)
        if source is None or not all(cache.holds_prefix(piece.start_pos) for cache in source):
            raise ValueError(
                f"sequence {piece.seq_id} starts as a copy of {piece.start_pos} positions of sequence "
                f"{piece.copy_from}, which holds {_held(source)}"
            )

    def _copy(self, source_id: int, seq_id: int, n_positions: int) -> None:
        source = self._caches.get(source_id)
        if source is None or not all(cache.holds_prefix(n_positions) for cache in source):
            raise ValueError(f"cannot copy {n_positions} positions of sequence {source_id}: it holds {_held(source)}")
        self._last_used[source_id] = time.monotonic()  # a kept prefix copied all day is in use, not idle
        caches = self._get(seq_id)
        for cache, original in zip(caches, source, strict=True):
            cache.copy_prefix(original, n_positions)

    def _get(self, seq_id: int) -> list[LayerCache]:
        self._last_used[seq_id] = time.monotonic()
        caches = self._caches.get(seq_id)
        if caches is None:
            caches = [
                LayerCache(self.n_kv_heads, self.head_dim, self.dtype, self.device, window, pools)
                for window, pools in zip(self.windows, self._pools, strict=True)
            ]
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
            for cache in self._caches.pop(seq_id, ()):
                cache.free()
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
        """What the caches take: their pools' rows, spare ones too, and the buffers of their own."""
        # A snapshot first: Info and the dashboard read this while the forward thread adds and drops sequences.
        own = sum(c.nbytes for caches in list(self._caches.values()) for c in caches if c.pool is None)
        return own + sum(pools.reserved_bytes for pools in self._pools)


def decode_step(
    caches: Sequence[LayerCache], positions: Sequence[int], keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One new key and value per sequence (keys, values: (n, n_kv_heads, head_dim)) written at its position, and
    every sequence's keys and values from position 0 to the longest's end, past each one's own end zeros or what a
    rolled-back write left (finite, for a mask to hide): (m, n_kv_heads, longest, head_dim) each, and the row of
    each sequence in them, (n,) (None: row i is sequence i's, m = n).

    The caches of one pool are written and read with one indexed op each (kv_pool.py); the rest one by one. Where
    every cache is a row of one pool and those rows lie close together, what is read is a view of the pool's rows
    from the first to the last of them, rows of other caches or free ones in between: no copy at all. Every cache
    must hold its positions from 0 (a window's cache until it drops any)."""
    for cache, position in zip(caches, positions, strict=True):
        cache.make_room(position, position + 1)
        if cache.start:
            raise ValueError(f"a padded decode step reads from position 0; a cache holds positions from {cache.start}")
    n, longest = len(caches), max(positions) + 1
    groups: dict[int, list[int]] = {}
    for index, cache in enumerate(caches):
        groups.setdefault(id(cache.pool) if cache.pool is not None else -1 - index, []).append(index)
    if len(groups) == 1 and caches[0].pool is not None:  # the common case: every cache a row of one pool
        pool = caches[0].pool
        row_list = [cache.row for cache in caches]
        rows = torch.tensor(row_list, device=keys.device)
        slots = torch.tensor(positions, device=keys.device)
        pool.keys[rows, :, slots] = keys
        pool.values[rows, :, slots] = values
        first, last = min(row_list), max(row_list)
        if last - first < n + n // SPAN_SLACK:  # attending to a few rows more costs less than gathering them
            span = slice(first, last + 1)
            return pool.keys[span, :, :longest], pool.values[span, :, :longest], rows - first
        return pool.keys[:, :, :longest].index_select(0, rows), pool.values[:, :, :longest].index_select(0, rows), None
    padded_keys = keys.new_zeros(n, keys.shape[1], longest, keys.shape[2])  # (n, n_kv_heads, longest, head_dim)
    padded_values = torch.zeros_like(padded_keys)
    for members in groups.values():
        first_cache = caches[members[0]]
        if first_cache.pool is None:
            index, position = members[0], positions[members[0]]
            first_cache.keys[0, :, position] = keys[index]
            first_cache.values[0, :, position] = values[index]
            padded_keys[index, :, : position + 1] = first_cache.keys[0, :, : position + 1]
            padded_values[index, :, : position + 1] = first_cache.values[0, :, : position + 1]
            continue
        group_pool, width = first_cache.pool, min(longest, first_cache.pool.capacity)
        picked = torch.tensor(members, device=keys.device)
        group_rows = torch.tensor([caches[i].row for i in members], device=keys.device)
        group_slots = torch.tensor([positions[i] for i in members], device=keys.device)
        group_pool.keys[group_rows, :, group_slots] = keys[picked]
        group_pool.values[group_rows, :, group_slots] = values[picked]
        padded_keys[picked, :, :width] = group_pool.keys[:, :, :width].index_select(0, group_rows)
        padded_values[picked, :, :width] = group_pool.values[:, :, :width].index_select(0, group_rows)
    return padded_keys, padded_values, None


def _held(caches: list[LayerCache] | None) -> str:
    """What a sequence's caches hold, for an error: its length, and what its windowed layers dropped."""
    if not caches:
        return "0"
    dropped = max(cache.start for cache in caches)
    return f"{caches[0].length}" + (f" (its windowed layers from position {dropped} on)" if dropped else "")
