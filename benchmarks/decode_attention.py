"""Decode attention in torch's fused kernel (scaled_dot_product_attention, in the caches' dtype) against float32
matmuls over the caches converted to float32 (the baseline: what every decode step ran before, a padded batch's
caches gathered from their pool first).

    .venv/bin/python benchmarks/decode_attention.py [--threads 2] [--batches 8:100,32:100,8:1000,32:1000]
                                                    [--single 100,1000,4000] [--steps 6] [--rounds 4]

SmolLM2-135M (the embedded Q4_1 GGUF), bf16 with int4 kernels, the 30 layers of the master's local stage alone (no
engine, no sampling). For each N:CONTEXT of --batches, N sequences are prefilled to CONTEXT and decode together (one
padded pass); for each CONTEXT of --single, one sequence decodes alone. The two attentions alternate, --steps decode
steps each, --rounds times after a warm-up round; ms per step, the median of the rounds' medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams import embedded_stage  # noqa: E402

from cake_py.models.kv_cache import Batch, LayerCache, SequenceSlice, decode_step  # noqa: E402
from cake_py.models.llama import Attention  # noqa: E402


def float32_decode_attention(
    self: Attention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """The baseline for one sequence: two float32 bmm's per step over its cache converted to float32."""
    group = self.n_heads // self.n_kv_heads
    grouped = q.view(self.n_kv_heads, group, self.head_dim).float()  # (n_kv_heads, group, head_dim)
    scores = torch.bmm(grouped, keys.float().transpose(1, 2)) * self.scale  # (n_kv_heads, group, L)
    out = torch.bmm(torch.softmax(scores, dim=-1), values.float())  # (n_kv_heads, group, head_dim)
    return out.to(values.dtype).reshape(1, self.n_heads * self.head_dim)


def float32_batched_attention(
    self: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, caches: list[LayerCache]
) -> torch.Tensor:
    """The baseline for a padded batch: every cache gathered into it, converted to float32, two matmuls."""
    n, group = len(batch), self.n_heads // self.n_kv_heads
    positions = [piece.start_pos for piece in batch]
    keys, values, rows = decode_step(caches, positions, k, v)
    if rows is not None:  # the baseline gathered every cache's row
        keys, values = keys.index_select(0, rows), values.index_select(0, rows)
    queries = q.view(n, self.n_kv_heads, group, self.head_dim).float()  # (n, n_kv_heads, group, head_dim)
    scores = torch.matmul(queries, keys.float().transpose(-1, -2)) * self.scale  # (n, n_kv_heads, group, L)
    padding = torch.arange(keys.shape[2])[None, :] > torch.tensor(positions)[:, None]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values.float())  # (n, n_kv_heads, group, head_dim)
    return out.to(v.dtype).reshape(n, self.n_heads * self.head_dim)


class Decoding:
    """Sequences decoding together from `position`: one step of all of them per call."""

    def __init__(self, stage: Any, ends: Any, seq_ids: list[int], position: int) -> None:
        self.stage, self.ends, self.seq_ids, self.position = stage, ends, seq_ids, position

    def __call__(self) -> None:
        batch = [SequenceSlice(seq_id, self.position, 1) for seq_id in self.seq_ids]
        self.stage.forward(self.ends.embed(torch.full((len(self.seq_ids),), 5)), batch)
        self.position += 1


def compare(step: Callable[[], None], rounds: int, steps: int) -> tuple[float, float]:
    """Median ms per step with the baseline and with the fused kernel, alternating."""
    fused = (Attention._decode_attention, Attention._batched_decode_attention)
    baseline = (float32_decode_attention, float32_batched_attention)
    results: dict[str, list[float]] = {"baseline": [], "fused": []}
    try:
        for round_ in range(rounds + 1):
            for name, (single, batched) in (("baseline", baseline), ("fused", fused)):
                Attention._decode_attention, Attention._batched_decode_attention = single, batched  # type: ignore[method-assign]
                times = []
                for _ in range(steps):
                    began = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - began) * 1000)
                if round_:  # the first round warms up
                    results[name].append(statistics.median(times))
    finally:
        Attention._decode_attention, Attention._batched_decode_attention = fused  # type: ignore[method-assign]
    return statistics.median(results["baseline"]), statistics.median(results["fused"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="8:100,32:100,8:1000,32:1000")
    parser.add_argument("--single", default="100,1000,4000")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    stage, ends = embedded_stage(args.threads)
    configs = [tuple(int(part) for part in item.split(":")) for item in args.batches.split(",") if item]
    configs += [(1, int(context)) for context in args.single.split(",") if context]
    print(f"ms per decode step of all sequences ({args.threads} threads)")
    print(f"{'sequences':>9} {'context':>8} {'float32 matmuls':>16} {'fused kernel':>13} {'speedup':>8}")
    next_id = 0
    with torch.inference_mode():
        for n, context in configs:
            seq_ids = list(range(next_id, next_id + n))
            next_id += n
            for seq_id in seq_ids:
                stage.forward(ends.embed(torch.arange(100, 100 + context)), [SequenceSlice(seq_id, 0, context)])
            step = Decoding(stage, ends, seq_ids, context)
            baseline, fused = compare(step, args.rounds, args.steps)
            print(f"{n:>9} {context:>8} {baseline:>16.2f} {fused:>13.2f} {baseline / fused:>7.2f}×", flush=True)
            stage.release(seq_ids)


if __name__ == "__main__":
    main()
