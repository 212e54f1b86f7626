"""Cutting a step's batch into pieces of its token layout (cake_py.cluster.micro_batches)."""

from __future__ import annotations

import pytest

from cake_py.cluster.micro_batches import split_batch
from cake_py.models.kv_cache import SequenceSlice


def rows_of(batch: list[SequenceSlice]) -> list[tuple[int, int]]:
    """(sequence, position) of every row of a batch, in layout order."""
    return [(piece.seq_id, piece.start_pos + offset) for piece in batch for offset in range(piece.n_tokens)]


BATCHES = {
    "one-long-prefill": [SequenceSlice(1, 0, 500)],
    "decodes-then-prefills": [
        SequenceSlice(1, 40, 1),
        SequenceSlice(2, 7, 1),
        SequenceSlice(3, 0, 300),
        SequenceSlice(4, 12, 90),
    ],  # fmt: skip
    "copy-cut": [SequenceSlice(1, 9, 1), SequenceSlice(2, 64, 400, copy_from=5)],
}


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("piece_tokens", [1, 7, 128, 256])
def test_pieces_are_the_batch_rows_in_order(name: str, piece_tokens: int) -> None:
    batch = BATCHES[name]
    pieces = split_batch(batch, piece_tokens)
    total = sum(piece.n_tokens for piece in batch)
    # Consecutive row ranges covering the batch, each at least piece_tokens long (one piece when the batch is short).
    assert [first for first, _, _ in pieces] == [0] + [end for _, end, _ in pieces[:-1]]
    assert pieces[-1][1] == total
    assert all(end - first >= min(piece_tokens, total) for first, end, _ in pieces)
    assert max(end - first for first, end, _ in pieces) - min(end - first for first, end, _ in pieces) <= 1
    assert len(pieces) == max(total // piece_tokens, 1)
    # Each piece's slices hold exactly its rows; together, the batch's rows in its layout order.
    assert all(sum(s.n_tokens for s in slices) == end - first for first, end, slices in pieces)
    assert [row for _, _, slices in pieces for row in rows_of(slices)] == rows_of(batch)
    assert all(s.n_tokens >= 1 for _, _, slices in pieces for s in slices)


def test_a_cut_copy_seeds_the_caches_once() -> None:
    pieces = split_batch(BATCHES["copy-cut"], 128)  # 401 rows: 3 pieces of 133-134
    parts = [s for _, _, slices in pieces for s in slices if s.seq_id == 2]
    assert [s.copy_from for s in parts] == [5, None, None]
    assert [s.start_pos for s in parts] == [64, 64 + parts[0].n_tokens, 64 + parts[0].n_tokens + parts[1].n_tokens]


def test_a_short_batch_is_one_piece() -> None:
    batch = [SequenceSlice(1, 0, 200), SequenceSlice(2, 3, 1)]
    assert split_batch(batch, 128) == [(0, 201, batch)]
