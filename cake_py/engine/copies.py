"""Which caches a sequence's first slice copies instead of computing, and which finished sequences keep theirs.

- The choices of an n > 1 request (and repeated prompts of one batch) share one prefill: a choice waits while its
  leader prefills, then copies the leader's caches on every stage and computes only the prompt's last token. A
  leader that finishes before every choice has copied it keeps its caches until then.
- Prefix caching: a finished sequence's caches stay for a while (engine/prefix_cache.py), and a new prompt that
  starts with its tokens copies them.
A sliding-window layer's caches hold only the window before their last write (models/kv_layout.py): each
sequence's layouts are followed here, step by step, so that a copy is offered only where they still hold what it
needs, and kept caches are counted at what they take.
Engine-thread bookkeeping only (plus a count the submitting threads update under the engine's submit lock).
"""

from __future__ import annotations

from collections.abc import Sequence as Listing

from cake_py.engine.plan import rotated_long
from cake_py.engine.prefix_cache import PrefixCache
from cake_py.engine.sequence import GenerationEvent, Sequence
from cake_py.models.kv_cache import Batch, SequenceSlice
from cake_py.models.kv_layout import after_copy, after_write, can_copy, copied_capacity, grown_capacity


class CopySources:
    def __init__(
        self,
        prefix_cache_tokens: int,
        running: dict[int, Sequence],
        waiting: dict[int, Sequence],
        windows: Listing[int | None] = (),
        long_from: int | None = None,
    ) -> None:
        self.running, self.waiting = running, waiting  # the engine's own schedule
        # The model's sliding window (its windowed layers share one), and how many of its layers have it.
        self.window = next((window for window in windows if window is not None), None)
        if any(window not in (None, self.window) for window in windows):
            raise ValueError(f"sliding windows of different sizes ({sorted({w for w in windows if w})}) in one model")
        self.n_layers, self.n_windowed = max(len(windows), 1), sum(window is not None for window in windows)
        self.prefix_cache = PrefixCache(prefix_cache_tokens, window=self.window)  # 0 tokens: nothing is kept
        # LongRoPE's original context: caches computed for a sequence past it (its long factors) serve only
        # sequences past it, and those computed within it only sequences within it.
        self.long_from = long_from
        # Finished sequences whose prefill other choices still wait to copy: released once none does.
        self.kept_for_copies: dict[int, Sequence] = {}
        self.inbox_copies: dict[int, int] = {}  # leader id → choices still in the inbox that will copy it
        self.prefix_copies: dict[int, int] = {}  # sequence → the kept one its first slice copies, this step

    # ---- a choice on its way to the engine (under the submit lock) ----
    def queued(self, seq: Sequence) -> None:
        if seq.leader is not None:
            self.inbox_copies[seq.leader] = self.inbox_copies.get(seq.leader, 0) + 1

    def taken(self, seq: Sequence) -> None:
        if seq.leader is not None:
            left = self.inbox_copies.pop(seq.leader, 1) - 1
            if left:
                self.inbox_copies[seq.leader] = left

    # ---- planning a step ----
    def new_step(self) -> None:
        self.prefix_copies.clear()

    def source(self, seq: Sequence) -> int | None:
        """The sequence whose caches `seq`'s first slice copies: its leader's prefill (n > 1 choices), else the kept
        sequence sharing the longest prefix with its prompt (prefix caching); 0 while the leader's prefill runs."""
        shared = self._shared_prefill(seq)
        if shared is not None or seq.n_cached or seq.leader is not None or seq.reads_every_prompt_row:
            return shared
        match = self.prefix_cache.match(seq.prompt_ids, long_rope=self._long(seq))
        if match is None:
            return None
        kept, seq.n_cached = match
        self.prefix_copies[seq.seq_id] = kept
        return kept

    def prefill_left(self, seq: Sequence) -> int:
        """The prompt tokens `seq` has yet to compute (0 once it decodes), counting what its first slice would copy
        (a choice: all but the last token; a later turn: its kept prefix) before `source` has looked: prefills are
        ordered by it, and a follow-up turn with a long history computes only its new tokens."""
        if not seq.prefilling:
            return 0
        if seq.n_cached:
            copied = seq.n_cached
        elif seq.leader is not None:
            copied = len(seq.prompt_ids) - 1
        elif seq.reads_every_prompt_row:
            copied = 0
        else:
            copied = self.prefix_cache.shared_length(seq.prompt_ids, long_rope=self._long(seq))
        return len(seq.prompt_ids) - copied

    def _long(self, seq: Sequence) -> bool:
        """Whether `seq`, computed from its start now, is computed with LongRoPE's long factors (engine/plan.py)."""
        return rotated_long(self.long_from, seq.n_tokens)

    def _shared_prefill(self, seq: Sequence) -> int | None:
        """For a sequence that shares its leader's prefill and has not started: the leader's id once that prefill is
        done (this sequence then holds all but the prompt's last token, copied), 0 while it runs, None when there is
        nothing to share (the leader is gone, or its prompt differs): the sequence prefills alone."""
        if seq.leader is None or seq.n_cached:
            return None
        leader = self.running.get(seq.leader) or self.kept_for_copies.get(seq.leader)
        shared = len(seq.prompt_ids) - 1
        if leader is None or leader.prompt_ids != seq.prompt_ids or shared < 1:
            seq.leader = None
            return None
        if leader.n_cached < shared:
            return 0
        if leader.rope_long != self._long(seq):  # computed again past LongRoPE's original context since
            seq.leader = None
            return None
        if not can_copy(leader.windowed.start, self.window, shared):  # its windowed layers dropped what is needed
            seq.leader = None
            return None
        kept = self.prefix_copies.get(leader.seq_id)
        if kept is not None:  # the leader copies a kept prefix in this very step (stages hold none of it yet)
            seq.n_cached = shared
            self.prefix_copies[seq.seq_id] = kept
            return kept
        seq.n_cached = shared
        return leader.seq_id

    def drop_prefixes(self, batch: Batch, members: list[Sequence]) -> list[int]:
        """After a failed step that copied kept prefixes: every kept cache is let go (a stage that lost one, restarted
        or reassigned, lost them all: dropping only those matched would fail a step per entry), and every sequence of
        the step runs it again, the copying ones from scratch. That retry copies nothing, so it fails at most once
        more, on the usual path. Returns the ids to release."""
        for piece, seq in zip(batch, members, strict=True):
            if piece.copy_from is not None:
                seq.n_cached = 0
        self.prefix_copies.clear()
        return self.prefix_cache.clear()

    # ---- the stages' caches ----
    def wrote(self, seq: Sequence, piece: SequenceSlice) -> None:
        """A step wrote `piece` of `seq` on every stage: its caches' layouts follow (the stages' own, step for step:
        models/kv_layout.py). Where a stage's window dropped less (a replayed decode step drops nothing until its
        buffer is full), it holds more than followed here: a copy offered is always one it can serve."""
        end = piece.start_pos + piece.n_tokens
        if piece.copy_from is not None:  # its caches start as a copy, just large enough
            seq.capacity = copied_capacity(piece.start_pos)
            seq.windowed = after_copy(self.window, piece.start_pos)
        seq.capacity = grown_capacity(seq.capacity, end)
        if self.window is not None:
            seq.windowed = after_write(seq.windowed, self.window, piece.start_pos, end)

    def _taken(self, seq: Sequence) -> int:
        """The positions its caches take on each stage, averaged over the model's layers (windowed ones take less)."""
        full = (self.n_layers - self.n_windowed) * seq.capacity + self.n_windowed * seq.windowed.capacity
        return -(-full // self.n_layers)

    # ---- finished sequences ----
    def finished(self, seq: Sequence, event: GenerationEvent | None) -> list[int]:
        """A sequence left the schedule: the ids whose caches can go now (its own, unless it is kept for choices
        that still copy it or for later prompts, and any kept entry it pushed out)."""
        copyable = event is not None and not event.error and not seq.prefilling
        done = event is not None and event.finish_reason in ("stop", "length")
        if copyable and self.awaited(seq.seq_id):
            self.kept_for_copies[seq.seq_id] = seq
            return []
        if seq.reached_pipeline and done and seq.pooled is None:
            # Kept for a later prompt that starts the same way; a cancelled one frees its caches at once. Embeddings
            # are not kept: indexing a corpus would push out every chat's history.
            kept = seq.all_ids[: seq.n_cached]
            return self.prefix_cache.add(
                seq.seq_id, kept, self._taken(seq), kept_from=seq.windowed.start, long_rope=seq.rope_long
            )
        return [seq.seq_id] if seq.reached_pipeline else []

    def releasable(self) -> list[int]:
        """Kept caches that can go now: prefixes idle too long, and leaders every choice has copied (or left)."""
        ids = self.prefix_cache.expired()
        for leader_id in [leader_id for leader_id in self.kept_for_copies if not self.awaited(leader_id)]:
            del self.kept_for_copies[leader_id]
            ids.append(leader_id)
        return ids

    def awaited(self, leader_id: int) -> bool:
        """Whether a choice still waits to copy this sequence's prefill (queued, or not yet seen in the inbox)."""
        if self.inbox_copies.get(leader_id):
            return True
        return any(
            seq.leader == leader_id and not seq.n_cached for seq in (*self.running.values(), *self.waiting.values())
        )
