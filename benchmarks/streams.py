"""What the engine benchmarks share: the total tokens/s of N greedy generations submitted to an Engine at once, and
the embedded model's local stage run by hand."""

from __future__ import annotations

import queue
import time
from typing import Any

import torch

from cake_py.cluster.pipeline import local_pipeline
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.device import tune_allocator
from cake_py.models.hub import resolve_model
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


def embedded_stage(threads: int) -> tuple[Any, Any]:
    """The embedded SmolLM2 in bf16 (int4 kernels) as the single node's local stage and its ends (embedding, head),
    with `threads` torch threads and the engine thread's allocator settings."""
    torch.set_num_threads(threads)
    tune_allocator()  # as the engine thread runs
    pipeline = local_pipeline(resolve_model(None), torch.bfloat16)
    return pipeline.stages[0], pipeline.ends
