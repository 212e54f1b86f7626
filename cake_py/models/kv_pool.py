"""Rows of one layer's short KV caches kept side by side, so that decoding sequences write and read theirs in one
indexed op per layer instead of one small copy per sequence.

A batch of 32 sequences decoding together, each cache in a buffer of its own, spent ~4,000 small copies a step
(write the new token, copy the cache into the padded batch attention runs on): 15-20% of the step on a CPU. A cache
of at most `POOLED_MAX_CAPACITY` positions is instead one row of a `RowPool`: all of the layer's caches of that
capacity, in one pair of tensors. A cache still sees its row as a tensor of its own (a view), so every other path
reads and writes it as before. Longer caches keep buffers of their own: a spare row of those would cost too much.

A pool grows by half when it runs out, and gives memory back once at most a third of it is in use (down to half again
what is used, or nothing), moving its rows down; every move rebinds the owner's views (graphs.py records a step again
when its caches' addresses change). Spare rows are under two thirds of a pool, an idle pool holds none, and when
memory runs short every spare row is given back (`PoolSet.trim_all`).
"""

from __future__ import annotations

import heapq
from typing import Protocol

import torch

from cake_py.errors import KVMemoryError
from cake_py.host_memory import host_memory
from cake_py.models.device import release_free_heap

POOLED_MAX_CAPACITY = 2048  # positions: caches up to this size share pools (every doubling step of kv_layout.py)
# Host memory KV caches never take: the larger of these. What a step needs besides (activations; a layer's 4-bit
# weights unpacked for a prefill chunk) and the rest of the machine live there; caches that grew into it had the
# kernel kill the whole process (a worker: every request through it) where one sequence should end.
KEEP_FREE_BYTES = 1 << 30
KEEP_FREE_FRACTION = 0.05
_keep_free: int | None = None  # what --keep-free-mb set instead (`set_keep_free`)


def set_keep_free(nbytes: int | None) -> None:
    """The host memory KV caches never take from now on; None: the larger of KEEP_FREE_BYTES and KEEP_FREE_FRACTION
    of the host's memory."""
    global _keep_free
    _keep_free = nbytes


def check_room(nbytes: int, device: torch.device) -> None:
    """KVMemoryError unless `nbytes` more of KV caches leave the host the memory it keeps free. An accelerator's
    allocator raises its own error when full; only host memory is checked (read at each growth: other processes
    use it too). Before refusing, the free memory glibc's heaps keep is handed back and the figures read again."""
    if device.type != "cpu":
        return
    total, available = host_memory()  # within a container's limit
    keep = _keep_free if _keep_free is not None else max(KEEP_FREE_BYTES, int(total * KEEP_FREE_FRACTION))
    if available - nbytes < keep and release_free_heap():  # the heaps' free memory counted as used: give it back
        total, available = host_memory()
    if available - nbytes < keep:
        raise KVMemoryError(
            f"{KVMemoryError.MARK}: {_size(nbytes)} more would leave {_size(available - nbytes)} of this "
            f"host's memory free, under the {_size(keep)} kept free (`--keep-free-mb`; fewer concurrent sequences, "
            "`--max-running`, or a shorter `--max-model-len` need less)"
        )


def cache_bytes(n_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype) -> int:
    """Keys and values of one cache of `capacity` positions."""
    return 2 * n_kv_heads * capacity * head_dim * dtype.itemsize


def _size(nbytes: int) -> str:
    """Bytes as people read them: 512 B, 96.0 KiB, 1.5 GiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(nbytes) >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes} B"


class RowOwner(Protocol):
    def bind(self, pool: RowPool, row: int) -> None:
        """Point the owner's keys/values at `row` of `pool` (its rows just moved)."""


