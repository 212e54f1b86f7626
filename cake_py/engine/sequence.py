"""One generation request as the engine tracks it, and the events it streams back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cake_py.engine.speculation import PredictionLookup, PromptLookup
from cake_py.errors import CakeError
from cake_py.models.detokenizer import IncrementalDecoder
from cake_py.models.kv_layout import Layout
from cake_py.models.pooling import PoolingState
from cake_py.models.sampling import SampledToken, Sampler, SamplingParams, StopMatcher
from cake_py.models.tokenizer import Tokenizer


@dataclass
class GenerationEvent:
    """Emitted by the engine thread: a text delta, and on the last event the finish reason (or an error)."""

    seq_id: int
    text: str = ""
    tokens: list[SampledToken] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    # vLLM's: with finish_reason "stop", the stop string reached or the stop_token_ids token drawn (None for EOS).
    stop_reason: str | int | None = None
    error: str | None = None
    exception: CakeError | None = None  # what failed, so each surface can map it to its own status
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose caches were copied from a kept sequence (prefix caching)
    # With SamplingParams.prediction: drafted from it and kept, and drafted from it and computed in vain.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # With SamplingParams.prompt_logprobs, on the sequence's first event: prompt tokens 1… with their logprobs.
    prompt_logprobs: list[SampledToken] | None = None
    # With SamplingParams.pooling, on the last event: the embedding, little-endian float32 bytes.
    embedding: bytes | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


EventSink = Callable[[GenerationEvent], None]


class Sequence:
    """Prompt, generated tokens, sampling state and how far its KV caches have been filled."""

    def __init__(
        self, seq_id: int, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer, sink: EventSink
    ) -> None:
        self.seq_id = seq_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stop = StopMatcher(params.stop)
        # ignore_eos drops the model's end tokens only: ids the request itself asks to stop at still stop it.
        self.stop_ids = (frozenset() if params.ignore_eos else tokenizer.eos_token_ids) | params.stop_token_ids
        grammar = params.grammar.start() if params.grammar is not None else None
        self.sampler = Sampler(params, self.stop_ids, grammar)
        self.output_ids: list[int] = []
        # prompt + output, grown in place: the scheduler and sampler read it every step, so it is never rebuilt.
        self.all_ids: list[int] = list(prompt_ids)
        self.n_cached = 0  # tokens whose keys/values every stage holds
        self.rope_long = False  # its caches were computed with LongRoPE's long factors (engine/plan.py)
        self.capacity = 0  # positions the stages' caches of it take (they grow by doubling: models/kv_layout.py)
        self.windowed = Layout()  # what the caches of its sliding-window layers hold, if the model has any
        self.cached_tokens = 0  # prompt tokens copied from a kept sequence instead of computed
        self.reached_pipeline = False  # a step included it: stages may hold caches to release
        self.prompt_logprobs: list[SampledToken] | None = [] if params.prompt_logprobs else None
        self.prompt_logprobs_sent = False
        self.pooled = PoolingState(params.pooling) if params.pooling is not None else None  # an embedding's rows
        # A sequence with the same prompt whose prefill this one copies instead of repeating (see Engine.submit).
        self.leader: int | None = None
        self.request = 0  # the request it belongs to (the engine starts requests' sequences fairly)
        self.passed_over = 0  # steps in a row its prefill got none of the budget (engine/plan.py ages it)
        self.lookup: PromptLookup | None = None  # prompt lookup decoding's index, made on the first draft
        self.prediction: PredictionLookup | None = None  # its index, made on the first draft (the engine thread)
        self.drafts: list[int] = []  # this step's draft tokens (engine/speculation.py)
        self.drafts_predicted = False  # whether they came from the prediction
        self.accepted_prediction_tokens = 0
        self.rejected_prediction_tokens = 0
        self.cancelled = False
        self.restarts = 0  # how often its caches were lost and it was computed again (restart)
        self.created = time.monotonic()
        self.first_token_at: float | None = None

    def restart(self, *, fault: bool = True) -> None:
        """Its caches are lost (a stage went down, or it moves to another engine; without `fault`, LongRoPE's long
        factors take over: Engine.step): it is computed again from its first token, its output so far kept (nothing
        is sampled again) and its choice no longer copying a leader."""
        self.restarts += fault
        self.n_cached = 0
        self.capacity = 0  # its new caches grow from nothing
        self.windowed = Layout()
        self.cached_tokens = 0  # none of its prompt comes from a kept cache any more (one may match again)
        self.drafts = []
        self.leader = None
        if self.pooled is not None and self.params.pooling is not None:
            self.pooled = PoolingState(self.params.pooling)
        if self.prompt_logprobs is not None:  # scored again only if not sent yet
            self.prompt_logprobs = None if self.prompt_logprobs_sent else []

    def scoring_rows(self, start_pos: int, n_tokens: int, first_row: int) -> tuple[list[int], list[int]]:
        """With prompt logprobs: the batch rows of a slice [start_pos, start_pos + n_tokens) starting at batch row
        `first_row` whose logits predict a prompt token, and those tokens. Position p predicts token p + 1; the
        prompt's last position predicts the first generated token, which is sampled, not scored."""
        if self.prompt_logprobs is None:
            return [], []
        positions = range(start_pos, min(start_pos + n_tokens, len(self.prompt_ids) - 1))
        return [first_row + p - start_pos for p in positions], [self.prompt_ids[p + 1] for p in positions]

    def with_prompt_logprobs(self, event: GenerationEvent) -> GenerationEvent:
        """The sequence's first event carries its prompt logprobs."""
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            event.prompt_logprobs, self.prompt_logprobs_sent = self.prompt_logprobs, True
        return event

    @property
    def n_tokens(self) -> int:
        return len(self.all_ids)

    def draft(self, limit: int, *, lookup: bool = True) -> list[int]:
        """Draft tokens for a decode step (at most `limit`, and none past max_tokens): the predicted output's next
        tokens where the request gave one and the output stands in it, else (with `lookup`) what followed the last
        n-gram the last time it appeared."""
        limit = min(limit, self.params.max_tokens - len(self.output_ids) - 1)
        self.drafts, self.drafts_predicted = [], False
        if limit <= 0:
            return []
        if self.params.prediction:
            if self.prediction is None:
                self.prediction = PredictionLookup(self.params.prediction)
            self.drafts = self.prediction.propose(self.output_ids, limit)
            self.drafts_predicted = bool(self.drafts)
        if not self.drafts and lookup:
            if self.lookup is None:
                self.lookup = PromptLookup()
            self.drafts = self.lookup.propose(self.all_ids, limit)
        return self.drafts

    def verified(self, confirmed: int) -> None:
        """How this step's drafts fared: the first `confirmed` were kept."""
        if self.drafts_predicted and self.prediction is not None:
            self.prediction.verified(len(self.drafts), confirmed)
            self.accepted_prediction_tokens += confirmed
            self.rejected_prediction_tokens += len(self.drafts) - confirmed
        elif self.lookup is not None:
            self.lookup.verified(len(self.drafts), confirmed)

    @property
    def reads_every_prompt_row(self) -> bool:
        """Whether each prompt position's output is needed (scoring, mean pooling): its prefill cannot be copied."""
        pooling = self.params.pooling
        return self.params.prompt_logprobs or (pooling is not None and pooling.kind == "mean")

    @property
    def prefilling(self) -> bool:
        return self.n_cached < len(self.prompt_ids)

    def accept(self, sampled: SampledToken) -> GenerationEvent:
        """Record a new token; returns the event to emit (finished when EOS, a stop string or max_tokens)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.output_ids.append(sampled.token_id)
        self.all_ids.append(sampled.token_id)
        event = GenerationEvent(self.seq_id, tokens=[sampled])
        if sampled.token_id in self.stop_ids:
            # The end token adds no text; what the decoder held back (a partial character) still goes out.
            event.text = self.stop.feed(self.decoder.flush())[0] + self.stop.flush()
            event.finish_reason = "stop"
            if sampled.token_id in self.params.stop_token_ids:
                event.stop_reason = sampled.token_id
        else:
            text, stopped = self.stop.feed(self.decoder.push(sampled.token_id))
            event.text = text
            if stopped:
                event.finish_reason, event.stop_reason = "stop", self.stop.matched
                if self.params.include_stop and self.stop.matched is not None:
                    event.text += self.stop.matched
            elif self.sampler.grammar is not None and self.sampler.grammar.finished:  # the structure is complete
                event.text += self.stop.feed(self.decoder.flush())[0] + self.stop.flush()
                event.finish_reason = "stop"
            elif len(self.output_ids) >= self.params.max_tokens:
                event.text += self.stop.feed(self.decoder.flush())[0] + self.stop.flush()
                event.finish_reason = "length"
        self.count_into(event)
        return event

    def count_into(self, event: GenerationEvent) -> None:
        """The usage figures an event carries."""
        event.prompt_tokens = len(self.prompt_ids)
        event.completion_tokens = len(self.output_ids)
        event.cached_tokens = self.cached_tokens
        event.accepted_prediction_tokens = self.accepted_prediction_tokens
        event.rejected_prediction_tokens = self.rejected_prediction_tokens
