"""GGUF Q4_K layer weights on torch's int4 kernel vs dequantized to bf16 (what a Q4_K file got before).

Writes a random SmolLM2-sized Llama whose layer weights are Q4_K (tests/fixtures/q4_k.py: gguf-py cannot write
Q4_K; dimensions are multiples of Q4_K's 256-value blocks), then loads it in bf16 on the CPU twice: with Q4_K on
the int4 kernel and dequantized. Reports the bytes each holds and the anonymous resident memory its load added, and
times greedy one-token decode steps (embedding, layers, head) after a 64-token prefill, the two models alternating.

With `--mixed` the file is laid out like llama.cpp's Q4_K_M: attn_v and ffn_down of the layers it gives more bits
(the first and last eighth, every third between) stored in another type (Q8_0 here: gguf-py cannot write their Q6_K;
both run as int8 rows alike), and the baseline is what such a file got before (`dense-v`): those weights dequantized
to bf16 beside the 4-bit ones. With `--q8` every layer weight is Q8_0 (a Q8_0, Q6_K or Q5_K_M file alike): int8
rows against the same weights dequantized to bf16 (`dense`), as they ran before.

    .venv/bin/python benchmarks/q4_k.py            # --threads 1 --tokens 64 --runs 5 [--mixed | --q8]
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

from cake_py.models import weights  # noqa: E402
from cake_py.models.config import ModelConfig  # noqa: E402
from cake_py.models.device import tune_allocator  # noqa: E402
from cake_py.models.gguf import GGUFWeights  # noqa: E402
from cake_py.models.kv_cache import SequenceSlice  # noqa: E402
from cake_py.models.weights import EMBEDDING, FLOAT_TYPES, LM_HEAD, TensorInfo, load_transformer  # noqa: E402
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


def more_bits(layers: int) -> list[int]:
    """The layers whose attn_v and ffn_down llama.cpp's Q4_K_M stores in Q6_K (`use_more_bits` in llama-quant.cpp)."""
    return [i for i in range(layers) if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2]


def embedding_and_head_only(name: str, info: TensorInfo) -> bool:
    """The int8-rows rule as it was before layer weights took it: only a quantized embedding and lm_head."""
    return name in (EMBEDDING, LM_HEAD) and info.dtype not in FLOAT_TYPES


def load(path: Path, mode: str, layers: int | None = None) -> tuple[torch.nn.Module, ModelConfig]:
    """The model in bf16 on the CPU, printing what it holds and how much resident memory its load added."""
    source = GGUFWeights(path)
    if mode == "dense":  # as before Q4_K ran on the int4 kernel (and other types as int8 rows): all dequantized
        source.int4_names = set  # type: ignore[method-assign]
    config = ModelConfig.from_hf(source.config)
    before = resident_mib()
    end = config.n_layers if layers is None else layers
    rule = weights._int8_rows
    if mode in ("dense", "dense-v"):  # layer weights of other types than 4-bit dequantized, as before
        weights._int8_rows = embedding_and_head_only
    try:
        model = load_transformer(source, config, 0, end, with_embedding=True, with_head=True, dtype=torch.bfloat16)
    finally:
        weights._int8_rows = rule
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
    parser.add_argument("--mixed", action="store_true", help="a Q4_K_M-like file, against the way it ran before")
    parser.add_argument("--q8", action="store_true", help="every layer weight Q8_0: int8 rows against dense bf16")
    args = parser.parse_args()
    modes = ("int4", "dense-v") if args.mixed else ("int8", "dense") if args.q8 else ("int4", "dense")
    other = [f"blk.{i}.{part}.weight" for i in more_bits(SHAPE["layers"]) for part in ("attn_v", "ffn_down")]
    if args.q8:
        other = [
            f"{part}.weight" for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        ]
    torch.set_num_threads(args.threads)
    tune_allocator()
    with tempfile.TemporaryDirectory() as folder:
        q8_0 = tuple(other) if args.mixed or args.q8 else ()
        path = write_random_llama(Path(folder) / "q4_k.gguf", **SHAPE, q8_0=q8_0)
        layout = "Q8_0" if args.q8 else f"Q4_K, {len(other)} attn_v/ffn_down Q8_0" if args.mixed else "Q4_K"
        print(f"random Llama {SHAPE}, layer weights {layout} ({path.stat().st_size / 2**20:.1f} MiB file), bf16, "
              f"{args.threads} thread(s), {args.tokens} decode steps, median of {args.runs} runs")  # fmt: skip
        for mode in modes:
            load(path, mode, layers=1)
        models = {mode: load(path, mode) for mode in modes}
        times: dict[str, list[float]] = {mode: [] for mode in models}
        with torch.inference_mode():
            for run in range(args.runs + 1):  # the first round is a warm-up
                for mode, (model, config) in models.items():
                    if run:
                        times[mode].append(decode_ms(model, config, args.tokens))
                    else:
                        decode_ms(model, config, 4)
    kept, baseline = (statistics.median(times[mode]) for mode in modes)
    print(f"decode: {modes[0]} {kept:.2f} ms/token, {modes[1]} {baseline:.2f} ms/token ({baseline / kept:.2f}x)")


if __name__ == "__main__":
    main()
