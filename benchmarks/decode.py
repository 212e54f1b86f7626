"""Decode ms/token and prefill tokens/s of SmolLM2-135M: cake_py vs transformers, same weights, same run.

    .venv/bin/python benchmarks/decode.py [--runs 5] [--tokens 128] [--threads 2]

Protocol (as ../shared/PERF.md): the Q4_1 GGUF of the embedded default, a 101-token prompt, 128 new tokens,
greedy, EOS ignored, median of --runs after a warm-up. cake_py is timed through its Engine (scheduler,
sampling and detokenization included); transformers through `generate`. Prints each figure and the ratio
transformers / cake_py (> 1 means cake_py is faster).
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

from cake_py.cluster.pipeline import Pipeline, load_ends  # noqa: E402
from cake_py.cluster.stage import LocalStage  # noqa: E402
from cake_py.engine.engine import Engine  # noqa: E402
from cake_py.models.device import release_openmp_threads  # noqa: E402
from cake_py.models.hub import ModelSource, embedded_model_path, resolve_model  # noqa: E402
from cake_py.models.sampling import SamplingParams  # noqa: E402
from cake_py.models.weights import build_transformer, load_transformer  # noqa: E402

PROMPT_TOKENS = 101


def prompt_ids(source: ModelSource) -> list[int]:
    text = "The history of the city of Paris, the capital of France, begins " * 20
    return source.tokenizer.encode(text, add_special_tokens=False)[:PROMPT_TOKENS]


def cake_pipeline(source: ModelSource, dtype: torch.dtype, dense: bool) -> Pipeline:
    config = source.config
    if dense:  # every weight dequantized to `dtype`: what a safetensors checkpoint would run
        names = [n for n in source.weights.names() if n.startswith("model.layers.")]
        layers = build_transformer(
            config, source.weights.load(names, dtype), 0, config.n_layers,
            with_embedding=False, with_head=False, dtype=dtype,
        )  # fmt: skip
        ends_tensors = source.weights.load(["model.embed_tokens.weight", "model.norm.weight"], dtype)
        ends = build_transformer(config, ends_tensors, 0, 0, with_embedding=True, with_head=True, dtype=dtype)
    else:
        layers = load_transformer(
            source.weights, config, 0, config.n_layers, with_embedding=False, with_head=False, dtype=dtype
        )
        ends = load_ends(source, dtype)
    return Pipeline(ends, [LocalStage(layers)])


def time_cake(source: ModelSource, dtype: torch.dtype, dense: bool, tokens: int, runs: int) -> tuple[float, float]:
    engine = Engine(cake_pipeline(source, dtype, dense), source.tokenizer)
    release_openmp_threads()  # loading ran on this thread; the engine thread must own the only OpenMP pool
    engine.start()
    ids = prompt_ids(source)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    decode, prefill = [], []
    try:
        for run in range(runs + 1):
            began = time.perf_counter()
            first = None
            count = 0
            for event in engine.generate(ids, params):
                count += len(event.tokens)
                if first is None and event.tokens:
                    first = time.perf_counter()
            end = time.perf_counter()
            assert first is not None and count == tokens, count
            if run:  # run 0 is the warm-up
                prefill.append(len(ids) / (first - began))
                decode.append((end - first) / (tokens - 1) * 1000)
    finally:
        engine.stop()
    return statistics.median(decode), statistics.median(prefill)


def time_transformers(dtype: torch.dtype, tokens: int, runs: int, ids: list[int]) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    inputs = torch.tensor([ids])

    def generate(n: int) -> Callable[[], None]:
        def run() -> None:
            model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip

        return run

    decode, prefill = [], []
    with torch.inference_mode():
        for run in range(runs + 1):
            began = time.perf_counter()
            generate(1)()
            first = time.perf_counter() - began
            began = time.perf_counter()
            generate(tokens)()
            total = time.perf_counter() - began
            if run:
                prefill.append(len(ids) / first)
                decode.append((total - first) / (tokens - 1) * 1000)
    return statistics.median(decode), statistics.median(prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_model(None)
    ids = prompt_ids(source)
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, {len(ids)}-token prompt, {args.tokens} new tokens, greedy, "
          f"median of {args.runs}, torch {torch.__version__}, {args.threads} threads")  # fmt: skip
    rows = []
    for label, dtype, dense in [
        ("bfloat16 (int4/int8 kernels)", torch.bfloat16, False),
        ("bfloat16 (dense)", torch.bfloat16, True),
        ("float32", torch.float32, False),
    ]:
        ours = time_cake(source, dtype, dense, args.tokens, args.runs)
        rows.append((label, dtype, ours))
    reference = {
        dtype: time_transformers(dtype, args.tokens, args.runs, ids) for dtype in (torch.bfloat16, torch.float32)
    }
    print(f"{'cake_py':32} {'decode ms/tok':>14} {'prefill tok/s':>14} | {'transformers':>13} {'prefill':>8} | "
          f"{'decode speedup':>14} {'prefill ratio':>13}")  # fmt: skip
    for label, dtype, (decode, prefill) in rows:
        ref_decode, ref_prefill = reference[dtype]
        print(f"{label:32} {decode:14.2f} {prefill:14.0f} | {ref_decode:13.2f} {ref_prefill:8.0f} | "
              f"{ref_decode / decode:13.2f}x {prefill / ref_prefill:12.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
