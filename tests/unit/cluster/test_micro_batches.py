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


def test_each_part_of_a_cut_slice_is_computed_for_the_whole_slices_sequence() -> None:
    """LongRoPE picks its factors by the length a slice is computed for (SequenceSlice.extent): the parts of a cut
    slice carry the whole slice's end, or the longer length it was given (a prompt prefilled in steps)."""
    pieces = split_batch([SequenceSlice(1, 0, 300), SequenceSlice(2, 0, 100, rope_end=500)], 128)
    assert len(_parts(pieces, 1)) > 1 and {s.extent for s in _parts(pieces, 1)} == {300}
    assert {s.extent for s in _parts(pieces, 2)} == {500}


def test_a_short_batch_is_one_piece() -> None:
    batch = [SequenceSlice(1, 0, 200), SequenceSlice(2, 3, 1)]
    assert split_batch(batch, 128) == [(0, 201, batch)]


def _parts(pieces: list[tuple[int, int, list[SequenceSlice]]], seq_id: int) -> list[SequenceSlice]:
    return [s for _, _, slices in pieces for s in slices if s.seq_id == seq_id]


@pytest.mark.parametrize("seed", range(20))
def test_with_a_window_a_slice_is_cut_only_where_its_parts_keep_what_it_keeps(seed: int) -> None:
    """A worker cannot tell a piece's part of a slice from a step of its own: a cut whose later part would drop more
    of a window's oldest positions than the whole slice left a step run again (a chain that fell back to whole
    steps, a failed step) or drafts rewritten reading positions gone."""
    import random

    from cake_py.models.kv_layout import kept_from

    rng = random.Random(seed)
    window = rng.choice([16, 1024])
    batch = [
        SequenceSlice(index, rng.choice([0, rng.randrange(0, 6000)]), rng.choice([1, 5, rng.randrange(1, 600)]))
        for index in range(rng.randrange(1, 6))
    ]
    piece_tokens = rng.choice([7, 64, 128])
    pieces = split_batch(batch, piece_tokens, window)
    total = sum(piece.n_tokens for piece in batch)
    assert [first for first, _, _ in pieces] == [0] + [end for _, end, _ in pieces[:-1]] and pieces[-1][1] == total
    assert all(end - first >= min(piece_tokens, total) for first, end, _ in pieces)
    assert all(sum(s.n_tokens for s in slices) == end - first for first, end, slices in pieces)
    assert [row for _, _, slices in pieces for row in rows_of(slices)] == rows_of(batch)
    for piece in batch:
        assert {kept_from(window, part.start_pos) for part in _parts(pieces, piece.seq_id)} == {
            kept_from(window, piece.start_pos)
        }


def test_with_a_window_a_prompt_is_still_cut_where_nothing_is_dropped() -> None:
    early = [SequenceSlice(1, 0, 512)]  # the window's first 1,024 + 255 positions drop nothing: cut as before
    assert split_batch(early, 128, 1024) == split_batch(early, 128)
    late = SequenceSlice(1, 5000, 512)  # its positions from 3,840 on are kept; a part from 5,119 on keeps fewer
    assert split_batch([late], 128, 1024) == [(0, 512, [late])]
    drafts = [SequenceSlice(1, 0, 300), SequenceSlice(2, 1278, 5)]  # a cut after 2 drafts would drop 16 more
    assert _parts(split_batch(drafts, 2, 16), 2) == [drafts[1]]


def test_a_step_run_again_whole_after_its_pieces_reads_no_dropped_position() -> None:
    """As a worker sees it: the pieces, then the whole step again (the chain fell back), then drafts rewritten."""
    import torch

    from cake_py.models.kv_cache import KVStore

    store = KVStore(1, 1, 1, torch.float32, torch.device("cpu"), windows=[16])

    def write(piece: SequenceSlice) -> None:
        zeros = torch.zeros(1, 1, piece.n_tokens, 1)
        store.for_batch([piece])[0][0].update(zeros, zeros, piece.start_pos)

    for piece in [SequenceSlice(1, 0, 40), SequenceSlice(2, 0, 300)]:  # what both held before the step
        write(piece)
    step = [SequenceSlice(1, 40, 5), SequenceSlice(2, 300, 250)]  # drafts; a prefill chunk
    for _, _, slices in split_batch(step, 50, 16):
        for part in slices:
            write(part)
    for piece in [*step, SequenceSlice(1, 41, 3)]:  # the whole step again; then one draft kept, the rest rewritten
        write(piece)
