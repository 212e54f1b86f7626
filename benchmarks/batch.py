"""Continuous batching: total tokens/s of N concurrent generations, cake_py's Engine vs transformers batch N.

    .venv/bin/python benchmarks/batch.py [--batch 8] [--tokens 64] [--runs 3] [--threads 2]

SmolLM2-135M (the embedded Q4_1 GGUF), bf16, greedy, EOS ignored, the same short prompt for every sequence,
median of --runs after a warm-up, both measured in this run. cake_py's sequences are submitted to one Engine at
once (its continuous batching runs them together); transformers runs them as one padded `generate` batch.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cake_py.cluster.pipeline import local_pipeline  # noqa: E402
from cake_py.engine.engine import Engine  # noqa: E402
from cake_py.engine.sequence import GenerationEvent  # noqa: E402
from cake_py.models.device import release_openmp_threads  # noqa: E402
from cake_py.models.hub import embedded_model_path, resolve_model  # noqa: E402
from cake_py.models.sampling import SamplingParams  # noqa: E402


def cake_tokens_per_second(ids: list[int], batch: int, tokens: int, runs: int) -> float:
    source = resolve_model(None)
    engine = Engine(local_pipeline(source, torch.bfloat16), source.tokenizer)
    release_openmp_threads()  # loading ran on this thread; the engine thread must own the only OpenMP pool
    engine.start()
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    rates = []
    try:
        for run in range(runs + 1):
            events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
            began = time.perf_counter()
            for _ in range(batch):
                engine.submit(ids, params, events.put)  # one consumer, like the HTTP server's event loop
            finished = 0
            while finished < batch:
                finished += events.get().finished
            if run:
                rates.append(batch * tokens / (time.perf_counter() - began))
    finally:
        engine.stop()
    return statistics.median(rates)


def transformers_tokens_per_second(ids: list[int], batch: int, tokens: int, runs: int) -> float:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16).eval()
    inputs = torch.tensor([ids] * batch)
    rates = []
    with torch.inference_mode():
        for run in range(runs + 1):
            began = time.perf_counter()
            model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=tokens, min_new_tokens=tokens,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
            if run:
                rates.append(batch * tokens / (time.perf_counter() - began))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_model(None)
    ids = source.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story about a cake."}])
    ours = cake_tokens_per_second(ids, args.batch, args.tokens, args.runs)
    reference = transformers_tokens_per_second(ids, args.batch, args.tokens, args.runs)
    print(f"SmolLM2-135M Q4_1, bf16, {args.batch} sequences x {args.tokens} tokens, {len(ids)}-token prompt, "
          f"{args.threads} threads, median of {args.runs}")  # fmt: skip
    print(f"cake_py engine      {ours:8.1f} tok/s")
    print(f"transformers batch  {reference:8.1f} tok/s")
    print(f"ratio               {ours / reference:8.2f}x")


if __name__ == "__main__":
    main()
