"""A sparse layer's mixture-of-experts tensors (HF names) → `SparseMoE` parameters (models/moe.py).

Checkpoints store the experts in one of three forms, all accepted:
- one tensor per expert and projection, as the Hub's checkpoints (and transformers' save_pretrained) do:
  Mixtral's `block_sparse_moe.experts.N.w1/w3/w2` (gate/up/down), Qwen's `mlp.experts.N.gate_proj/up_proj/down_proj`;
- 3D tensors, transformers' in-memory layout: `mlp.experts.gate_up_proj` (n_experts, 2 · size, hidden) and
  `mlp.experts.down_proj` (n_experts, hidden, size);
- 3D tensors per projection, llama.cpp's (gguf_moe.py names them `mlp.experts.gate_proj.weight` / `up_proj` /
  `down_proj`).
The router is `<mlp>.gate.weight`; Qwen2-MoE's shared expert `mlp.shared_expert.*` and `mlp.shared_expert_gate`
(llama.cpp stores that gate as a vector).

With 16-bit compute, load_stage_tensors keeps a GGUF's 4-bit 3D experts (Q4_0, Q4_1, Q4_K) as their 4-bit values
(`.q4_weight` (E, N, K) + `.q4_scales` (E, K/32, N, 2)) and its other quantized ones as int8 rows (`.q8_weight` +
`.q8_scales`): the names they stream to workers under. They stay so, as `<layer>.feed_forward.w13.q4_weight` …
(gate ‖ up of one form; a 4-bit gate beside an int8 up become int8 rows both), and `install_quantized_experts` hands
them to their `SparseMoE` (on a CPU) or dequantizes them (elsewhere, where torch's kernels do not run).
"""

from __future__ import annotations

import torch

from cake_py.errors import WeightsError
from cake_py.models.config_moe import MoeConfig
from cake_py.models.moe import SparseMoE
from cake_py.models.quant import (
    Q4_SCALES,
    Q4_WEIGHT,
    Q8_SCALES,
    Q8_WEIGHT,
    dequantize,
    dequantize_rows_int8,
    int4_supported,
    quantize_rows_int8,
)
from cake_py.models.quantized_modules import dequantized

# Mixtral's names for an expert's gate, up and down projections; Qwen's are gate_proj, up_proj, down_proj.
MIXTRAL_PROJECTIONS = ("w1", "w3", "w2")
QWEN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def sparse_mlp_state(tensors: dict[str, torch.Tensor], moe: MoeConfig, hf: str, ours: str) -> dict[str, torch.Tensor]:
    """The `SparseMoE` state (under `ours`, e.g. `layers.0.feed_forward.`) of the layer whose HF names start with
    `hf` (`model.layers.N.`); WeightsError naming a tensor that is missing."""

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            prefix = name.removesuffix(".weight")
            weight = dequantized(tensors, prefix)  # a GGUF's quantized 2D weight, kept as int8 rows
            if weight is None:
                raise WeightsError(f"tensor {name!r} is missing from the weights")
            return weight
        return tensors[name]

    mlp = hf + ("block_sparse_moe." if f"{hf}block_sparse_moe.gate.weight" in tensors else "mlp.")
    experts = mlp + "experts."
    state = {ours + "gate.weight": take(mlp + "gate.weight")}
    if experts + "gate_up_proj" in tensors:
        state[ours + "w13"], state[ours + "w2"] = tensors[experts + "gate_up_proj"], take(experts + "down_proj")
    elif any(f"{experts}gate_proj.{kind}" in tensors for kind in ("weight", Q4_WEIGHT, Q8_WEIGHT)):
        per_projection = {"w13": ["gate_proj", "up_proj"], "w2": ["down_proj"]}
        for target, names in per_projection.items():
            parts = [experts + name for name in names]
            if all(f"{part}.{Q4_WEIGHT}" in tensors for part in parts):  # kept as 4-bit values: stays so
                state[f"{ours}{target}.{Q4_WEIGHT}"] = _joined([tensors[f"{p}.{Q4_WEIGHT}"] for p in parts], dim=1)
                state[f"{ours}{target}.{Q4_SCALES}"] = _joined([tensors[f"{p}.{Q4_SCALES}"] for p in parts], dim=2)
            elif all(f"{part}.{Q4_WEIGHT}" in tensors or f"{part}.{Q8_WEIGHT}" in tensors for part in parts):
                # int8 rows (4-bit parts beside int8 ones made int8 rows too, as the experts stood before int4)
                rows = [_int8_rows(tensors, part) for part in parts]
                state[f"{ours}{target}.{Q8_WEIGHT}"] = _joined([q for q, _ in rows], dim=1)
                state[f"{ours}{target}.{Q8_SCALES}"] = _joined([scales for _, scales in rows], dim=1)
            else:
                state[ours + target] = _joined([take(f"{part}.weight") for part in parts], dim=1)
    else:
        projections = MIXTRAL_PROJECTIONS if f"{experts}0.w1.weight" in tensors else QWEN_PROJECTIONS
        gate_name, up_name, down_name = projections
        fused = [
            _joined([take(f"{experts}{e}.{gate_name}.weight"), take(f"{experts}{e}.{up_name}.weight")], dim=0)
            for e in range(moe.n_experts)
        ]
        state[ours + "w13"] = _stacked(fused)
        state[ours + "w2"] = _stacked([take(f"{experts}{e}.{down_name}.weight") for e in range(moe.n_experts)])
    if moe.shared_expert_intermediate_size is not None:
        shared = mlp + "shared_expert."
        state[ours + "shared_expert.w13.weight"] = _joined(
            [take(shared + "gate_proj.weight"), take(shared + "up_proj.weight")], dim=0
        )
        state[ours + "shared_expert.w2.weight"] = take(shared + "down_proj.weight")
        state[ours + "shared_expert_gate.weight"] = take(mlp + "shared_expert_gate.weight").reshape(1, -1)
    return state


