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
from cake_py.models.kv_layout import kept_from


def split_batch(
    batch: Batch, piece_tokens: int, window: int | None = None
) -> list[tuple[int, int, list[SequenceSlice]]]:
    """The batch as `(first row, end row, slices)` pieces of about `piece_tokens` rows each (as even as whole rows
    allow; at least `piece_tokens` rows each, so a batch under twice that is one piece).

    A slice cut in two keeps its `copy_from` on its first part only: the copy seeds the sequence's caches once, and
    the later part continues from what the first part wrote.

    With a sliding `window`, a slice is cut only where its later part drops no more of the window's oldest positions
    than the whole slice does (models/kv_layout.py): a worker cannot tell a part from a step, and a step run again
    (or speculative drafts rewritten) starts where the slice started, reading the window before it. Where the even cut
    would drop more, the slice stays whole in its piece, and the rest of the batch is cut evenly after it.
    """
    total = sum(piece.n_tokens for piece in batch)
    ends = _ends(0, total, piece_tokens)
    pieces: list[tuple[int, int, list[SequenceSlice]]] = []
    slices = iter(batch)
    current: SequenceSlice | None = None
    row = 0
    while ends:
        end, first, taken = ends.pop(0), row, []
        while row < end:
            current = current or next(slices)
            rows = end - row
            if current.n_tokens <= rows:
                taken.append(current)
                row += current.n_tokens
                current = None
            elif _cuttable(current, rows, window):  # the first `rows` tokens here, the rest in the next piece
                whole = current.extent  # both parts are computed for the sequence the whole slice was (LongRoPE)
                taken.append(replace(current, n_tokens=rows, rope_end=whole))
                current = SequenceSlice(current.seq_id, current.start_pos + rows, current.n_tokens - rows, None, whole)
                row = end
            else:  # whole, past this piece's planned end; what is left is cut again, or joins it when short
                taken.append(current)
                row += current.n_tokens
                current = None
                if total - row < piece_tokens:
                    end, ends = total, []
                else:
                    ends = _ends(row, total, piece_tokens)
        pieces.append((first, row, taken))
    return pieces


def _ends(first: int, total: int, piece_tokens: int) -> list[int]:
    """The end rows of even pieces of at least `piece_tokens` rows over rows [first, total)."""
    n_pieces = max((total - first) // max(piece_tokens, 1), 1)
    return [first + (total - first) * index // n_pieces for index in range(1, n_pieces + 1)]


def _cuttable(piece: SequenceSlice, rows: int, window: int | None) -> bool:
    """Whether `piece` may be cut after its first `rows` tokens: its later part keeps what the whole slice keeps."""
    return kept_from(window, piece.start_pos + rows) == kept_from(window, piece.start_pos)
