"""One mixture-of-experts feed-forward layer in bfloat16 on the CPU: cake_py's `SparseMoE` against transformers' own
sparse block on the same weights, the same layer with its experts as int8 rows (a GGUF's other quantized experts)
and as int4 groups of 32 (a GGUF's Q4_0/Q4_1/Q4_K experts in bf16, one `Int4Linear` per expert), a dense MLP as
wide as the k experts a token runs, and one as wide as every expert.

    .venv/bin/python benchmarks/moe.py [--rows 1,128] [--threads 1] [--rounds 7]

Two shapes, each a scaled-down published model with its own expert count and top k: Mixtral-like (8 experts, 2 per
token, hidden 1024, experts 3584 wide) and Qwen3-MoE-like (128 experts, 8 per token, hidden 1024, experts 384
wide). For each --rows (1: a decode step; more: a prefill chunk), they are timed alternating, --rounds times,
the median of each; the ratios are against cake_py's. "dense k·I" is the floor a sparse layer can approach (the
same multiply-adds and weight bytes per token), "dense E·I" what computing every expert would cost.
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

from cake_py.models.config import ModelConfig  # noqa: E402
from cake_py.models.config_moe import MoeConfig  # noqa: E402
from cake_py.models.llama import FeedForward  # noqa: E402
from cake_py.models.moe import SparseMoE  # noqa: E402
from cake_py.models.quant import GROUP_SIZE, quantize_rows_int8  # noqa: E402

# name → (n_experts, top_k, hidden, expert width, the transformers config class and its expert-count field)
SHAPES = {
    "mixtral-like": (8, 2, 1024, 3584, "MixtralConfig", "num_local_experts"),
    "qwen3-moe-like": (128, 8, 1024, 384, "Qwen3MoeConfig", "num_experts"),
}


def quantize_int4(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, K) → uint8 (E, N, K) values 0..15 and float32 (E, K/32, N, 2) scale and zero per group of 32, as a
    GGUF's Q4_1 blocks are: `(q - 8) * scale + zero` spans each group's min to max."""
    n_experts, n, k = weights.shape
    groups = weights.float().reshape(n_experts, n, k // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.uint8).reshape(n_experts, n, k)
    scales = torch.stack([scale[..., 0], low[..., 0] + 8 * scale[..., 0]], dim=-1)  # (E, N, K/32, 2)
    return q, scales.transpose(1, 2).contiguous()


def build(name: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    import transformers

    n_experts, top_k, hidden, width, config_class, count_field = SHAPES[name]
    config = ModelConfig("mixtral", 10, hidden, width, 1, 8, 8, hidden // 8)
    moe = MoeConfig(n_experts, top_k, width, True, name.startswith("mixtral"), (True,))
    ours = SparseMoE(config, moe)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0.0, 0.02)
    ours = ours.to(torch.bfloat16).eval()
    reference_config = getattr(transformers, config_class)(
        hidden_size=hidden,
        intermediate_size=width,
        moe_intermediate_size=width,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        **{count_field: n_experts},
    )
    block_class = (
        transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock
        if name.startswith("mixtral")
        else transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock
    )
    reference = block_class(reference_config).to(torch.bfloat16).eval()
    with torch.no_grad():  # the same weights
        reference.gate.weight.copy_(ours.gate.weight)
        reference.experts.gate_up_proj.copy_(ours.w13)
        reference.experts.down_proj.copy_(ours.w2)
    int8 = SparseMoE(config, moe).to(torch.bfloat16).eval()
    int8.gate.load_state_dict(ours.gate.state_dict())
    for weight in ("w13", "w2"):
        int8.keep_int8(weight, *quantize_rows_int8(getattr(ours, weight)), torch.bfloat16)
    int4 = SparseMoE(config, moe).to(torch.bfloat16).eval()
    int4.gate.load_state_dict(ours.gate.state_dict())
    for weight in ("w13", "w2"):
        int4.keep_int4(weight, *quantize_int4(getattr(ours, weight)), torch.bfloat16)
    active = FeedForward(ModelConfig("llama", 10, hidden, top_k * width, 1, 8, 8, hidden // 8)).to(torch.bfloat16)
    every = FeedForward(ModelConfig("llama", 10, hidden, n_experts * width, 1, 8, 8, hidden // 8)).to(torch.bfloat16)
    return {
        "cake_py SparseMoE": ours,
        "transformers block": lambda x: reference(x[None])[0],
        "int8 experts": int8,
        "int4 experts": int4,
        "dense k·I": active,
        "dense E·I": every,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in SHAPES:
        paths = build(name)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, SHAPES[name][2], dtype=torch.bfloat16)
            times: dict[str, list[float]] = {path: [] for path in paths}
            with torch.inference_mode():
                for round_index in range(args.rounds + 1):
                    for path, run in paths.items():
                        began = time.perf_counter()
                        run(x)
                        if round_index:  # the first round warms up
                            times[path].append((time.perf_counter() - began) * 1000)
            ours = statistics.median(times["cake_py SparseMoE"])
            shown = ", ".join(
                f"{path} {statistics.median(t):.2f} ms ({statistics.median(t) / ours:.2f}×)"
                for path, t in times.items()
            )
            print(f"{name}, {rows} rows: {shown}")


if __name__ == "__main__":
    main()