def install_quantized_experts(
    model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str
) -> set[str]:
    """Each `SparseMoE` weight whose state is 4-bit values (`<path>.w13.q4_weight` + `.q4_scales`) or int8 rows
    (`.q8_weight` + `.q8_scales`) keeps them, taken out of `state`, where torch's kernels run (a CPU, 16-bit
    compute); elsewhere the entry becomes the dense weight (float32, `placed` casts it). Returns the paths of the
    `Int4Linear`s made (their buffers are not in the state dict)."""
    kernels = int4_supported(device, dtype)
    installed: set[str] = set()
    for path, module in list(model.named_modules()):  # listed first: keep_int4 adds modules
        if not isinstance(module, SparseMoE):
            continue
        for name in ("w13", "w2"):
            key = f"{path}.{name}"
            if f"{key}.{Q4_WEIGHT}" in state:
                q, scales = state.pop(f"{key}.{Q4_WEIGHT}"), state.pop(f"{key}.{Q4_SCALES}")
                if kernels:
                    module.keep_int4(name, q, scales, dtype)
                    installed.update(f"{key}_q4.{expert}" for expert in range(len(q)))
                else:
                    state[key] = dequantize(q, scales)
            elif f"{key}.{Q8_WEIGHT}" in state:
                q, scales = state.pop(f"{key}.{Q8_WEIGHT}"), state.pop(f"{key}.{Q8_SCALES}")
                if kernels:
                    module.keep_int8(name, q.contiguous(), scales, dtype)
                else:
                    state[key] = dequantize_rows_int8(q, scales)
    return installed


def _int8_rows(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefix`'s experts as int8 rows and their scales: as stored, or made from its 4-bit values."""
    if f"{prefix}.{Q8_WEIGHT}" in tensors:
        return tensors[f"{prefix}.{Q8_WEIGHT}"], tensors[f"{prefix}.{Q8_SCALES}"]
    return quantize_rows_int8(dequantize(tensors[f"{prefix}.{Q4_WEIGHT}"], tensors[f"{prefix}.{Q4_SCALES}"]))


def _joined(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat, checking that the pieces fit; on the meta device (a shapes-only build) without torch.cat's meta
    kernel, whose first call imports torch._dynamo (a second and more, see weights.to_module_state)."""
    first = pieces[0]
    rest = {(p.dim(), *p.shape[:dim], *p.shape[dim + 1 :]) for p in pieces}  # all but `dim` must agree
    if len(rest) != 1 or first.dim() <= dim:
        shapes = ", ".join(str(tuple(p.shape)) for p in pieces)
        raise WeightsError(f"expert tensors that make one projection do not fit together: {shapes}")
    if first.is_meta:
        shape = [*first.shape]
        shape[dim] = sum(p.shape[dim] for p in pieces)
        return torch.empty(shape, dtype=first.dtype, device="meta")
    return torch.cat(pieces, dim=dim)


def _stacked(pieces: list[torch.Tensor]) -> torch.Tensor:
    """One (n_experts, …) tensor of per-expert tensors of one shape."""
    if len({tuple(p.shape) for p in pieces}) != 1:
        raise WeightsError(f"experts of one layer have different shapes: {sorted({tuple(p.shape) for p in pieces})}")
    return _joined([p.unsqueeze(0) for p in pieces], dim=0)
