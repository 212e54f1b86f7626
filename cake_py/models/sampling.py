"""Sampling parameters and the per-sequence sampler: greedy, temperature, top-k, top-p, logit bias, repetition,
frequency and presence penalties, seed, and a grammar the output must match.

A `Sampler` belongs to one sequence: it owns that sequence's random generator, so the same seed gives the same
text no matter what else is in the batch, and it counts the tokens it chose (the frequency and presence penalties
weigh only those, not the prompt, as OpenAI and vLLM do).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from cake_py.errors import RequestError
from cake_py.models.grammar import CompiledGrammar, GrammarMatcher
from cake_py.models.llama_samplers import LlamaChain, LlamaSamplers
from cake_py.models.pooling import Pooling

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_PRIORITY = 2**31 - 1  # a 32-bit integer, either sign
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (and vLLM's -1) disables top-k
    min_p: float = 0.0  # vLLM's: drop tokens less likely than min_p times the most likely one
    min_tokens: int = 0  # vLLM's: end tokens (EOS, stop_token_ids) cannot be drawn before this many tokens
    repetition_penalty: float = 1.0
    repetition_window: int = 0  # llama.cpp's repeat_last_n: the penalty weighs the last this many tokens; 0: all
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); ids are unique
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop: bool = False  # vLLM's include_stop_str_in_output: the stop string reached ends the text
    skip_special_tokens: bool = True  # vLLM's: False writes special tokens (not the end token) into the text
    logprobs: bool = False
    top_logprobs: int = 0
    # Logprobs of the model's own distribution (llama.cpp's, vLLM's raw_logprobs) instead of the one the bias,
    # penalties and grammar leave to draw from.
    raw_logprobs: bool = False
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    # The logprob of every prompt token after the first (with top_logprobs alternatives): scoring a text, as
    # /v1/completions does with echo and logprobs. max_tokens may then be 0: the prompt is scored, nothing generated.
    prompt_logprobs: bool = False
    # Structured output: the compiled grammar (see models/grammar.py) the generated text must match.
    grammar: CompiledGrammar | None = None
    # An embedding instead of a generation: the prompt's hidden states pooled (max_tokens is then 0).
    pooling: Pooling | None = None
    # OpenAI's Predicted Outputs: token ids the output is expected to hold, drafted and verified (speculation.py).
    prediction: tuple[int, ...] | None = None
    # vLLM's: when sequences wait for a slot, a lower priority starts first (Batch API requests run at 1).
    priority: int = 0
    # llama.cpp's sampler order: top-k, top-p, min-p on the model's distribution, the temperature last (its routes
    # set it); else vLLM's, the temperature first.
    temperature_last: bool = False
    # llama.cpp's routes: its other samplers and their order (llama_samplers.py); None, as on the other routes: none.
    llama: LlamaSamplers | None = None

    def __post_init__(self) -> None:
        if self.pooling is not None and self.max_tokens:
            raise RequestError(f"an embedding generates nothing: max_tokens must be 0, got {self.max_tokens}")
        if self.max_tokens < (0 if self.prompt_logprobs or self.pooling else 1):
            needs = "0 (scoring the prompt)" if self.prompt_logprobs else "1"
            raise RequestError(f"max_tokens must be at least {needs}, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise RequestError(f"top_p must be between 0 and 1, got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be between 0 and 1, got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(
                f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.top_k < -1:
            raise RequestError(f"top_k must be -1 or 0 (off) or positive, got {self.top_k}")
        if self.repetition_window < 0:
            raise RequestError(f"repetition_window must be 0 (every token) or more, got {self.repetition_window}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise RequestError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise RequestError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise RequestError(f"logit_bias token id {token_id} is negative")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise RequestError(f"logit_bias of token {token_id} must be between -100 and 100, got {bias}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise RequestError(f"seed must fit in 64 bits, got {self.seed}")
        if not -MAX_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise RequestError(f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}, got {self.priority}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        # Below vLLM's epsilon a temperature is greedy: dividing by it would overflow float32 to inf and NaN.
        # top_p 0 keeps only the most likely token, as OpenAI reads it.
        return self.temperature < GREEDY_BELOW or self.top_k == 1 or self.top_p == 0.0


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Chooses the next token of one sequence from its (vocab,) float32 logits."""

    def __init__(
        self, params: SamplingParams, end_ids: frozenset[int] = frozenset(), grammar: GrammarMatcher | None = None
    ) -> None:
        self.params = params
        self.grammar = grammar  # params.grammar's matcher, advanced by every token drawn
        self.end_ids = torch.tensor(sorted(end_ids), dtype=torch.long)  # held back until min_tokens are drawn
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed % 2**64)  # per-choice seeds (seed + index) may pass 2**64 - 1
        else:
            self.generator.seed()
        self.generated: dict[int, int] = {}  # token id → how many times this sampler chose it
        # llama.cpp's chain, only where its settings draw otherwise than the path below (none: no cost per token)
        llama, penalized = params.llama, params.repetition_penalty != 1.0 or self._counts_penalize
        self.chain = (
            LlamaChain(llama, params.top_k, params.top_p, params.min_p, params.temperature, penalized)
            if llama is not None and llama.replaces_default(params.top_k, params.top_p, params.min_p, penalized)
            else None
        )

    @property
    def _counts_penalize(self) -> bool:
        return bool(self.params.frequency_penalty or self.params.presence_penalty)

    def sample(self, logits: torch.Tensor, history: Sequence[int]) -> SampledToken:
        """`history` is the prompt and the tokens generated so far (the repetition penalty weighs both)."""
        params = self.params
        raw = logits
        # vLLM's order: the bias first, then the penalties; all of them before greedy's argmax too.
        if params.logit_bias:
            logits = apply_logit_bias(logits, params.logit_bias)
        if self.chain is None:  # the chain applies them where its order puts them
            logits = self._penalized(logits, history)
        if params.min_tokens and len(self.end_ids) and sum(self.generated.values()) < params.min_tokens:
            # End ids come from the model's own files, unchecked: one past the vocabulary would be a device-side
            # assert on a GPU, which breaks every later request of the process.
            end_ids = self.end_ids[self.end_ids < logits.shape[-1]]
            logits = logits.index_fill(0, end_ids.to(logits.device), float("-inf"))
        if self.grammar is not None:  # last: no processor may bring back a token the grammar forbids
            allowed = self.grammar.allowed(logits.shape[-1]).to(logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
            if not bool(torch.isfinite(logits).any()):
                raise RequestError(
                    "no token can come next: the structured output allows only tokens that min_tokens, "
                    "stop_token_ids or logit_bias rule out"
                )
        if self.chain is not None:
            token = self.chain.choose(logits, history, lambda scores: self._penalized(scores, history), self.generator)
        elif params.greedy:
            token = int(torch.argmax(logits))
        else:
            if params.temperature_last:
                ids, probs = temperature_last_candidates(logits, params)
            else:
                # Shifted so the best logit is 0 before dividing: a small temperature cannot overflow the others.
                scaled = (logits - logits.max()) / params.temperature
                ids, probs = candidates(scaled, params.top_k, params.top_p, params.min_p)
            # Drawn on the CPU with a CPU generator: a seed draws the same tokens whatever device computed the logits.
            cdf = probs.cpu().double().cumsum(0)
            total = float(cdf[-1]) if len(cdf) else 0.0  # no candidate left: NaN logits fail every filter
            if not 0.0 < total < math.inf:  # NaN logits (a broken stage), or every token masked
                raise ValueError(f"the logits give no token a probability (their total is {total})")
            uniform = torch.rand(1, dtype=torch.float64, generator=self.generator) * cdf[-1]
            index = min(int(torch.searchsorted(cdf, uniform, right=True)), len(cdf) - 1)
            token = int(ids[index]) if ids is not None else index
        if self.grammar is not None:
            self.grammar.consume(token)
        self.generated[token] = self.generated.get(token, 0) + 1
        if not params.logprobs:
            return SampledToken(token)
        logprobs = torch.log_softmax(raw if params.raw_logprobs else logits, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if params.top_logprobs:
            values, indices = torch.topk(logprobs, params.top_logprobs)
            # Tokens a grammar or a -100 bias rules out have no probability: they are not alternatives (and -inf
            # is not JSON).
            top = tuple((i, v) for i, v in zip(indices.tolist(), values.tolist(), strict=True) if v > -math.inf)
        return SampledToken(token, float(logprobs[token]), top)

    def _penalized(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """The repetition penalty over the last repetition_window tokens of `history`, then the frequency and
        presence penalties over the tokens this sampler chose."""
        params = self.params
        if params.repetition_penalty != 1.0 and history:
            window = history[-params.repetition_window :] if params.repetition_window else history
            logits = apply_repetition_penalty(logits, window, params.repetition_penalty)
        if self._counts_penalize and self.generated:
            logits = apply_frequency_presence(logits, self.generated, params.frequency_penalty, params.presence_penalty)
        return logits


def prompt_token_logprobs(logits: torch.Tensor, targets: Sequence[int], top: int) -> list[SampledToken]:
    """For (rows, vocab) logits each predicting the token in `targets`: that token's logprob, and the `top` most
    likely tokens with theirs. The model's raw distribution: no sampling parameter applies to a prompt."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
    if not top:
        return [SampledToken(token, value) for token, value in zip(targets, chosen, strict=True)]
    values, indices = torch.topk(logprobs, top, dim=-1)
    return [
        SampledToken(token, value, tuple(zip(row_ids, row_values, strict=True)))
        for token, value, row_ids, row_values in zip(targets, chosen, indices.tolist(), values.tolist(), strict=True)
    ]


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """OpenAI's logit_bias: each value is added to its token's logit (-100 all but bans it, 100 all but forces it)."""
    ids = torch.tensor([token_id for token_id, _ in bias], dtype=torch.long, device=logits.device)
    values = torch.tensor([value for _, value in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, values)


def apply_frequency_presence(
    logits: torch.Tensor, counts: Mapping[int, int], frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI's rule: logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c = generated counts."""
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    seen = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, -(seen * frequency + presence))  # every count here is at least 1


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: divide positive logits of seen tokens, multiply negative ones."""
    seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    scores = logits[seen]
    logits = logits.clone()
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    # A penalty near 0 or at its top can overflow: keep the scores finite (inf - inf would be NaN downstream).
    limit = torch.finfo(logits.dtype).max
    logits[seen] = penalized.clamp(-limit, limit)
    return logits


def candidates(
    logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens `filter_logits` keeps and their probabilities, computed over the fewest tokens: ids (None: every
    token, in order) and probabilities (they may sum to less than 1: the draw normalises).

    A full sort of a 49k vocabulary costs ~3 ms on a CPU, more than a decode step of a small model: top-k takes
    the k best directly, and top-p alone widens a top-k until it holds the nucleus (usually a few dozen tokens).
    """
    if min_p > 0.0:  # p < min_p * p_max  ⇔  logit < max_logit + log(min_p)
        logits = logits.masked_fill(logits < logits.max() + math.log(min_p), float("-inf"))
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        values, ids = torch.topk(logits, top_k)  # descending
        tied = int((logits >= values[-1]).sum())  # tokens tied with the k-th stay, as in filter_logits
        if tied > top_k:
            values, ids = torch.topk(logits, tied)
        probs = torch.softmax(values, dim=-1)  # renormalised over the k, as filter_logits' softmax is
    elif top_p < 1.0:
        full = torch.softmax(logits, dim=-1)
        k = min(64, vocab)
        while True:
            probs, ids = torch.topk(full, k)  # descending; absolute probabilities
            if k == vocab or float(probs.sum()) >= top_p:
                break
            k = min(4 * k, vocab)
    else:
        return None, torch.softmax(logits, dim=-1)
    if top_p < 1.0:  # probabilities of the whole distribution (or of the top-k, renormalised), descending
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        n_kept = max(int((before < top_p).sum()), 1)  # keep the token that crosses top_p
        probs, ids = probs[:n_kept], ids[:n_kept]
    return ids, probs


def temperature_last_candidates(
    logits: torch.Tensor, params: SamplingParams
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`candidates` in llama.cpp's default order: top-k, then top-p over what top-k kept, then min-p, all on the
    model's own distribution, and only then the temperature over the tokens left (common_sampler's chain)."""
    shifted = logits - logits.max()
    ids, _ = candidates(shifted, params.top_k, params.top_p)
    kept = shifted if ids is None else shifted[ids]
    if params.min_p > 0.0:  # p < min_p * p_max  ⇔  logit < max_logit (0 here) + log(min_p)
        keep = kept >= math.log(params.min_p)
        kept = kept[keep]
        ids = keep.nonzero().squeeze(1) if ids is None else ids[keep]
    return ids, torch.softmax(kept / params.temperature, dim=-1)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Mask logits outside the top-k, outside the smallest set whose probability reaches top-p, and those whose
    probability is under min_p times the most likely token's. (The definition `candidates` computes faster.)"""
    if min_p > 0.0:  # p < min_p * p_max  ⇔  logit < max_logit + log(min_p)
        logits = logits.masked_fill(logits < logits.max() + math.log(min_p), float("-inf"))
    if top_k > 0 and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.matched: str | None = None  # the stop string reached (the earliest in the text; the first listed on a tie)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was reached)."""
        if not self.stops:
            return delta, False
        text = self.pending + delta
        hits = [(index, order, stop) for order, stop in enumerate(self.stops) if (index := text.find(stop)) >= 0]
        if hits:
            self.pending = ""
            index, _, self.matched = min(hits)
            return text[:index], True
        hold = max((_overlap(text, stop) for stop in self.stops), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0
