"""What the engine benchmarks share: the total tokens/s of N greedy generations submitted to an Engine at once."""

from __future__ import annotations

import queue
import time

from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.sampling import SamplingParams


def concurrent_rate(engine: Engine, ids: list[int], params: SamplingParams, batch: int) -> float:
    """Tokens/s of `batch` generations of `params.max_tokens` each (EOS ignored), from submission to the last one
    finished (prefill included)."""
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    began = time.perf_counter()
    for _ in range(batch):
        engine.submit(ids, params, events.put)
    finished = 0
    while finished < batch:
        finished += events.get().finished
    return batch * params.max_tokens / (time.perf_counter() - began)
