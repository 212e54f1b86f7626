"""llama.cpp's sampler chain, for its routes (`/completion`, `/infill`): the samplers `sampling.py` has not
(typical-p, top-n-sigma, XTC, DRY, dynamic temperature, mirostat 1 and 2, min_keep) and the order (or subset) a
request names in `samplers`, with llama.cpp's semantics (its `src/llama-sampling.cpp` and `common/sampling.cpp`).

`LlamaSamplers` holds a request's settings. Only when they do something the default path cannot (a sampler turned on,
another order, mirostat) does a sequence's `Sampler` make a `LlamaChain`: with neutral values it draws exactly as
before, with no extra torch work per token. The chain runs on the tokens still possible (finite logits), each
sampler keeping some of them or changing their logits, then draws one with the sequence's own generator (XTC's coin
too), so a seed gives the same text whatever else is batched. Mirostat replaces the chain, as in llama.cpp (the
temperature, then mirostat: no penalties, no other sampler), its `mu` kept by the sequence's chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cake_py.errors import RequestError
from cake_py.models.dry import Breakers, dry_penalties

# llama.cpp's names for its samplers (common_sampler_type_to_str) and their letters (common_sampler_type_to_chr).
SAMPLER_LETTERS = {
    "d": "dry",
    "k": "top_k",
    "y": "typ_p",
    "p": "top_p",
    "s": "top_n_sigma",
    "m": "min_p",
    "t": "temperature",
    "x": "xtc",
    "e": "penalties",
}
DEFAULT_ORDER = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
DEFAULT_BREAKERS = ("\n", ":", '"', "*")
MAX_MIN_KEEP = 2**31 - 1  # more than any vocabulary; past it a count no longer compares with a tensor's
MIROSTAT_M = 100  # mirostat 1 estimates the distribution's exponent from the m most likely tokens (llama.cpp's m)

Penalize = Callable[[torch.Tensor], torch.Tensor]  # the repetition, frequency and presence penalties, on all logits


@dataclass(frozen=True)
class LlamaSamplers:
    """A request's llama.cpp sampler settings (llama.cpp's field names and defaults); `dry_breakers` is what
    `dry_sequence_breakers` stands for in the model's vocabulary (models/dry.py), filled in by the route."""

    samplers: tuple[str, ...] = DEFAULT_ORDER
    min_keep: int = 0
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1  # -1: the whole context
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_BREAKERS
    dry_breakers: Breakers = field(default_factory=dict, compare=False)
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0

    def __post_init__(self) -> None:
        unknown = next((name for name in self.samplers if name not in DEFAULT_ORDER), None)
        if unknown is not None:
            raise RequestError(f"samplers: unknown sampler {unknown!r}; known: {', '.join(DEFAULT_ORDER)}"[:300])
        for name, low, high in (
            ("typical_p", 0.0, 1.0),
            ("xtc_probability", 0.0, 1.0),
            ("xtc_threshold", 0.0, 1.0),
        ):
            if not low <= getattr(self, name) <= high:
                raise RequestError(f"{name} must be between {low:g} and {high:g}, got {getattr(self, name)}")
        for name in (
            "min_keep",
            "dry_multiplier",
            "dry_allowed_length",
            "mirostat_tau",
            "mirostat_eta",
            "dynatemp_range",
            "dynatemp_exponent",
        ):
            if getattr(self, name) < 0:
                raise RequestError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.min_keep > MAX_MIN_KEEP:
            raise RequestError(f"min_keep must be at most {MAX_MIN_KEEP}, got {self.min_keep}"[:300])
        if self.dry_base < 1.0:
            raise RequestError(f"dry_base must be 1 or more, got {self.dry_base}")
        if self.dry_penalty_last_n < -1:
            raise RequestError(
                f"dry_penalty_last_n must be -1 (the whole context), 0 (off) or more, got {self.dry_penalty_last_n}"
            )
        if self.mirostat not in (0, 1, 2):
            raise RequestError(f"mirostat must be 0 (off), 1 or 2, got {self.mirostat}")

    @property
    def dry_on(self) -> bool:
        return self.dry_multiplier != 0.0 and self.dry_penalty_last_n != 0

    @property
    def xtc_on(self) -> bool:
        return self.xtc_probability > 0.0 and self.xtc_threshold <= 0.5

    def replaces_default(self, top_k: int, top_p: float, min_p: float, penalized: bool) -> bool:
        """Whether these settings draw otherwise than sampling.py's default path (its llama.cpp order: penalties,
        top-k, top-p, min-p, temperature), given the request's own top_k, top_p, min_p and whether it penalises."""
        if self.mirostat or (self.dynatemp_range > 0.0 and "temperature" in self.samplers):
            return True
        enabled = {
            "penalties": penalized,
            "dry": self.dry_on,
            "top_n_sigma": self.top_n_sigma > 0.0,
            "top_k": top_k > 0,
            "typ_p": self.typical_p < 1.0,
            "top_p": top_p < 1.0,
            "min_p": min_p > 0.0,
            "xtc": self.xtc_on,
            "temperature": True,
        }
        default = ("penalties", "top_k", "top_p", "min_p", "temperature")
        if [name for name in self.samplers if enabled[name]] != [name for name in default if enabled[name]]:
            return True
        return self.min_keep > 1 and (top_p < 1.0 or min_p > 0.0)  # 0 and 1 keep the same


