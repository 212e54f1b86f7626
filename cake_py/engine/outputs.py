"""What one step's outputs mean for its sequences: the prompt scores, the embeddings and the sampled tokens, as the
events the engine then streams (or ends the sequences with). Runs on the engine thread."""

from __future__ import annotations

import logging

import torch

from cake_py.engine.plan import StepPlan
from cake_py.engine.sequence import GenerationEvent, Sequence
from cake_py.engine.stats import EngineStats
from cake_py.errors import CakeError
from cake_py.models.sampling import prompt_token_logprobs

log = logging.getLogger(__name__)

Events = list[tuple[Sequence, GenerationEvent]]


def step_events(plan: StepPlan, logits: torch.Tensor, hidden: torch.Tensor | None, stats: EngineStats) -> Events:
    """`logits` at `plan.head_rows` and the final `hidden` states at `plan.hidden_rows` → each sequence's event."""
    _score_prompts(plan, logits)
    return _pool(plan, hidden) + _sample(plan, logits, stats)


def _score_prompts(plan: StepPlan, logits: torch.Tensor) -> None:
    first = len(plan.rows)  # the scoring rows follow the sampled ones
    for seq, scoring_rows, targets in plan.scored:
        assert seq.prompt_logprobs is not None
        chunk = logits[first : first + len(scoring_rows)]
        seq.prompt_logprobs += prompt_token_logprobs(chunk, targets, seq.params.top_logprobs)
        first += len(scoring_rows)


def _pool(plan: StepPlan, hidden: torch.Tensor | None) -> Events:
    """Add this step's final hidden states to each embedding; the finished ones' last events."""
    events: Events = []
    first = 0
    for seq, rows, ends in plan.pooled:
        assert seq.pooled is not None
        part = hidden[first : first + len(rows)] if rows and hidden is not None else None
        first += len(rows)
        try:
            if part is not None:
                seq.pooled.add(part)
            if ends:
                events.append((seq, GenerationEvent(seq.seq_id, finish_reason="stop", embedding=seq.pooled.result())))
        except Exception as error:  # one embedding's failure ends it alone, as a sampling failure does
            log.exception("pooling failed for sequence %d", seq.seq_id)
            failure = CakeError(f"internal error while pooling: {type(error).__name__}: {error}")
            events.append(
                (seq, GenerationEvent(seq.seq_id, finish_reason="error", error=str(failure), exception=failure))
            )
    return events


def _sample(plan: StepPlan, logits: torch.Tensor, stats: EngineStats) -> Events:
    """One token per sampled row, in order. A drafting sequence's rows are sampled while each sample equals the
    draft token its row was computed after: the first that differs (or the row after the last draft) is its last."""
    events: Events = []
    done: set[int] = set()  # sequences whose rows this step are over
    rows_taken: dict[int, int] = {}
    for row, seq in enumerate(plan.sampled):
        if seq.seq_id in done:
            continue
        if seq.params.max_tokens == 0:  # the prompt was only to be scored
            events.append((seq, GenerationEvent(seq.seq_id, finish_reason="length")))
            continue
        index = rows_taken.get(seq.seq_id, 0)
        rows_taken[seq.seq_id] = index + 1
        try:
            event = seq.accept(seq.sampler.sample(logits[row], seq.all_ids))
        except Exception as error:  # one sequence's sampling failed: it ends alone, the others go on
            if isinstance(error, CakeError):  # the request's own fault (its grammar), named
                failure = error
            else:
                log.exception("sampling failed for sequence %d", seq.seq_id)
                failure = CakeError(f"internal error while sampling: {type(error).__name__}: {error}")
            event = _failed(seq, failure)
        events.append((seq, event))
        if seq.first_token_at is not None and len(seq.output_ids) == 1:
            stats.record_first_token((seq.first_token_at - seq.created) * 1000)
        drafts = seq.drafts
        matched = index < len(drafts) and bool(event.tokens) and event.tokens[-1].token_id == drafts[index]
        if event.finished or not matched:
            done.add(seq.seq_id)
            if drafts:
                confirmed = index + matched  # a draft the last token equals counts (it ended on a stop, say)
                seq.verified(confirmed)
                stats.record_drafts(len(drafts), confirmed)
    return events


def _failed(seq: Sequence, failure: CakeError) -> GenerationEvent:
    return GenerationEvent(seq.seq_id, finish_reason="error", error=str(failure), exception=failure)
