"""The engine thread: continuous batching over a pipeline.

Every step the scheduler takes each running sequence's next slice (one token when decoding, a chunk of the prompt
when prefilling), runs them through the pipeline as one varlen batch, samples the sequences whose slice reached
their end, and streams the results. New requests join at the next step; finished ones free their KV caches on
every stage at once. The choices of an n > 1 request share one prefill: the later ones start from a copy of the
first one's caches (on every stage) and compute only the prompt's last token; likewise a new prompt that starts
with a finished sequence's tokens copies its kept caches (prefix caching): engine/copies.py decides both. What a
step's outputs mean for each sequence (tokens, prompt scores, embeddings) is engine/outputs.py; what it does when a
step fails or a stage goes down (retries, holding requests for a failover, handing them over) is engine/faults.py;
how requests come in (checks, queueing, cancels) is engine/submission.py. Torch runs only on this thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from itertools import count

import torch

from cake_py.cluster.pipeline import Pipeline
from cake_py.engine.admission import Admission
from cake_py.engine.copies import CopySources
from cake_py.engine.faults import ENGINE_STOPPED, Faults
from cake_py.engine.outputs import step_events
from cake_py.engine.plan import plan_step, rotated_long
from cake_py.engine.sequence import GenerationEvent, Sequence
from cake_py.engine.stats import EngineStats
from cake_py.engine.submission import Submission
from cake_py.errors import CakeError, ClusterError
from cake_py.models.device import tune_allocator
from cake_py.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Engine(Submission, Faults):
    """Owns a pipeline and a tokenizer; `submit` is thread-safe and returns at once."""

    def __init__(
        self,
        pipeline: Pipeline,
        tokenizer: Tokenizer,
        *,
        max_running: int = 16,
        max_batch_tokens: int = 512,
        max_queued: int = 1024,
        context_length: int | None = None,
        prefix_cache_tokens: int = 0,
        speculative_tokens: int = 0,
        seq_ids: Iterator[int] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.speculative_tokens = speculative_tokens  # prompt lookup drafts per decode step (engine/speculation.py)
        self.max_queued = max_queued  # sequences admitted but not running; past it submit raises OverloadedError
        self.context_length = context_length or pipeline.config.max_position_embeddings
        self.vocab_size = pipeline.config.vocab_size
        self.stats = EngineStats()
        # Engines that may hand sequences over to each other share one numbering (a sequence keeps its id).
        self._seq_ids = seq_ids if seq_ids is not None else count(1)
        self._request: int | None = None  # the request being submitted inside `submitting()`
        self._inbox: queue.SimpleQueue[Sequence | int] = queue.SimpleQueue()  # new sequences, or ids to cancel
        self._queued = 0  # sequences in the inbox (cancel requests there are not queued work)
        self._wake = threading.Event()
        # By id, in arrival order: a cancel or a finish finds its sequence at once, however long the queue.
        self._waiting: dict[int, Sequence] = {}
        self._running: dict[int, Sequence] = {}
        self._admission = Admission()  # which waiting sequences start when slots free up
        self._to_release: list[int] = []  # finished sequences that reached the pipeline: released once per step
        self._finished: list[tuple[Sequence, GenerationEvent | None]] = []  # their last events, sent after that
        # Choices copying their leader's prefill, and the finished sequences kept for prompts that start the same way.
        windows = [pipeline.config.window_of(layer) for layer in range(pipeline.config.n_layers)]
        # LongRoPE's original context: a sequence past it is computed with the long factors, all of it.
        self.long_from = pipeline.config.rope.long_from
        self.copies = CopySources(prefix_cache_tokens, self._running, self._waiting, windows, self.long_from)
        self.prefix_cache = self.copies.prefix_cache
        # The sequences of a failed step, in order: each runs alone until it has passed a step (or failed one alone),
        # so that one sequence's fault (or a batch too big for memory) ends only its own request.
        self._suspects: dict[int, None] = {}
        # Set when memory ran short: no more than this many sequences run at once until none runs.
        self._admit_below: int | None = None
        self._stopping = False
        self._dead = False  # the thread ended on an error no step handler caught
        # Held to queue a sequence, and by the engine thread for its last look at the inbox: a sequence is either
        # refused (the engine is stopping) or seen and ended by that last look, never left waiting.
        self._submit_lock = threading.RLock()  # re-entered: the last look at the inbox counts what it takes
        self._thread: threading.Thread | None = None
        # With hold_s > 0 (failover), a step that fails because a stage is down does not end its sequences: they
        # wait, for up to hold_s, to be computed again once the pipeline is whole, or on the engine that replaces
        # this one (hand_over, adopt).
        self.hold_s = 0.0
        self._held_since: float | None = None  # when the pipeline was first seen down with sequences to run
        self._handing_over = False
        self._handed: list[Sequence] | None = None  # what hand_over gives the next engine
        self._successor: Faults | None = None  # where cancels go once this engine's sequences moved there

    # ---- public, any thread ----
    def start(self) -> None:
        tune_allocator()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cake-engine", daemon=True)
            self._thread.start()

    def request_stop(self) -> None:
        """Begin stopping without waiting: every queued and running sequence ends with an ENGINE_STOPPED error
        (which its stream still delivers), and new submits are refused."""
        self._stopping = True
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop and wait for the engine thread; False if it is still inside a step after `timeout` seconds (it ends
        after that step: `join` waits for it)."""
        self.request_stop()
        return self.join(timeout)

    def close(self) -> None:
        """Stop, then close the pipeline (freeing its layers and caches on every stage). A thread still inside a
        step after stop's wait keeps its pipeline until that step ends: closing it under the step would fail the
        step's calls and leave what they reopen behind."""
        if self.stop():
            self.pipeline.close()
            return
        log.error("the engine is still inside a step; its pipeline is closed when that step ends")

        def close_after() -> None:
            self.join()
            self.pipeline.close()

        threading.Thread(target=close_after, name="cake-engine-close", daemon=True).start()

    def join(self, timeout: float | None = None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    @property
    def died(self) -> bool:
        """Whether the engine thread ended without being asked to (a bug): nothing would ever answer."""
        return self._dead or (self._thread is not None and not self._thread.is_alive() and not self._stopping)

    # ---- engine thread ----
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    try:
                        self._drain_inbox()
                        if not self._running and not self._waiting:
                            self._held_since = None
                            self._settle()
                            self._wake.wait(timeout=0.5)
                            self._wake.clear()
                            continue
                        if not (self.hold_s > 0 and self._hold()):
                            self.step()
                    except Exception:  # the engine must outlive any one bad step
                        log.exception("engine step failed")
                    self._settle()  # never raises: what it runs is guarded inside
                self._to_release += self.prefix_cache.clear()  # released by the last _settle below
                with self._submit_lock:
                    self._drain_inbox()  # sequences submitted during the last step
                    left = [*self._running.values(), *self._waiting.values()]
                    if self._handing_over:
                        self._handed = left
                        for seq in left:
                            seq.restart()
                            seq.reached_pipeline = False  # its caches go with this engine's pipeline
                        left = []
                        self._running.clear()
                        self._waiting.clear()
                stopping = ClusterError(ENGINE_STOPPED)
                for seq in left:
                    self._finish(
                        seq, GenerationEvent(seq.seq_id, finish_reason="error", error=str(stopping), exception=stopping)
                    )
                self._settle()
        except BaseException:
            log.critical("the engine thread died", exc_info=True)  # `died` turns True: /health answers 503
            self._abandon()
            raise

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Sequence):
                with self._submit_lock:
                    self._queued -= 1
                    self.copies.taken(item)
                self._waiting[item.seq_id] = item
                if not item.restarts:  # one handed over by another engine was counted there
                    self.stats.requests_total += 1
                continue
            seq = self._running.get(item) or self._waiting.get(item)
            if seq is not None and not seq.cancelled:
                seq.cancelled = True
                self._finish(seq, GenerationEvent(seq.seq_id, finish_reason="cancelled"))

    def _settle(self) -> None:
        """Free the KV caches of the sequences finished since the last call, then send their last events (a client
        that heard its answer finds its caches gone). One Release per stage, not one per sequence (each a round
        trip to a worker), and none for sequences that never reached the pipeline."""
        self._to_release += self.copies.releasable()
        if self._to_release:
            seq_ids, self._to_release = self._to_release, []
            try:
                self.pipeline.release(seq_ids)
            except CakeError as error:
                log.warning("releasing %d sequence(s) failed: %s", len(seq_ids), error)
            except Exception:  # a bug (a closed channel, …): logged; the last events below must still go out
                log.exception("releasing %d sequence(s) failed", len(seq_ids))
        finished, self._finished = self._finished, []
        for seq, event in finished:
            if event is None:
                continue
            seq.count_into(event)  # its drafts' counts are final only now (verified after its last token)
            try:
                seq.sink(seq.with_prompt_logprobs(event))
            except Exception:
                log.exception("event sink of sequence %d failed", seq.seq_id)

    def step(self) -> None:
        """One scheduler step: decode every running sequence, prefill what fits, sample, stream."""
        self._admit()
        self.stats.running, self.stats.waiting = len(self._running), len(self._waiting)
        suspect = self._take_suspect()  # it runs alone now (or waits, unplanned, for the prefill it copies)
        candidates = [suspect] if suspect is not None else self._running.values()
        self.copies.new_step()
        plan = plan_step(
            candidates,
            self.max_batch_tokens,
            self.copies.source,
            self.speculative_tokens,
            self.copies.prefill_left,
            self.long_from,
        )
        if not plan.batch:
            return
        batch, members = plan.batch, plan.members
        for seq in members:
            seq.reached_pipeline = True  # from here a stage may hold its caches, even if the step fails
        began = time.perf_counter()
        try:
            ids = torch.tensor(plan.ids, dtype=torch.long)
            logits, hidden = self.pipeline.run(ids, batch, plan.head_rows, plan.hidden_rows)
        except Exception as error:  # a failed step ends its own sequences, never the engine or other requests
            self._failed_step(error, batch, members)
            return
        for piece, seq in zip(batch, members, strict=True):
            seq.n_cached = piece.start_pos + piece.n_tokens
            self.copies.wrote(seq, piece)
            if piece.seq_id in self.copies.prefix_copies:
                seq.cached_tokens = piece.start_pos  # prompt tokens a kept cache gave it (usage's cached_tokens)
                self.stats.prefix_cached_tokens += piece.start_pos
        try:
            events = step_events(plan, logits, hidden, self.stats)
        finally:
            for seq in members:
                if seq.drafts:  # positions past the last kept draft hold rejected guesses: the next slice rewrites them
                    seq.n_cached = min(seq.n_cached, seq.n_tokens - 1)
                    seq.drafts = []
        # Counted before anyone hears of them: a client that got its last token then reads the stats sees it.
        prompt_tokens = sum(  # the slices' overlap with their prompts (a prefill's last token is a prompt token)
            max(0, min(piece.start_pos + piece.n_tokens, len(seq.prompt_ids)) - piece.start_pos)
            for piece, seq in zip(batch, members, strict=True)
        )
        generated = sum(len(event.tokens) for _, event in events)
        self.stats.record_step(generated, prompt_tokens, time.perf_counter() - began)
        for seq, event in events:
            if seq.seq_id not in self._running:  # its consumer broke on an earlier event of this step: it is over
                continue
            if event.finished:
                self._finish(seq, event)
            else:
                self._emit(seq, event)
                self._past_original_context(seq)
        self._settle()

    def _past_original_context(self, seq: Sequence) -> None:
        """A sequence computed within LongRoPE's original context that has just passed it is computed again from its
        start, all of it with the long factors, as transformers' Phi-3 `generate` does: its cached keys were rotated
        with the short ones, which the long queries would misread. Its next slice rewrites its caches from position
        0 (as a failover's restart does): released, its id's caches would be freed again by a release a stage got
        late (RemoteStage frees a failed Release at its next ping), after its new slices."""
        if seq.rope_long or not seq.n_cached or not rotated_long(self.long_from, seq.n_tokens):
            return
        if seq.seq_id not in self._running:  # its consumer broke on this event: it is over, its caches released
            return
        seq.restart(fault=False)

    def _admit(self) -> None:
        """Start waiting sequences while there is room, in the order engine/admission.py gives."""
        room = self.max_running - len(self._running)
        if self._admit_below is not None:  # memory ran short with this many running (faults.py): no more run at once
            if self._running:
                room = min(room, self._admit_below - len(self._running))
            else:
                self._admit_below = None  # all have finished: memory is as free as it gets
        if room <= 0 or not self._waiting:
            return
        for seq in self._admission.pick(self._waiting.values(), self._running.values(), room):
            del self._waiting[seq.seq_id]
            self._running[seq.seq_id] = seq

    def _emit(self, seq: Sequence, event: GenerationEvent) -> None:
        try:
            seq.sink(seq.with_prompt_logprobs(event))
        except Exception:  # a broken consumer cancels its own sequence, nothing else
            log.exception("event sink of sequence %d failed", seq.seq_id)
            seq.cancelled = True
            self._finish(seq, None)

    def _finish(self, seq: Sequence, event: GenerationEvent | None) -> None:
        """Take a sequence out of the schedule; `_settle` releases its caches (unless they are kept: engine/copies.py)
        and then sends `event`."""
        self._running.pop(seq.seq_id, None)
        self._waiting.pop(seq.seq_id, None)
        self._to_release += self.copies.finished(seq, event)
        self._finished.append((seq, event))
