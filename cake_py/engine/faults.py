"""What the engine does when things fail (the Engine class mixes this in; engine.py keeps the schedule):

- A failed step ends only the sequences at fault: a batch that failed runs again one sequence at a time, and a copy
  of kept prefixes a stage lost is dropped and the step tried again. A stage short of memory for KV caches gets the
  kept prefixes' memory first (they are dropped and the step tried again); then the sequence that cannot grow waits
  for a running one to finish and is computed again (`_preempt`), or ends if it runs alone.
- With `hold_s` (failover), a stage that goes down does not end the requests it was serving: they wait for it, or
  move to the engine that replaces this one (`hand_over`, `adopt`), and are computed again from their first token.
  One restarted MAX_RESTARTS times ends instead (a worker that crashes on every forward).
- A dying engine thread still gives every sequence a last event (`_abandon`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from cake_py.cluster.pipeline import Pipeline
from cake_py.engine.copies import CopySources
from cake_py.engine.sequence import GenerationEvent, Sequence
from cake_py.engine.stats import EngineStats
from cake_py.errors import CakeError, ClusterError, KVMemoryError
from cake_py.models.kv_cache import Batch

log = logging.getLogger(__name__)

ENGINE_STOPPED = "the engine stopped: the server is shutting down or switching models"
ENGINE_DEAD = "the engine thread died (see the server log); restart the server"
HOLD_CHECK_S = 0.5  # how often held sequences look whether the pipeline is whole again
# A sequence computed again this many times (a stage that keeps going down, perhaps because of this very request)
# ends with the error instead of being held once more.
MAX_RESTARTS = 3


def _short_of_memory(error: Exception) -> bool:
    """Whether a step failed for memory: a stage's KV caches could not grow (a worker's error arrives as text), or a
    GPU's allocator ran out."""
    text = str(error)
    return KVMemoryError.MARK in text or "CUDA out of memory" in text


