"""What the engine counts: requests, tokens, steps, time to first token, and the recent generation rate (for
/metrics, the topology's live figures and the dashboard). Written by the engine thread, read by any."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

RATE_WINDOW_S = 5.0  # tokens/s is measured over this many recent seconds
TTFT_KEPT = 256  # time-to-first-token samples kept for the percentiles


@dataclass
class EngineStats:
    requests_total: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    prefix_cached_tokens: int = 0  # prompt tokens copied from kept caches instead of computed (prefix caching)
    draft_tokens: int = 0  # prompt lookup decoding: tokens drafted, and of those the ones the samples confirmed
    accepted_draft_tokens: int = 0
    preemptions: int = 0  # sequences that let their caches go to wait for memory, computed again later
    steps: int = 0
    running: int = 0
    waiting: int = 0
    last_step_ms: float = 0.0
    time_to_first_token_ms: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0  # generated tokens per second over the recent steps, as of the last step
    _rate_window: list[tuple[float, int]] = field(default_factory=list, repr=False)

    def record_step(self, generated: int, prompt: int, seconds: float) -> None:
        """One step's work: `generated` sampled tokens and `prompt` prompt tokens in `seconds`."""
        self.steps += 1
        self.tokens_generated += generated
        self.prompt_tokens += prompt
        self.last_step_ms = seconds * 1000
        now = time.monotonic()
        self._rate_window.append((now, generated))
        self._rate_window = [(t, n) for t, n in self._rate_window if now - t < RATE_WINDOW_S]
        span = now - self._rate_window[0][0] if len(self._rate_window) > 1 else 0.0
        self.tokens_per_second = sum(n for _, n in self._rate_window[1:]) / span if span > 0 else 0.0

    def record_drafts(self, proposed: int, accepted: int) -> None:
        self.draft_tokens += proposed
        self.accepted_draft_tokens += accepted

    def record_first_token(self, milliseconds: float) -> None:
        self.time_to_first_token_ms.append(milliseconds)
        del self.time_to_first_token_ms[:-TTFT_KEPT]

    def current_rate(self) -> float:
        """Generated tokens/s over the last RATE_WINDOW_S; 0 once the engine has been idle that long."""
        now = time.monotonic()
        window = [(t, n) for t, n in list(self._rate_window) if now - t < RATE_WINDOW_S]
        if not window:
            return 0.0
        span = now - window[0][0]
        return sum(n for _, n in window) / span if span > 0.05 else self.tokens_per_second
