"""n choices of one long prompt (OpenAI's `n`): the choices sharing one prefill vs each prefilling it alone.

    .venv/bin/python benchmarks/choices.py [--n 4] [--prompt-tokens 1000] [--tokens 16] [--runs 3] [--threads 2]

SmolLM2-135M (the embedded Q4_1 GGUF), bf16, seeded sampling, EOS ignored. Both ways run on one Engine in this
run, alternating, median of --runs after a warm-up: the time until every choice has its last token. Shared, the
later choices copy the first one's KV caches once its prefill is done (what the HTTP routes do for n > 1); alone,
each is submitted as an independent request with the same prompt.
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


def seconds_for_all(engine: Engine, ids: list[int], n: int, tokens: int, share: bool) -> float:
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    began = time.perf_counter()
    leader = None
    for index in range(n):
        params = SamplingParams(temperature=0.8, max_tokens=tokens, seed=index, ignore_eos=True)
        seq_id = engine.submit(ids, params, events.put, share_prefill_with=leader if share else None)
        leader = leader or seq_id
    finished = 0
    while finished < n:
        finished += events.get().finished
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_model(None)
    text = " ".join(f"Cake number {i} was baked with care." for i in range(args.prompt_tokens))
    ids = source.tokenizer.encode(text)[: args.prompt_tokens]
    engine = Engine(local_pipeline(source, torch.bfloat16), source.tokenizer, max_batch_tokens=512)
    release_openmp_threads()  # loading ran on this thread; the engine thread must own the only OpenMP pool
    engine.start()
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for run in range(args.runs + 1):
            for share in (True, False):
                elapsed = seconds_for_all(engine, ids, args.n, args.tokens, share)
                if run:
                    times[share].append(elapsed)
    finally:
        engine.stop()
    shared, alone = statistics.median(times[True]), statistics.median(times[False])
    print(f"SmolLM2-135M Q4_1, bf16, n={args.n} choices x {args.tokens} tokens of a {len(ids)}-token prompt, "
          f"{args.threads} threads, median of {args.runs}")  # fmt: skip
    print(f"shared prefill  {shared:7.2f} s")
    print(f"each alone      {alone:7.2f} s")
    print(f"speedup         {alone / shared:7.2f}x")


if __name__ == "__main__":
    main()
