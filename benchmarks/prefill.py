"""Prefill tokens/s of SmolLM2-135M with 4-bit weights: unpacked to bf16 per chunk vs the int4 kernel vs dense bf16.

    .venv/bin/python benchmarks/prefill.py [--rows 1,8,64,101,256,512] [--threads 2,1] [--rounds 5]

The embedded Q4_1 GGUF in bf16, the master's local stage alone (no engine, no sampling): one chunk of --rows
tokens at positions 0.. through all 30 layers, timed three ways, alternating, --rounds times, the median of each:
4-bit weights as they run now (the int4 kernel below `quant.DENSE_ROWS` rows, unpacked to bf16 for one dense
matmul from it), the int4 kernel at every size (as before), and every weight dequantized to bf16 once at load
(the dense model, 4× the memory). Prints tokens/s and the ratios against the other two; rows under the
threshold (a decode step's) run the kernel both ways, so their ratio against it shows only noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cake_py.cluster.stage import LocalStage  # noqa: E402
from cake_py.models import quant  # noqa: E402
from cake_py.models.device import tune_allocator  # noqa: E402
from cake_py.models.hub import resolve_model  # noqa: E402
from cake_py.models.kv_cache import SequenceSlice  # noqa: E402
from cake_py.models.weights import build_transformer, load_transformer  # noqa: E402

PATHS = ("unpacked from", "int4 kernel", "dense bf16")


def prefill_ms(stage: LocalStage, hidden: torch.Tensor, seq_id: int) -> float:
    began = time.perf_counter()
    stage.forward(hidden, [SequenceSlice(seq_id, 0, hidden.shape[0])])
    elapsed = (time.perf_counter() - began) * 1000
    stage.release([seq_id])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,64,101,256,512")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tune_allocator()  # as the engine thread runs
    source = resolve_model(None)
    config = source.config
    dtype = torch.bfloat16
    four_bit = LocalStage(load_transformer(source.weights, config, 0, config.n_layers, dtype=dtype,
                                           with_embedding=False, with_head=False))  # fmt: skip
    names = [name for name in source.weights.names() if name.startswith("model.layers.")]
    dense = LocalStage(build_transformer(config, source.weights.load(names, dtype), 0, config.n_layers,
                                         with_embedding=False, with_head=False, dtype=dtype))  # fmt: skip
    stages = {PATHS[0]: four_bit, PATHS[1]: four_bit, PATHS[2]: dense}
    threshold = quant.DENSE_ROWS
    generator = torch.Generator().manual_seed(0)
    print(f"SmolLM2-135M Q4_1, bf16, one prefill chunk through {config.n_layers} layers, tokens/s, median of "
          f"{args.rounds}, torch {torch.__version__}; 4-bit weights unpacked from {threshold} rows")  # fmt: skip
    print(f"{'threads':>7} {'rows':>5} | {PATHS[0] + ' ' + str(threshold):>16} {PATHS[1]:>12} {PATHS[2]:>11} | "
          f"{'vs int4':>7} {'vs dense':>8}")  # fmt: skip
    with torch.inference_mode():
        for threads in (int(value) for value in args.threads.split(",")):
            torch.set_num_threads(threads)
            for rows in (int(value) for value in args.rows.split(",")):
                hidden = torch.randn(rows, config.hidden_size, generator=generator).to(dtype)
                times: dict[str, list[float]] = {path: [] for path in PATHS}
                for round_ in range(args.rounds + 1):
                    for index, (path, stage) in enumerate(stages.items()):
                        quant.DENSE_ROWS = 10**9 if path == PATHS[1] else threshold
                        elapsed = prefill_ms(stage, hidden, index)
                        if round_:  # round 0 warms up
                            times[path].append(elapsed)
                quant.DENSE_ROWS = threshold
                rate = {path: rows / statistics.median(times[path]) * 1000 for path in PATHS}
                print(f"{threads:>7} {rows:>5} | {rate[PATHS[0]]:>16.0f} {rate[PATHS[1]]:>12.0f} "
                      f"{rate[PATHS[2]]:>11.0f} | {rate[PATHS[0]] / rate[PATHS[1]]:>6.2f}× "
                      f"{rate[PATHS[0]] / rate[PATHS[2]]:>7.2f}×")  # fmt: skip


if __name__ == "__main__":
    main()
