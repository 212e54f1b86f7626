"""One scheduler step's plan: which slice of each running sequence joins the varlen batch, and which rows of the
batch's output need logits (the next token of a sequence whose slice reaches its end, and with prompt logprobs the
rows that score prompt tokens), and which need final hidden states (embeddings)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cake_py.engine.sequence import Sequence
from cake_py.models.kv_cache import SequenceSlice

SPECULATE_MAX_DECODING = 2  # drafts only while this few sequences decode together
PREDICTION_DRAFTS = 8  # draft tokens per step from a predicted output when --speculative-tokens does not say
# A prefill that got none of the budget this many steps in a row goes before the other prefills for a step: shortest
# first alone let a stream of short prompts hold a long one back for as long as they kept coming.
PREFILL_AGING_STEPS = 8


@dataclass
class StepPlan:
    batch: list[SequenceSlice] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the batch's token ids, in layout order
    members: list[Sequence] = field(default_factory=list)  # the sequence of each slice
    rows: list[int] = field(default_factory=list)  # batch rows whose logits are sampled, one per `sampled`
    sampled: list[Sequence] = field(default_factory=list)  # a drafting sequence once per row of its slice
    scored: list[tuple[Sequence, list[int], list[int]]] = field(default_factory=list)  # rows, the tokens they score
    # Embeddings: a sequence, the batch rows whose final hidden states it pools, and whether its prompt ends here.
    pooled: list[tuple[Sequence, list[int], bool]] = field(default_factory=list)

    @property
    def hidden_rows(self) -> list[int]:
        """Every row whose final hidden state an embedding pools, in `pooled` order."""
        return [row for _, rows, _ in self.pooled for row in rows]

    @property
    def head_rows(self) -> list[int]:
        """Every row the head computes logits for: the sampled ones first, then the scoring ones."""
        return self.rows + [row for _, rows, _ in self.scored for row in rows]


def rotated_long(long_from: int | None, length: int) -> bool:
    """Whether a sequence of `length` tokens is rotated with LongRoPE's long factors, all of it (`long_from`:
    RopeConfig.long_from, None for every other rope)."""
    return long_from is not None and length > long_from


def _prefill_left(seq: Sequence) -> int:
    """0 for a decoding sequence, else the prompt tokens it has yet to compute."""
    return len(seq.prompt_ids) - seq.n_cached if seq.prefilling else 0


def plan_step(
    running: Iterable[Sequence],
    budget: int,
    shared_prefill: Callable[[Sequence], int | None],
    speculate: int = 0,
    prefill_left: Callable[[Sequence], int] = _prefill_left,
    long_from: int | None = None,
) -> StepPlan:
    """Slices of at most `budget` tokens in all. Decoding sequences come first: they cost one token each and keep
    streams flowing during long prefills. Then the prefills, those with the fewest prompt tokens left first: a short
    prompt admitted behind long ones gets its first token in the next step instead of after every long prefill
    (first come, first served held a 5-token chat behind four 450-token prompts for 29 steps); a long one waits
    only for the shorter prompts' own tokens, and at most max_running prompts prefill at once; one passed over for
    PREFILL_AGING_STEPS steps in a row goes first among the prefills (so it gets at least one chunk in every
    PREFILL_AGING_STEPS + 1 steps, however many short prompts keep arriving). `prefill_left(seq)`
    counts the tokens it has yet to prefill, what it would copy left out (the engine's counts a kept prefix before
    `shared_prefill` has matched it). `shared_prefill(seq)` is 0 for a sequence that waits for the prefill it will
    copy, else the id to copy from (or None). With `speculate`, a decoding sequence (when at most
    SPECULATE_MAX_DECODING decode in this step) adds up to that many draft tokens to its slice; one with a predicted
    output drafts from it (up to `speculate`, or PREDICTION_DRAFTS when that is 0) whatever `speculate` is.
    `long_from` is LongRoPE's original context (RopeConfig.long_from): a sequence whose first slice is planned here
    is computed with the long factors when its known tokens pass it (every piece of a long prompt alike), and one
    computed within it drafts no token past it (the engine computes it again once it passes: Engine.step)."""
    plan = StepPlan()

    def order(seq: Sequence) -> tuple[int, ...]:
        left = prefill_left(seq)
        return (0,) if left == 0 else (1, int(seq.passed_over < PREFILL_AGING_STEPS), left)

    ordered = sorted(running, key=order)  # stable: among equals, the order they were admitted in
    drafting = sum(not seq.prefilling for seq in ordered) <= SPECULATE_MAX_DECODING
    # (beyond that, a batch already shares each pass over the weights: drafts would only add rows)
    for position, seq in enumerate(ordered):
        if budget <= 0:
            break
        copy_from = shared_prefill(seq)
        if copy_from == 0:
            continue
        known = seq.all_ids
        n = min(len(known) - seq.n_cached, budget)
        drafts: list[int] = []
        limit = speculate or (PREDICTION_DRAFTS if seq.params.prediction else 0)
        if seq.n_cached == 0 or copy_from is not None:  # its caches start here: rotated as its length says
            seq.rope_long = rotated_long(long_from, len(known))
        if long_from is not None and not seq.rope_long:
            limit = max(0, min(limit, long_from - len(known)))
        if drafting and limit and n == 1 and copy_from is None and seq.params.pooling is None:
            later = len(ordered) - position - 1  # drafts leave each later sequence at least one token of the budget
            drafts = seq.draft(min(limit, budget - 1 - later), lookup=speculate > 0)
        seq.drafts = drafts
        rope_end = len(known) if seq.rope_long else 0  # (a slice's own end is within the original context)
        plan.batch.append(SequenceSlice(seq.seq_id, seq.n_cached, n + len(drafts), copy_from, rope_end))
        plan.ids.extend(known[seq.n_cached : seq.n_cached + n] + drafts)
        plan.members.append(seq)
        budget -= n + len(drafts)
    planned = {seq.seq_id for seq in plan.members}
    for seq in ordered:
        seq.passed_over = 0 if seq.seq_id in planned or not seq.prefilling else seq.passed_over + 1
    offset = 0
    for piece, seq in zip(plan.batch, plan.members, strict=True):
        scoring_rows, targets = seq.scoring_rows(piece.start_pos, piece.n_tokens, offset)
        if scoring_rows:
            plan.scored.append((seq, scoring_rows, targets))
        pooling = seq.params.pooling
        if pooling is not None:  # an embedding: nothing is sampled
            positions = pooling.rows(piece.start_pos, piece.n_tokens, len(seq.prompt_ids))
            rows = [offset + position - piece.start_pos for position in positions]
            plan.pooled.append((seq, rows, piece.start_pos + piece.n_tokens == seq.n_tokens))
            offset += piece.n_tokens
            continue
        offset += piece.n_tokens
        if piece.start_pos + piece.n_tokens == seq.n_tokens + len(seq.drafts):  # it reaches the end: a token is due
            sampled = 1 + len(seq.drafts)  # a draft's rows too: each is sampled while the drafts before it hold
            plan.rows.extend(range(offset - sampled, offset))
            plan.sampled.extend([seq] * sampled)
    return plan