class Faults:
    """The engine's fault handling; the state it reads and changes is the Engine's own (engine.py sets it up)."""

    pipeline: Pipeline
    copies: CopySources
    hold_s: float
    _running: dict[int, Sequence]
    _waiting: dict[int, Sequence]
    _suspects: dict[int, None]
    _to_release: list[int]
    _finished: list[tuple[Sequence, GenerationEvent | None]]
    _held_since: float | None
    _handing_over: bool
    _handed: list[Sequence] | None
    _successor: Faults | None
    _submit_lock: threading.RLock
    _inbox: queue.SimpleQueue[Sequence | int]
    _queued: int
    _wake: threading.Event
    _stopping: bool
    _dead: bool
    _admit_below: int | None
    stats: EngineStats

    @property
    def held(self) -> int:
        """Sequences waiting while a stage is down (for it, or for a failover); 0 when none is."""
        return len(self._running) + len(self._waiting) if self._held_since is not None else 0

    if TYPE_CHECKING:  # the Engine's

        def _finish(self, seq: Sequence, event: GenerationEvent | None) -> None: ...
        def request_stop(self) -> None: ...
        def join(self, timeout: float | None = None) -> bool: ...
        def cancel(self, seq_id: int) -> None: ...

    def _failed_step(self, error: Exception, batch: Batch, members: list[Sequence]) -> None:
        """A step failed: a copy of kept prefixes a stage lost is dropped and the step tried again; a step of several
        sequences runs again one by one (one sequence's fault, or a batch too big for memory, ends only its own
        request); with a stage down, its sequences are held (hold_s) or end with the error."""
        if not isinstance(error, CakeError):
            log.exception("forward pass failed")
            error = CakeError(f"internal error in the forward pass: {type(error).__name__}: {error}")
        if _short_of_memory(error) and len(self.copies.prefix_cache) and not self.pipeline.down_stages():
            # Kept prefixes are the memory to give up first: the running sequences need it more.
            log.warning("a step ran out of memory for KV caches: the kept prefixes are dropped, the step retried")
            self._to_release += self.copies.drop_prefixes(batch, members)
            return
        if self.copies.prefix_copies and not self.pipeline.down_stages():
            # A kept cache a stage no longer holds (its idle timeout, a restart: then it lost them all).
            log.warning(
                "a step copying kept prefixes failed (%s): the kept caches are dropped, the step retried", error
            )
            self._to_release += self.copies.drop_prefixes(batch, members)
            return
        if len(members) == 1 and _short_of_memory(error) and self._preempt(members[0], error):
            return
        if len(members) > 1 and not self.pipeline.down_stages():
            log.warning("a step of %d sequences failed (%s): each runs alone once", len(members), error)
            self._retry_alone(batch, members)
            return
        if self.hold_s > 0 and self.pipeline.down_stages():  # computed again once the pipeline is whole
            log.warning("a stage is down (%s): %d sequence(s) wait for it, or for a failover", error, len(members))
            self._held_since = time.monotonic()  # so _hold does not restart them a second time
            for seq in list(self._running.values()):  # the others of the step's sequences lost theirs too
                self._restart(seq, error)
            return
        if _short_of_memory(error):  # the operator's to know: the host is too small for what is asked of it
            log.warning("%d sequence(s) end, no memory to wait for: %s", len(members), error)
        for seq in members:
            self._finish(seq, GenerationEvent(seq.seq_id, finish_reason="error", error=str(error), exception=error))

    def _hold(self) -> bool:
        """While a stage is down, wait (cancels still end their sequences); after hold_s, end every sequence with
        why. True while holding."""
        down = self.pipeline.down_stages()
        if not down:
            self._held_since = None
            return False
        now = time.monotonic()
        if self._held_since is None:
            self._held_since = now
            # A stage that went down lost its caches (a worker that restarts comes back without them), whether or
            # not a step failed on it: every running sequence is computed again once the pipeline is whole.
            error = ClusterError(f"pipeline stage(s) down: {', '.join(down)}")
            for seq in list(self._running.values()):
                self._restart(seq, error)
        elif now - self._held_since > self.hold_s:
            error = ClusterError(f"pipeline stage(s) down for over {self.hold_s:.0f} s: {', '.join(down)}")
            for seq in [*self._running.values(), *self._waiting.values()]:
                self._finish(seq, GenerationEvent(seq.seq_id, finish_reason="error", error=str(error), exception=error))
            self._held_since = None
            return True
        self._wake.wait(HOLD_CHECK_S)
        self._wake.clear()
        return True

    def _restart(self, seq: Sequence, error: CakeError) -> None:
        """Compute a sequence again from its first token, or end it with `error` once it has been MAX_RESTARTS times
        (a stage that goes down again and again must not hold a request for ever)."""
        if seq.restarts >= MAX_RESTARTS:
            self._finish(seq, GenerationEvent(seq.seq_id, finish_reason="error", error=str(error), exception=error))
            return
        seq.restart()

    def _preempt(self, seq: Sequence, error: CakeError) -> bool:
        """A sequence that failed alone for memory while others run waits for one of them to finish, its caches let
        go, and is then computed again from its first token (vLLM's preemption by recomputation; its output so far is
        kept, nothing is sampled twice). No other sequence starts meanwhile, and until the engine is idle again no
        more than those others run at once (what memory held when it ran short). False where it cannot wait: it runs
        alone (its memory will not come from anyone), a choice waits to copy its prefill, a stage is down, or it was
        computed again MAX_RESTARTS times."""
        if (
            len(self._running) < 2
            or seq.restarts >= MAX_RESTARTS
            or self.copies.awaited(seq.seq_id)
            or self.pipeline.down_stages()
        ):
            return False
        log.warning(
            "sequence %d waits for memory for its KV caches (%s): %d other(s) run", seq.seq_id, error,
            len(self._running) - 1,
        )  # fmt: skip
        seq.restart()
        self.stats.preemptions += 1
        seq.reached_pipeline = False
        del self._running[seq.seq_id]
        self._waiting[seq.seq_id] = seq
        self._to_release.append(seq.seq_id)
        # Nothing starts until one of those has finished, and no more run at once until the engine is idle.
        running = len(self._running)
        self._admit_below = running if self._admit_below is None else min(self._admit_below, running)
        return True

    def _take_suspect(self) -> Sequence | None:
        """The first sequence of a failed step still running (finished or cancelled ones are skipped), to be run
        alone; taken off the list."""
        while self._suspects:
            seq_id = next(iter(self._suspects))
            del self._suspects[seq_id]
            seq = self._running.get(seq_id)
            if seq is not None:
                return seq
        return None

    def _retry_alone(self, batch: Batch, members: list[Sequence]) -> None:
        """After a failed step of several sequences (no stage down): each runs its slice again alone. Stages that
        ran the failed step rewrite the same positions (workers accept a slice that starts before what they hold);
        a sequence that was to start as a copy of another's prefill is planned as a copy again, which replaces
        whatever a stage had copied."""
        for piece, seq in zip(batch, members, strict=True):
            if piece.copy_from is not None:
                seq.n_cached = 0
        self._suspects.update(dict.fromkeys(seq.seq_id for seq in members))

    def hand_over(self, timeout: float = 60.0) -> list[Sequence]:
        """Stop, and give back every sequence not finished instead of ending it, each to be computed again from its
        first token (its output so far is kept: nothing is sampled twice) on the engine that replaces this one
        (`adopt`). [] if the thread is still inside a step after `timeout` (it then ends them itself)."""
        self._handing_over = True
        self.request_stop()
        self.join(timeout)
        with self._submit_lock:
            handed, self._handed = self._handed, []
            self._handing_over = False  # a thread still inside its step ends its sequences as a stop does
        return handed or []

    def adopt(self, sequences: list[Sequence], predecessor: Faults | None) -> None:
        """Go on with the sequences `predecessor.hand_over()` gave; cancels sent to it from now on come here."""
        with self._submit_lock:
            if self._stopping:
                raise ClusterError(ENGINE_STOPPED)
            for seq in sequences:
                self._queued += 1
                self._inbox.put(seq)
        if predecessor is not None:
            with predecessor._submit_lock:
                predecessor._successor = self
                cancels = []
                while True:  # cancels that reached it after it stopped
                    try:
                        item = predecessor._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, int):
                        cancels.append(item)
            for seq_id in cancels:
                self.cancel(seq_id)
        self._wake.set()

    def _abandon(self) -> None:
        """The thread is dying: every sequence it knows still gets a last event, so no request waits for ever."""
        dead = ClusterError(ENGINE_DEAD)
        with self._submit_lock:
            self._dead = self._stopping = True  # refuse new work from here on
            try:
                while True:
                    item = self._inbox.get_nowait()
                    if isinstance(item, Sequence):
                        self._waiting[item.seq_id] = item
            except queue.Empty:
                pass
            self._queued = 0
        pending = [seq for seq, event in self._finished if event is not None]
        events = [event for _, event in self._finished if event is not None]
        self._finished = []
        for seq in [*self._running.values(), *self._waiting.values()]:
            pending.append(seq)
            events.append(GenerationEvent(seq.seq_id, finish_reason="error", error=str(dead), exception=dead))
        self._running.clear()
        self._waiting.clear()
        for seq, event in zip(pending, events, strict=True):
            try:
                seq.sink(event)
            except Exception:
                log.exception("event sink of sequence %d failed", seq.seq_id)