def top_n_sigma(logits: torch.Tensor, n: float) -> torch.Tensor:
    """Indices of the logits within n standard deviations of the largest (llama.cpp's top-n-sigma)."""
    if n <= 0.0 or len(logits) <= 1:
        return torch.arange(len(logits))
    threshold = logits.max() - n * logits.std(correction=0)
    return (logits >= threshold).nonzero().squeeze(1)


def typical(logits: torch.Tensor, p: float, min_keep: int) -> torch.Tensor:
    """Indices of the locally typical tokens (llama.cpp's typical-p): the fewest whose surprise is nearest the
    distribution's entropy and whose probability passes p, most typical first."""
    if p >= 1.0:
        return torch.arange(len(logits))
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    probs = logprobs.exp()
    entropy = -(probs * logprobs).sum()
    order = torch.argsort((-logprobs - entropy).abs(), stable=True)
    cumulative = probs[order].cumsum(0)
    past = (cumulative > p).nonzero().squeeze(1)
    positions = past[past >= max(min_keep - 1, 0)]
    last = int(positions[0]) + 1 if len(positions) else len(order)
    return order[:last]


def top_p(logits: torch.Tensor, p: float, min_keep: int) -> torch.Tensor:
    """Indices of the nucleus, most likely first: the fewest tokens whose probability reaches p, at least min_keep."""
    order = torch.argsort(logits, descending=True, stable=True)
    if p >= 1.0:
        return order
    cumulative = torch.softmax(logits[order], dim=-1).cumsum(0)
    reached = (cumulative >= p).nonzero().squeeze(1)
    positions = reached[reached + 1 >= min_keep]
    last = int(positions[0]) + 1 if len(positions) else len(order)
    return order[:last]


def min_p(logits: torch.Tensor, p: float, min_keep: int) -> torch.Tensor:
    """Indices of the tokens at least p times as likely as the most likely one; at least min_keep of them, and
    always the most likely."""
    if p <= 0.0:
        return torch.arange(len(logits))
    keep = logits >= logits.max() + math.log(p)
    if int(keep.sum()) >= max(min_keep, 1):
        return keep.nonzero().squeeze(1)
    return torch.argsort(logits, descending=True, stable=True)[: max(min_keep, 1)]


def xtc(logits: torch.Tensor, threshold: float, min_keep: int) -> torch.Tensor:
    """Indices left once XTC ("exclude top choices") took its chance: every token at least `threshold` likely but
    the least likely of them goes, unless that would leave fewer than min_keep."""
    order = torch.argsort(logits, descending=True, stable=True)
    above = int((torch.softmax(logits[order], dim=-1) >= threshold).sum())
    removed = max(above - 1, 0)  # tokens above the threshold form a prefix of the sorted ones
    if removed > 0 and len(order) - removed >= min_keep:
        return order[removed:]
    return order


def dynamic_temperature(logits: torch.Tensor, temperature: float, spread: float, exponent: float) -> float:
    """llama.cpp's temp-ext: with a spread, the temperature between temperature ± spread (not below 0) that the
    distribution's normalised entropy, raised to `exponent`, picks; without, the temperature itself."""
    if spread <= 0.0 or len(logits) <= 1:
        return temperature
    low, high = max(0.0, temperature - spread), temperature + spread
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    probs = logprobs.exp()
    entropy = float(-(probs[probs > 0] * logprobs[probs > 0]).sum())
    normalized = entropy / math.log(len(logits))
    return low + (high - low) * normalized**exponent


