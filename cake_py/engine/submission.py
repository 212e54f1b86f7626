"""The engine's public side for requests (the Engine class mixes this in; engine.py runs the schedule): checking a
prompt against the context, queueing its sequences (one request's together, so its choices start in one step),
cancelling, and the counts other threads read. Every method here is safe from any thread: a sequence reaches the
engine thread through its inbox, under the submit lock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from itertools import count
from typing import TYPE_CHECKING

from cake_py.cluster.pipeline import Pipeline
from cake_py.engine.copies import CopySources
from cake_py.engine.faults import ENGINE_DEAD, ENGINE_STOPPED, Faults
from cake_py.engine.sequence import EventSink, GenerationEvent, Sequence
from cake_py.engine.stats import EngineStats
from cake_py.errors import ClusterError, ContextLengthError, OverloadedError, RequestError
from cake_py.models.sampling import SamplingParams
from cake_py.models.tokenizer import Tokenizer

# Requests are numbered for fairness between them, across engines: a request handed over to the engine that
# replaces its own (failover) stays apart from that engine's own.
_REQUEST_IDS = count(1)


class Submission:
    """Requests in, counts out; the state it reads and changes is the Engine's own (engine.py sets it up)."""

    pipeline: Pipeline
    tokenizer: Tokenizer
    copies: CopySources
    stats: EngineStats
    context_length: int
    vocab_size: int
    max_queued: int
    max_running: int
    _seq_ids: Iterator[int]
    _request: int | None
    _inbox: queue.SimpleQueue[Sequence | int]
    _queued: int
    _wake: threading.Event
    _waiting: dict[int, Sequence]
    _running: dict[int, Sequence]
    _submit_lock: threading.RLock
    _stopping: bool
    _successor: Faults | None  # where cancels go once this engine's sequences moved there

    if TYPE_CHECKING:  # the Engine's

        @property
        def died(self) -> bool: ...

    def check_prompt(self, n_prompt: int, params: SamplingParams) -> SamplingParams:
        """Raise ContextLengthError when the prompt alone fills the context; clip max_tokens to what is left."""
        if n_prompt == 0:
            raise RequestError("the prompt is empty")
        room = self.context_length - n_prompt
        if room < 0 or (room == 0 and params.pooling is None):  # an embedding needs no room for an answer
            capped = self.context_length < self.pipeline.config.max_position_embeddings
            limit = "the server's --max-model-len is" if capped else "the model's context is"
            if room == 0:  # it fits, with no room left for a single token of the answer
                raise ContextLengthError(
                    f"the prompt has {n_prompt} tokens, which fills {limit.replace(' is', '')} of "
                    f"{self.context_length} tokens: no room is left for the answer"
                )
            raise ContextLengthError(f"the prompt has {n_prompt} tokens but {limit} {self.context_length} tokens")
        if params.max_tokens > room:
            params = replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
        return params

    @contextmanager
    def submitting(self) -> Iterator[None]:
        """Submit several sequences as one request: the engine sees them all at once, so they start in one step
        (and choices find the prefill they copy)."""
        with self._submit_lock:  # the engine thread takes it for each sequence it takes from the inbox
            outer, self._request = self._request, self._request or next(_REQUEST_IDS)
            try:
                yield
            finally:
                self._request = outer

    def check_room(self, count: int) -> None:
        """Whether a request of `count` sequences may queue now: OverloadedError while more than `max_queued` would
        be left waiting for a slot (retry later), RequestError if they could never fit. Sequences that free slots
        take at once do not wait: a burst on an idle server was refused past --max-queue though every one would
        start in the next step. Submit them with `queue_checked=True`."""
        if count > self.max_queued + self.max_running:
            raise RequestError(
                f"the request needs {count} sequences (prompts × n) but at most {self.max_running} run and "
                f"{self.max_queued} wait to start (--max-running, --max-queue): send fewer at once"
            )
        free = max(0, self.max_running - len(self._running))
        if self.queue_depth + count - free > self.max_queued:
            raise OverloadedError(
                f"the server is busy: {max(0, self.queue_depth - free)} sequences are waiting to start (--max-queue "
                f"{self.max_queued}); retry shortly"
            )

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: EventSink,
        *,
        queue_checked: bool = False,
        share_prefill_with: int | None = None,
    ) -> int:
        """Queue a generation; events go to `sink` from the engine thread. Returns the sequence id.

        `share_prefill_with` names an earlier sequence with the same prompt (another choice of an n > 1 request):
        once its prefill is done, this one starts from a copy of its caches on every stage and computes only the
        prompt's last token, for its own first sample. RequestError for a bad prompt, OverloadedError when
        `max_queued` sequences already wait (unless the request passed `check_room` as a whole), ClusterError when
        the engine is stopping or its thread died."""
        params = self.check_prompt(len(prompt_ids), params)
        bad = next((token for token in prompt_ids if not 0 <= token < self.vocab_size), None)
        if bad is not None:  # it would fail the embedding lookup of the whole batch it joins
            raise RequestError(f"token id {bad} is outside the model's vocabulary (0-{self.vocab_size - 1})")
        seq = Sequence(next(self._seq_ids), list(prompt_ids), params, self.tokenizer, sink)
        if not seq.reads_every_prompt_row:  # a copied prefill scores and pools nothing
            seq.leader = share_prefill_with
        with self._submit_lock:
            if self.died:
                raise ClusterError(ENGINE_DEAD)
            if self._stopping:
                raise ClusterError(ENGINE_STOPPED)
            if not queue_checked:
                self.check_room(1)
            seq.request = self._request or next(_REQUEST_IDS)
            self.copies.queued(seq)
            self._queued += 1
            self._inbox.put(seq)
        self._wake.set()
        return seq.seq_id

    def cancel(self, seq_id: int) -> None:
        with self._submit_lock:  # not lost between this engine and the one its sequences moved to
            successor = self._successor
            if successor is None:
                self._inbox.put(seq_id)
                self._wake.set()
                return
        successor.cancel(seq_id)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationEvent]:
        """Blocking iterator over one generation's events (for the CLI and tests)."""
        events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        seq_id = self.submit(prompt_ids, params, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if event.finished:
                    return
        finally:
            self.cancel(seq_id)  # a no-op when it already finished; frees caches when the caller stopped early

    def running(self) -> list[Sequence]:
        """The sequences holding a slot now, for a look from another thread (llama.cpp's /slots): a copy, which
        the engine thread may outdate at its next step."""
        for _ in range(3):
            try:
                return list(self._running.values())
            except RuntimeError:  # the engine thread changed the schedule during the copy: look again
                continue
        return []

    def tokens_per_second(self) -> float:
        """Generated tokens/s over the last 5 s; 0 once the engine has been idle that long."""
        return self.stats.current_rate()

    @property
    def in_flight(self) -> int:
        """Sequences running or waiting to start, those submitted during the step in progress included (still in the
        inbox): never fewer than `queue_depth`."""
        return len(self._running) + self.queue_depth

    @property
    def queue_depth(self) -> int:
        """Sequences admitted but not yet running (fresh, unlike stats.waiting, which is set once per step)."""
        return len(self._waiting) + self._queued
