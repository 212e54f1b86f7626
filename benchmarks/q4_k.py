"""GGUF Q4_K layer weights on torch's int4 kernel vs dequantized to bf16 (what a Q4_K file got before).

Writes a random SmolLM2-sized Llama whose layer weights are Q4_K (tests/fixtures/q4_k.py: gguf-py cannot write
Q4_K; dimensions are multiples of Q4_K's 256-value blocks), then loads it in bf16 on the CPU twice: with Q4_K on
the int4 kernel and dequantized. Reports the bytes each holds and the anonymous resident memory its load added, and
times greedy one-token decode steps (embedding, layers, head) after a 64-token prefill, the two models alternating.

    .venv/bin/python benchmarks/q4_k.py            # --threads 1 --tokens 64 --runs 5
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cake_py.models.config import ModelConfig  # noqa: E402
from cake_py.models.device import tune_allocator  # noqa: E402
from cake_py.models.gguf import GGUFWeights  # noqa: E402
from cake_py.models.kv_cache import SequenceSlice  # noqa: E402
from cake_py.models.weights import load_transformer  # noqa: E402
from tests.fixtures.q4_k import write_random_llama  # noqa: E402

SHAPE = {"hidden": 512, "intermediate": 1536, "layers": 30, "heads": 8, "kv_heads": 4, "vocab": 8192}


def resident_mib() -> float:
    """Anonymous resident memory (the mapped GGUF file's pages left out), after handing freed heap back."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(path: Path, mode: str, layers: int | None = None) -> tuple[torch.nn.Module, ModelConfig]:
    """The model in bf16 on the CPU, printing what it holds and how much resident memory its load added."""
    source = GGUFWeights(path)
    if mode == "dense":  # as before: Q4_K was not among the weights handed over as 4-bit
        source.int4_names = set  # type: ignore[method-assign]
    config = ModelConfig.from_hf(source.config)
    before = resident_mib()
    end = config.n_layers if layers is None else layers
    model = load_transformer(source, config, 0, end, with_embedding=True, with_head=True, dtype=torch.bfloat16)
    if layers is not None:  # a warm-up: the first load's one-time allocations (libraries, pools) are not a model's
        return model, config
    held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()]) / 2**20
    print(f"{mode:6} | {held:6.1f} MiB held | resident memory +{resident_mib() - before:6.1f} MiB")
    return model, config


def decode_ms(model: Any, config: ModelConfig, tokens: int) -> float:
    """Median ms of `tokens` greedy one-token steps after a 64-token prefill."""
    kv = model.new_kv_store()
    prompt = torch.arange(64) % config.vocab_size
    logits = model.head(model.forward_layers(model.embed(prompt), [SequenceSlice(0, 0, 64)], kv))
    token, times = logits[-1].argmax().reshape(1), []
    for position in range(64, 64 + tokens):
        start = time.perf_counter()
        hidden = model.forward_layers(model.embed(token), [SequenceSlice(0, position, 1)], kv)
        token = model.head(hidden)[-1].argmax().reshape(1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    with tempfile.TemporaryDirectory() as folder:
        path = write_random_llama(Path(folder) / "q4_k.gguf", **SHAPE)
        print(f"random Llama {SHAPE}, layer weights Q4_K ({path.stat().st_size / 2**20:.1f} MiB file), bf16, "
              f"{args.threads} thread(s), {args.tokens} decode steps, median of {args.runs} runs")  # fmt: skip
        for mode in ("int4", "dense"):
            load(path, mode, layers=1)
        models = {mode: load(path, mode) for mode in ("int4", "dense")}
        times: dict[str, list[float]] = {mode: [] for mode in models}
        with torch.inference_mode():
            for run in range(args.runs + 1):  # the first round is a warm-up
                for mode, (model, config) in models.items():
                    if run:
                        times[mode].append(decode_ms(model, config, args.tokens))
                    else:
                        decode_ms(model, config, 4)
    int4, dense = (statistics.median(times[mode]) for mode in ("int4", "dense"))
    print(f"decode: int4 {int4:.2f} ms/token, dense {dense:.2f} ms/token ({dense / int4:.2f}x)")


if __name__ == "__main__":
    main()