def scaled(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits divided by the temperature; at 0 or below only the most likely token stays (its index)."""
    if temperature <= 0.0:
        return logits[:1] * 0, torch.argmax(logits).reshape(1)
    return (logits - logits.max()) / temperature, None


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """An index drawn from `probs` (unnormalised), on the CPU with the sequence's generator (as `Sampler` draws)."""
    cdf = probs.cpu().double().cumsum(0)
    uniform = torch.rand(1, dtype=torch.float64, generator=generator) * cdf[-1]
    return min(int(torch.searchsorted(cdf, uniform, right=True)), len(cdf) - 1)


def mirostat_k(probs: torch.Tensor, mu: float, n_vocab: int, n_candidates: int) -> int:
    """How many of the `n_candidates` tokens mirostat 1 keeps, from `probs`, the first MIROSTAT_M of them in
    descending order (only their ratios count): its estimate s of the Zipf exponent, then
    k = (e * 2**mu / (1 - n_vocab**-e)) ** (1 / s), e = s - 1; all of them where that is no number."""
    n = len(probs)
    if n <= 1:
        return min(n, n_candidates)
    steps = min(MIROSTAT_M - 1, n - 1)
    ranks = torch.arange(1, steps + 1, dtype=torch.float64)
    t = torch.log((ranks + 1) / ranks)
    b = torch.log(probs[:steps] / probs[1 : steps + 1])
    s_hat = float((t * b).sum() / (t * t).sum())
    epsilon = s_hat - 1
    try:
        k = ((epsilon * 2**mu) / (1 - n_vocab ** (-epsilon))) ** (1 / s_hat)
    except (OverflowError, ZeroDivisionError):
        return n_candidates
    if not isinstance(k, float) or not math.isfinite(k):  # a complex power, or NaN: no estimate
        return n_candidates
    return min(max(int(k), 1), n_candidates)


def mirostat_v1(
    logits: torch.Tensor, mu: float, tau: float, eta: float, n_vocab: int, generator: torch.Generator
) -> tuple[int, float]:
    """Mirostat 1: the `mirostat_k` most likely of `logits`, one drawn from them; returns its index in `logits` and
    the new mu (mu - eta * (its surprise - tau))."""
    top, order = torch.topk(logits, min(MIROSTAT_M, len(logits)))
    k = mirostat_k(torch.softmax(top.double(), dim=-1), mu, n_vocab, len(logits))
    kept_logits, kept = torch.topk(logits, k) if k > len(top) else (top[:k], order[:k])
    probs = torch.softmax(kept_logits.double(), dim=-1)
    index = draw(probs, generator) if len(probs) > 1 else 0
    return int(kept[index]), mu - eta * (-math.log2(float(probs[index])) - tau)


def mirostat_v2(
    logits: torch.Tensor, mu: float, tau: float, eta: float, generator: torch.Generator
) -> tuple[int, float]:
    """Mirostat 2: of `logits`, the tokens whose surprise (-log2 p) is at most mu (the most likely one at least),
    one drawn from them; returns its index in `logits` and the new mu."""
    probs = torch.softmax(logits.double(), dim=-1)
    # -log2 p <= mu: the prefix llama.cpp keeps of the sorted tokens; the draw needs no order (no sort: as mu
    # grows over predictable text, this can be most of the vocabulary)
    # 2 ** 1000 > 1: no token (the most likely one below); a mu pushed far below it would overflow the power
    kept = (probs >= 2.0 ** min(-mu, 1000.0)).nonzero().squeeze(1)
    if not len(kept):
        kept = torch.argmax(logits).reshape(1)
    probs = torch.softmax(logits[kept].double(), dim=-1)
    index = draw(probs, generator) if len(probs) > 1 else 0
    return int(kept[index]), mu - eta * (-math.log2(float(probs[index])) - tau)


class LlamaChain:
    """One sequence's llama.cpp chain: its settings, and its state (mirostat's mu)."""

    def __init__(
        self, settings: LlamaSamplers, top_k: int, top_p: float, min_p: float, temperature: float, penalized: bool
    ) -> None:
        self.settings = settings
        self.top_k, self.top_p, self.min_p, self.temperature = top_k, top_p, min_p, temperature
        self.penalized = penalized  # whether the request's repetition, frequency or presence penalty is on
        self.mu = 2 * settings.mirostat_tau  # llama.cpp starts mirostat's mu at twice its target

    def choose(
        self, logits: torch.Tensor, history: Sequence[int], penalize: Penalize, generator: torch.Generator
    ) -> int:
        """The next token from the (vocab,) logits (bias, grammar and min_tokens applied, not the penalties:
        `penalize` applies them where the order puts them). `history` is the prompt and the output so far."""
        settings = self.settings
        logits = logits.float().cpu()  # many small steps: on the CPU, as the draw is
        finite = torch.isfinite(logits)
        if bool(finite.all()):  # the usual case: no token ruled out (a gather of the whole vocabulary saved)
            ids, values = torch.arange(len(logits)), logits
        else:
            ids = finite.nonzero().squeeze(1)
            if not len(ids):
                raise ValueError("the logits give no token a probability (none is finite)")
            values = logits[ids]
        if settings.mirostat:  # llama.cpp's mirostat chain: the temperature, then mirostat (no penalties)
            values, greedy = scaled(values, self.temperature)
            if greedy is not None:
                ids = ids[greedy]
            tau, eta = settings.mirostat_tau, settings.mirostat_eta
            if settings.mirostat == 1:
                index, self.mu = mirostat_v1(values, self.mu, tau, eta, logits.shape[-1], generator)
            else:
                index, self.mu = mirostat_v2(values, self.mu, tau, eta, generator)
            return int(ids[index])
        for name in settings.samplers:
            kept: torch.Tensor | None = None
            if name == "penalties" and self.penalized:
                values = penalize(torch.full_like(logits, -math.inf).index_copy(0, ids, values))[ids]
            elif name == "dry" and settings.dry_on:
                values = self._dry(ids, values, history, logits.shape[-1])
                kept = torch.isfinite(values).nonzero().squeeze(1)  # a penalty past float32's range leaves -inf
            elif name == "top_n_sigma":
                kept = top_n_sigma(values, settings.top_n_sigma)
            elif name == "top_k" and 0 < self.top_k < len(values):
                best, kept = torch.topk(values, self.top_k)
                tied = int((values >= best[-1]).sum())  # ties with the k-th stay, as sampling.py keeps them
                if tied > self.top_k:
                    kept = torch.topk(values, tied).indices
            elif name == "typ_p":
                kept = typical(values, settings.typical_p, settings.min_keep)
            elif name == "top_p":
                kept = top_p(values, self.top_p, settings.min_keep)
            elif name == "min_p":
                kept = min_p(values, self.min_p, settings.min_keep)
            elif name == "xtc" and settings.xtc_on and len(values) >= 2:
                chance = float(torch.rand(1, dtype=torch.float64, generator=generator))
                if chance <= settings.xtc_probability:
                    kept = xtc(values, settings.xtc_threshold, settings.min_keep)
            elif name == "temperature":
                spread, exponent = settings.dynatemp_range, settings.dynatemp_exponent
                values, kept = scaled(values, dynamic_temperature(values, self.temperature, spread, exponent))
                if kept is not None:  # at 0, only the most likely token is left
                    ids, kept = ids[kept], None
            if kept is not None:
                ids, values = ids[kept], values[kept]
        if not len(ids):
            raise ValueError("the logits give no token a probability (DRY's penalties took every one)")
        if len(ids) == 1:  # as llama.cpp's dist: one candidate is taken without a draw
            return int(ids[0])
        return int(ids[draw(torch.softmax(values, dim=-1), generator)])

    def _dry(self, ids: torch.Tensor, values: torch.Tensor, history: Sequence[int], n_vocab: int) -> torch.Tensor:
        """`values` (the logits of `ids`) less DRY's penalties, over the last dry_penalty_last_n tokens."""
        settings = self.settings
        last_n = settings.dry_penalty_last_n
        window = history[-last_n:] if last_n > 0 else history
        found = dry_penalties(
            window, settings.dry_multiplier, settings.dry_base, settings.dry_allowed_length, settings.dry_breakers
        )
        found = {token: amount for token, amount in found.items() if token < n_vocab}  # ids the logits have
        if not found:
            return values
        amounts = torch.zeros(n_vocab, dtype=torch.float64)
        amounts[torch.tensor(list(found), dtype=torch.long)] = torch.tensor(list(found.values()), dtype=torch.float64)
        return (values.double() - amounts[ids]).float()
