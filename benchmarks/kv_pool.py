"""Decoding many sequences together: KV caches as rows of per-layer pools against a buffer per sequence.

    .venv/bin/python benchmarks/kv_pool.py [--threads 2] [--batches 8,16,32,64] [--tokens 64] [--rounds 3]

N concurrent greedy generations of the embedded SmolLM2 in bf16 through one Engine, with the short caches pooled
(`kv_pool.POOLED_MAX_CAPACITY` positions and below: a decode step writes and reads them with one indexed op per layer)
and with every cache in a buffer of its own (the pools off: a copy per sequence and layer to write the new token and
another to pad it into the batch), alternating in one process, median of --rounds after a warm-up. Both measured in
this run. Tokens/s count every generated token (prefill included in the time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams import concurrent_rate  # noqa: E402

from cake_py.cluster.pipeline import local_pipeline  # noqa: E402
from cake_py.engine.engine import Engine  # noqa: E402
from cake_py.models import kv_pool  # noqa: E402
from cake_py.models.device import release_openmp_threads, tune_allocator  # noqa: E402
from cake_py.models.hub import resolve_model  # noqa: E402
from cake_py.models.sampling import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="8,16,32,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as `cake serve` and `cake worker` run
    batches = [int(b) for b in args.batches.split(",")]
    source = resolve_model(None)
    engine = Engine(local_pipeline(source, torch.bfloat16), source.tokenizer, max_running=max(batches))
    release_openmp_threads()  # loading ran on this thread; the engine thread must own the only OpenMP pool
    engine.start()
    ids = source.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story about a cake."}])
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)

    pooled = kv_pool.POOLED_MAX_CAPACITY
    print(f"{args.threads} threads, {len(ids)}-token prompt, {args.tokens} tokens per sequence, tok/s in all")
    print(f"{'sequences':>9} {'a buffer each':>14} {'pooled':>9} {'speed-up':>9}")
    try:
        for batch in batches:
            before: list[float] = []
            after: list[float] = []
            for round_ in range(args.rounds + 1):
                for limit, into in ((0, before), (pooled, after)):
                    kv_pool.POOLED_MAX_CAPACITY = limit
                    measured = concurrent_rate(engine, ids, params, batch)
                    if round_:  # the first round warms up
                        into.append(measured)
            b, a = statistics.median(before), statistics.median(after)
            print(f"{batch:>9} {b:>14.1f} {a:>9.1f} {a / b:>8.2f}x")
    finally:
        kv_pool.POOLED_MAX_CAPACITY = pooled
        engine.stop()


if __name__ == "__main__":
    main()
