"""Micro-batches: a step's varlen batch cut into consecutive pieces of the token layout, so that a chain of workers
works on several at once (the first worker computes piece 2 while the second computes piece 1: pipeline
parallelism within one step).

A piece is a contiguous range of the batch's rows. A sequence's slice cut between two pieces becomes two slices of
consecutive positions; each worker reads its frames in order, so the second part finds the first part's keys and
values in its caches. Concatenating the pieces' outputs gives the batch's rows in their order: the logits rows
the engine asked for are unchanged.
"""

from __future__ import annotations

from dataclasses import replace

from cake_py.models.kv_cache import Batch, SequenceSlice


def split_batch(batch: Batch, piece_tokens: int) -> list[tuple[int, int, list[SequenceSlice]]]:
    """The batch as `(first row, end row, slices)` pieces of about `piece_tokens` rows each (as even as whole rows
    allow; at least `piece_tokens` rows each, so a batch under twice that is one piece).

    A slice cut in two keeps its `copy_from` on its first part only: the copy seeds the sequence's caches once, and
    the later part continues from what the first part wrote.
    """
    total = sum(piece.n_tokens for piece in batch)
    n_pieces = max(total // max(piece_tokens, 1), 1)
    bounds = [total * index // n_pieces for index in range(n_pieces + 1)]
    pieces: list[tuple[int, int, list[SequenceSlice]]] = []
    slices = iter(batch)
    current: SequenceSlice | None = None
    for first, end in zip(bounds, bounds[1:], strict=False):
        rows, taken = end - first, []
        while rows:
            current = current or next(slices)
            if current.n_tokens <= rows:
                taken.append(current)
                rows -= current.n_tokens
                current = None
            else:  # cut: the first `rows` tokens here, the rest in the next piece
                taken.append(replace(current, n_tokens=rows))
                current = SequenceSlice(current.seq_id, current.start_pos + rows, current.n_tokens - rows)
                rows = 0
        pieces.append((first, end, taken))
    return pieces
