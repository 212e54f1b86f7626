"""Decode steps of several sequences with long caches: the attention path chosen by cache length (one padded pass
over short caches, one pass per sequence over long ones, on a CPU) against always one padded pass (the baseline), or
with `--baseline one-by-one` against always one pass per sequence.

    .venv/bin/python benchmarks/long_context.py [--sequences 8] [--contexts 64,256,1024,2048] [--steps 5]
                                                [--threads 2] [--rounds 3] [--baseline padded|one-by-one]

SmolLM2-135M (the embedded Q4_1 GGUF), bf16 with int4 kernels, the master's local stage alone (no engine, no
sampling): each sequence is prefilled to the context length, then each configuration runs --steps decode steps of
all sequences at once, alternating, --rounds times; ms per step, the median of the rounds' medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams import embedded_stage  # noqa: E402

from cake_py.models import llama  # noqa: E402
from cake_py.models.kv_cache import SequenceSlice  # noqa: E402


def decode_steps(stage: Any, ends: Any, seq_ids: list[int], position: int, n_steps: int) -> tuple[float, int]:
    """Median ms of `n_steps` decode steps of every sequence from `position`; and the position after them."""
    times = []
    for _ in range(n_steps):
        began = time.perf_counter()
        batch = [SequenceSlice(seq_id, position, 1) for seq_id in seq_ids]
        stage.forward(ends.embed(torch.full((len(seq_ids),), 5)), batch)
        times.append((time.perf_counter() - began) * 1000)
        position += 1
    return statistics.median(times), position


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--contexts", default="64,256,1024,2048")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", choices=("padded", "one-by-one"), default="padded")
    args = parser.parse_args()
    stage, ends = embedded_stage(args.threads)
    adaptive = llama.BATCHED_DECODE_MAX_KEYS
    baseline_limit = 10**9 if args.baseline == "padded" else 0
    print(f"{args.sequences} sequences, ms per decode step of all of them ({args.threads} threads)")
    print(f"{'context':>8} {'always ' + args.baseline:>18} {'chosen by length':>17} {'speedup':>8}")
    with torch.inference_mode():
        for context in (int(value) for value in args.contexts.split(",")):
            seq_ids = [context * 1000 + index for index in range(args.sequences)]
            for seq_id in seq_ids:
                stage.forward(ends.embed(torch.arange(100, 100 + context)), [SequenceSlice(seq_id, 0, context)])
            position = context
            results: dict[int, list[float]] = {baseline_limit: [], adaptive: []}
            for _ in range(args.rounds):
                for limit in results:
                    llama.BATCHED_DECODE_MAX_KEYS = limit
                    step_ms, position = decode_steps(stage, ends, seq_ids, position, args.steps)
                    results[limit].append(step_ms)
            baseline, chosen = statistics.median(results[baseline_limit]), statistics.median(results[adaptive])
            print(f"{context:>8} {baseline:>18.1f} {chosen:>17.1f} {baseline / chosen:>7.2f}×")
            stage.release(seq_ids)
            llama.BATCHED_DECODE_MAX_KEYS = adaptive


if __name__ == "__main__":
    main()
