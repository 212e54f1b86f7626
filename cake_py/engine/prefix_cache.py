"""Prefix caching: finished sequences keep their KV caches on every stage for a while, so a later prompt that starts
with the same tokens (the next turn of a chat, a shared system prompt) copies them and computes only the rest.

This is bookkeeping only: which finished sequences are kept and what they hold. The copy itself is a stage's
`copy_from` (the first `start_pos` positions of another sequence), the same as n > 1 choices use, so it works
unchanged through workers. Kept caches are bounded by a token budget and an idle time, least recently used first;
a worker may also have dropped them (its own idle timeout, a restart), which the engine learns from a failed copy.
A model's sliding-window layers keep only the window before their last write (models/kv_layout.py): an entry is
offered only for a prefix long enough that the window before it is still held.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from cake_py.models.kv_layout import can_copy

MIN_MATCH = 16  # a shorter shared prefix saves less than it costs to look up and copy
QUANTUM = 256  # stages hold caches in whole blocks of this many positions (models/kv_cache.py): the budget counts them
IDLE_SECONDS = 300.0  # kept caches unused this long are let go (workers free idle caches after --kv-idle-seconds)


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    last_used: float
    positions: int  # what its caches take on each stage
    kept_from: int  # the first position its windowed layers still hold (0: all, or no window)
    long_rope: bool  # computed with LongRoPE's long factors: it serves only prompts computed so


class PrefixCache:
    """The finished sequences whose caches stay on every stage, by sequence id, least recently used first."""

    def __init__(
        self,
        max_tokens: int,
        *,
        min_match: int = MIN_MATCH,
        idle_seconds: float = IDLE_SECONDS,
        quantum: int = QUANTUM,
        window: int | None = None,
    ) -> None:
        self.max_tokens = max_tokens  # the budget, in positions as the stages hold them (whole blocks)
        self.min_match = max(1, min_match)
        self.idle_seconds = idle_seconds
        self.quantum = max(1, quantum)
        self.window = window  # the model's sliding window, if some of its layers have one
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self.tokens = 0  # held by all entries
        self.positions = 0  # what they take on the stages: at least each entry's tokens in whole blocks

    def _charge(self, n_tokens: int) -> int:
        return -(-max(n_tokens, 1) // self.quantum) * self.quantum

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self, seq_id: int, tokens: Sequence[int], capacity: int = 0, *, kept_from: int = 0, long_rope: bool = False
    ) -> list[int]:
        """Keep `seq_id`'s caches, which hold `tokens` in `capacity` positions (a cache grows by doubling: one of
        1,066 tokens takes 2,048; counting its tokens alone let kept caches take twice the budget; 0: its tokens in
        whole blocks), its windowed layers those from `kept_from` on, rotated with LongRoPE's long factors when
        `long_rope`; returns the ids whose caches can go now (evicted entries, or `seq_id` itself when it is not
        worth keeping)."""
        tokens = tuple(tokens)
        positions = capacity or self._charge(len(tokens))
        if len(tokens) < self.min_match or positions > self.max_tokens:
            return [seq_id]
        released = []
        for other, entry in list(self._entries.items()):
            if entry.long_rope != long_rope:  # neither serves the other's copies
                continue
            shared = _prefix_length(entry.tokens, tokens)
            # One serves every copy the other does when it holds all its tokens and its windows dropped no more.
            if shared == len(entry.tokens) and kept_from <= entry.kept_from:  # the new one holds all it holds
                released.append(self._drop(other))
            elif shared == len(tokens) and entry.kept_from <= kept_from:  # it already holds all the new one holds
                self._entries.move_to_end(other)
                entry.last_used = time.monotonic()
                return [*released, seq_id]
        self._entries[seq_id] = _Entry(tokens, time.monotonic(), positions, kept_from, long_rope)
        self.tokens += len(tokens)
        self.positions += positions
        while self.positions > self.max_tokens:
            released.append(self._drop(next(iter(self._entries))))
        return released

    def match(self, prompt: Sequence[int], *, long_rope: bool = False) -> tuple[int, int] | None:
        """(kept sequence id, positions to copy) for the entry sharing the longest prefix with `prompt`, at most all
        but its last token (whose logits are needed), among those rotated as `prompt` will be (`long_rope`); None
        below `min_match`. The entry counts as used."""
        best = self._best(prompt, long_rope)
        if best is not None:
            self._entries.move_to_end(best[0])
            self._entries[best[0]].last_used = time.monotonic()
        return best

    def shared_length(self, prompt: Sequence[int], *, long_rope: bool = False) -> int:
        """The positions `match` would copy for `prompt` (0: none), touching nothing: for ordering prefills."""
        best = self._best(prompt, long_rope)
        return 0 if best is None else best[1]

    def _best(self, prompt: Sequence[int], long_rope: bool) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None
        limit = len(prompt) - 1
        for seq_id, entry in self._entries.items():
            if entry.long_rope != long_rope:
                continue
            shared = _prefix_length(entry.tokens, prompt, limit)
            servable = can_copy(entry.kept_from, self.window, shared)  # its windows still hold what the copy needs
            if shared >= self.min_match and servable and (best is None or shared > best[1]):
                best = (seq_id, shared)
        return best

    def expired(self) -> list[int]:
        """Drop the entries idle past `idle_seconds`; returns their ids."""
        cutoff = time.monotonic() - self.idle_seconds
        return [self._drop(seq_id) for seq_id, entry in list(self._entries.items()) if entry.last_used < cutoff]

    def forget(self, seq_id: int) -> bool:
        """Drop one entry (its caches are gone or broken); whether it was kept."""
        if seq_id not in self._entries:
            return False
        self._drop(seq_id)
        return True

    def clear(self) -> list[int]:
        return [self._drop(seq_id) for seq_id in list(self._entries)]

    def _drop(self, seq_id: int) -> int:
        entry = self._entries.pop(seq_id)
        self.tokens -= len(entry.tokens)
        self.positions -= entry.positions
        return seq_id


def _prefix_length(held: Sequence[int], prompt: Sequence[int], limit: int | None = None) -> int:
    """How many leading tokens `held` and `prompt` share (at most `limit`)."""
    end = min(len(held), len(prompt), len(prompt) if limit is None else limit)
    if tuple(held[:end]) == tuple(prompt[:end]):  # the common case, a whole match, compared in C
        return end
    return next(index for index in range(end) if held[index] != prompt[index])