class RowPool:
    """Keys and values of one layer's caches of `capacity` positions: (rows, n_kv_heads, capacity, head_dim) each.

    A row taken is all zeros (attention reads a padded batch up to its capacity, masked, and a NaN there would
    survive the mask); a row given back is free for the next."""

    def __init__(self, n_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.capacity = capacity
        self._shape = (n_kv_heads, capacity, head_dim)
        self._row_bytes = cache_bytes(n_kv_heads, capacity, head_dim, dtype)  # keys and values
        self.keys = torch.zeros(0, *self._shape, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self._owners: list[RowOwner | None] = []
        self._free: list[int] = []  # a heap: the lowest row goes first, so the top ones empty and can be dropped

    @property
    def n_rows(self) -> int:
        return len(self._owners)

    @property
    def n_used(self) -> int:
        return len(self._owners) - len(self._free)

    def take(self, owner: RowOwner) -> int:
        """A zeroed row for `owner` (not bound yet: the caller binds it once it has copied what it keeps)."""
        if not self._free:
            self._resize(self.n_rows + max(1, self.n_rows // 2))
        row = heapq.heappop(self._free)
        self.keys[row].zero_()
        self.values[row].zero_()
        self._owners[row] = owner
        return row

    def give(self, row: int) -> None:
        """Free `row`; the pool shrinks once at most a third of it is in use."""
        self._owners[row] = None
        heapq.heappush(self._free, row)
        used = self.n_used
        if used * 3 <= self.n_rows:
            self._shrink(used + used // 2)

    def trim(self) -> None:
        """Give back every spare row (memory is short)."""
        if self.n_used < self.n_rows:
            self._shrink(self.n_used)

    def _shrink(self, n_rows: int) -> None:
        """Shrink if memory allows: the smaller copy is allocated before the larger one goes, and where there is no
        room for it (a host short of memory: its kernel would kill the process rather than fail the allocation), or
        allocating it fails (a GPU short of memory just then), the pool stays as it is, whole."""
        try:
            self._resize(n_rows)
        except (KVMemoryError, torch.OutOfMemoryError):
            pass

    def _resize(self, n_rows: int) -> None:
        """Reallocate to `n_rows` rows, the used rows above it moved down into free ones. The new tensors are
        allocated first (the old ones stay until they hold a copy: room is needed for both), so if that fails, nothing
        has changed. A pool with no row in use empties at once (nothing to copy: no room needed, so it goes when
        memory is shortest too, where a copy of even a few rows is refused)."""
        if n_rows == 0 and self.n_used == 0:
            self.keys, self.values = self.keys[:0].clone(), self.values[:0].clone()
            self._owners, self._free = [], []
            return
        check_room(n_rows * self._row_bytes, self.keys.device)
        keys = self.keys.new_zeros(n_rows, *self._shape)
        values = self.values.new_zeros(n_rows, *self._shape)
        keep = min(n_rows, self.n_rows)
        keys[:keep] = self.keys[:keep]
        values[:keep] = self.values[:keep]
        owners = self._owners[:keep] + [None] * (n_rows - keep)
        if n_rows < self.n_rows:  # every used row at or above n_rows into a free one below it
            free_below = (row for row in range(keep) if owners[row] is None)
            moving = [row for row in range(n_rows, self.n_rows) if self._owners[row] is not None]
            for source, target in zip(moving, free_below, strict=False):
                keys[target] = self.keys[source]
                values[target] = self.values[source]
                owners[target] = self._owners[source]
        self.keys, self.values, self._owners = keys, values, owners
        self._free = [row for row, owner in enumerate(owners) if owner is None]
        heapq.heapify(self._free)
        for row, owner in enumerate(owners):
            if owner is not None:
                owner.bind(self, row)


class PoolSet:
    """One layer's pools, by capacity; `siblings` are the pool sets of the stage's other layers (and this one), whose
    spare rows go too when memory is short."""

    def __init__(
        self,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        siblings: list[PoolSet] | None = None,
    ) -> None:
        self.n_kv_heads, self.head_dim, self.dtype, self.device = n_kv_heads, head_dim, dtype, device
        self._pools: dict[int, RowPool] = {}
        self.siblings = siblings if siblings is not None else [self]

    def trim_all(self) -> None:
        """Every spare row of the stage's pools given back: what a cache that cannot grow tries before failing."""
        for pools in self.siblings:
            for pool in list(pools._pools.values()):
                pool.trim()

    def pool(self, capacity: int) -> RowPool | None:
        """The pool for caches of `capacity` positions; None past `POOLED_MAX_CAPACITY` (a buffer of its own)."""
        if capacity > POOLED_MAX_CAPACITY or capacity == 0:
            return None
        pool = self._pools.get(capacity)
        if pool is None:
            pool = RowPool(self.n_kv_heads, capacity, self.head_dim, self.dtype, self.device)
            self._pools[capacity] = pool
        return pool

    @property
    def reserved_bytes(self) -> int:
        """What every pool's rows take, used or spare."""
        return sum(p.keys.nbytes + p.values.nbytes for p in list(self._pools.values()))
