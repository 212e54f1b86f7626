"""Int8 rows with many rows: torch's int8 weight-only kernel against the rows cast to bf16 for dense matmuls.

    .venv/bin/python benchmarks/int8_rows.py [--threads 2] [--rounds 10] [--batches 8,16,32,64] [--tokens 48]

Part 1, one linear: `quant.int8_rows_mm` (the rows cast in pieces, the scale after the matmul) against
`torch._weight_int8pack_mm` for the embedded SmolLM2's int8 lm_head (49152×576) and a 14336×4096 weight (a Llama 3
8B MLP's width), at 1 to 128 rows, alternating, median of --rounds.
Part 2, the engine: N concurrent greedy generations of the embedded model in bf16 (its lm_head is int8 rows), with
the int8 kernel at every size (before) and with the cast from `quant.INT8_DENSE_ROWS` rows (now), alternating in one
process, median of 3 rounds after a warm-up. Both measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams import concurrent_rate  # noqa: E402

from cake_py.cluster.pipeline import local_pipeline  # noqa: E402
from cake_py.engine.engine import Engine  # noqa: E402
from cake_py.models import quant  # noqa: E402
from cake_py.models.device import release_openmp_threads, tune_allocator  # noqa: E402
from cake_py.models.hub import resolve_model  # noqa: E402
from cake_py.models.sampling import SamplingParams  # noqa: E402


def millis(run: Callable[[], object], calls: int = 5) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - began) / calls * 1000


def one_linear(rounds: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for n, k in [(49152, 576), (14336, 4096)]:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
        scales = (torch.rand(n, generator=generator) / 100).bfloat16()
        print(f"\n{n}x{k} int8 rows: ms per call, median of {rounds}")
        print(f"{'rows':>5} {'int8 kernel':>12} {'cast + mm':>10} {'speed-up':>9}")
        for rows in (1, 8, 16, 32, 64, 128):
            x = torch.randn(rows, k, dtype=torch.bfloat16, generator=generator)
            kernel, cast = [], []
            for _ in range(rounds):
                kernel.append(millis(lambda x=x, q=q, s=scales: torch._weight_int8pack_mm(x, q, s)))
                cast.append(millis(lambda x=x, q=q, s=scales: quant.int8_rows_mm(x, q, s)))
            k_ms, c_ms = statistics.median(kernel), statistics.median(cast)
            print(f"{rows:>5} {k_ms:>12.2f} {c_ms:>10.2f} {k_ms / c_ms:>8.2f}x")


def engine_rates(batches: list[int], tokens: int) -> None:
    source = resolve_model(None)
    engine = Engine(local_pipeline(source, torch.bfloat16), source.tokenizer, max_running=max(batches))
    release_openmp_threads()  # loading ran on this thread; the engine thread must own the only OpenMP pool
    engine.start()
    ids = source.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story about a cake."}])
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    now = quant.INT8_DENSE_ROWS
    print(f"\nengine, {tokens} tokens per sequence, tok/s in all (prefill included), median of 3 after a warm-up")
    print(f"{'sequences':>9} {'int8 kernel':>12} {f'cast from {now} rows':>19} {'speed-up':>9}")
    try:
        for batch in batches:
            before, after = [], []
            for round_ in range(4):
                for threshold, into in ((10**9, before), (now, after)):
                    quant.INT8_DENSE_ROWS = threshold
                    measured = concurrent_rate(engine, ids, params, batch)
                    if round_:
                        into.append(measured)
            b, a = statistics.median(before), statistics.median(after)
            print(f"{batch:>9} {b:>12.1f} {a:>19.1f} {a / b:>8.2f}x")
    finally:
        quant.INT8_DENSE_ROWS = now
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batches", default="8,16,32,64")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as `cake serve` and `cake worker` run
    print(f"{args.threads} threads")
    with torch.inference_mode():
        one_linear(args.rounds)
    engine_rates([int(b) for b in args.batches.split(",")], args.tokens)


if __name__ == "__main__":
    main()
