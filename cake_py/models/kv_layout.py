"""Which positions a layer's KV cache keeps, and in how large a buffer: pure functions of what was written to it.

A layer that attends to every position keeps them all, from position 0, in a buffer that grows. A sliding-window
layer keeps only what its queries can still read: a write at `start_pos` reads keys from `start_pos - window + 1`
on, and no later write starts before it (a failed step runs again from the same position; speculative drafts that
were rejected are rewritten from one past the last write's start). Older positions are dropped, a whole quantum at a
time so that dropping is amortised, and the buffer stays near window + quantum positions however long the sequence.

The stages' caches follow these functions (kv_cache.py), and so does the engine: to count what kept caches take, and
to offer a copy of a sequence's first positions only when its caches still hold what the copy needs.
"""

from __future__ import annotations

from dataclasses import dataclass

GROWTH_QUANTUM = 256  # capacity grows in whole multiples of this many positions
DOUBLING_UNTIL = 2048  # past this many positions a cache grows by a quarter: a long one wastes less


def grown_capacity(capacity: int, needed: int) -> int:
    """The positions a cache of `capacity` holds once it holds `needed`: doubled while small, then a quarter more
    (appends stay cheap either way; doubling a long conversation's cache left up to half of it unused, and kept
    caches count what they take), in whole quanta. The engine follows it to count what kept caches take
    (engine/prefix_cache.py)."""
    if needed <= capacity:
        return capacity
    step = capacity if capacity < DOUBLING_UNTIL else capacity // 4
    return -(-max(needed, capacity + step) // GROWTH_QUANTUM) * GROWTH_QUANTUM


def copied_capacity(n_positions: int) -> int:
    """The positions a cache copied from another's first `n_positions` holds: just enough, in whole quanta."""
    return -(-max(n_positions, 1) // GROWTH_QUANTUM) * GROWTH_QUANTUM


def drop_quantum(window: int) -> int:
    """How many of its oldest positions a window's cache drops at a time (a small window: the window's size)."""
    return max(1, min(GROWTH_QUANTUM, window))


def first_read(window: int | None, start_pos: int) -> int:
    """The first position the queries of a write at `start_pos` read (its first query's window starts there)."""
    return 0 if window is None else max(0, start_pos - window + 1)


def kept_from(window: int | None, start_pos: int) -> int:
    """The first position a layer keeps once written at `start_pos`: what that write reads, rounded down to a whole
    drop quantum (0 for a layer without a window)."""
    if window is None:
        return 0
    quantum = drop_quantum(window)
    return first_read(window, start_pos) // quantum * quantum


def steady_capacity(window: int) -> int:
    """The buffer a window's cache settles in: the window and one quantum to drop, in whole quanta."""
    quantum = drop_quantum(window)
    return -(-(window + quantum - 1) // quantum) * quantum


@dataclass(frozen=True)
class Layout:
    """A cache's buffer: it holds positions [start, start + capacity)."""

    start: int = 0
    capacity: int = 0


def after_write(layout: Layout, window: int | None, start_pos: int, end: int) -> Layout:
    """The layout once positions [start_pos, end) are written to a cache laid out as `layout`. A write at 0 starts
    over (a sequence computed again from its first token keeps nothing)."""
    if window is None:
        return Layout(0, grown_capacity(layout.capacity, end))
    start = 0 if start_pos == 0 else max(layout.start, kept_from(window, start_pos))
    return Layout(start, _windowed_capacity(layout.capacity, end - start, window))


def after_copy(window: int | None, n_positions: int) -> Layout:
    """The layout of a new cache copied from another's first `n_positions` (the copy is written at `n_positions`
    next): just what that write reads."""
    if window is None:
        return Layout(0, copied_capacity(n_positions))
    start = kept_from(window, n_positions)
    return Layout(start, _windowed_capacity(0, max(n_positions - start, 1), window))


def can_copy(source_start: int, window: int | None, n_positions: int) -> bool:
    """Whether a cache that keeps positions from `source_start` still holds what a copy of its first `n_positions`
    needs (given it holds that many)."""
    return source_start <= after_copy(window, n_positions).start


def _windowed_capacity(capacity: int, needed: int, window: int) -> int:
    """A window's buffer: grown as any cache's up to its steady size; past it only while a long prefill chunk needs
    more (in whole drop quanta), and back to the steady size once the window's positions fit in it again."""
    steady = steady_capacity(window)
    if needed <= steady:
        if capacity > steady:
            return steady
        return capacity if needed <= capacity else min(grown_capacity(capacity, needed), steady)
    quantum = drop_quantum(window)
    return max(capacity, -(-needed // quantum) * quantum)
