"""Prefix caching: time to the first token of a chat's next turn, with the previous turn's caches kept vs without.

    .venv/bin/python benchmarks/prefix.py [--history-tokens 1500] [--turn-tokens 30] [--runs 3] [--threads 2]

SmolLM2-135M (the embedded Q4_1 GGUF), bf16, greedy. Two engines in this run, one keeping finished sequences'
caches (`--prefix-cache-tokens`, as `cake serve` does by default) and one not; each round sends both the same
conversation: a first turn (the history), then the next turn (the history, its answer and a new question), and
times the next turn's first token. Median of --runs after a warm-up round.
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
from cake_py.models.hub import resolve_model  # noqa: E402
from cake_py.models.sampling import SamplingParams  # noqa: E402


def answer(engine: Engine, ids: list[int], tokens: int) -> tuple[list[int], float]:
    """The greedy answer's token ids, and the seconds until its first token."""
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    began = time.perf_counter()
    engine.submit(ids, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True), events.put)
    out: list[int] = []
    first = None
    while True:
        event = events.get()
        if event.error:
            raise SystemExit(event.error)
        if event.tokens and first is None:
            first = time.perf_counter() - began
        out += [token.token_id for token in event.tokens]
        if event.finished:
            assert first is not None
            return out, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history-tokens", type=int, default=1500)
    parser.add_argument("--turn-tokens", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_model(None)
    engines = {
        kept: Engine(
            local_pipeline(source, torch.bfloat16),
            source.tokenizer,
            prefix_cache_tokens=8192 if kept else 0,
        )
        for kept in (True, False)
    }
    release_openmp_threads()  # loading ran on this thread; the engine threads must own their OpenMP pools
    for engine in engines.values():
        engine.start()
    question = source.tokenizer.encode(" Which cake was the best, and why?")
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for run in range(args.runs + 1):
            # A new conversation each round: the kept caches of earlier rounds do not match it.
            text = " ".join(f"Round {run}: cake number {i} was baked with care." for i in range(args.history_tokens))
            history = source.tokenizer.encode(text)[: args.history_tokens]
            for kept, engine in engines.items():
                reply, _ = answer(engine, history, args.turn_tokens)
                while engine.in_flight:  # the first turn's caches are kept once it is settled
                    time.sleep(0.01)
                _, first_token = answer(engine, history + reply + question, args.turn_tokens)
                if run:
                    times[kept].append(first_token)
        reused = engines[True].stats.prefix_cached_tokens
    finally:
        for engine in engines.values():
            engine.stop()
    kept_s, plain_s = statistics.median(times[True]), statistics.median(times[False])
    print(f"SmolLM2-135M Q4_1, bf16, next turn of a {args.history_tokens}-token history + {args.turn_tokens}-token "
          f"answer, {args.threads} threads, median of {args.runs}")  # fmt: skip
    print(f"time to first token, caches kept   {kept_s * 1000:8.1f} ms")
    print(f"time to first token, recomputed    {plain_s * 1000:8.1f} ms")
    print(f"speedup                            {plain_s / kept_s:8.1f}x   ({reused} prompt tokens copied in all)")


if __name__ == "__main__":
    main()
