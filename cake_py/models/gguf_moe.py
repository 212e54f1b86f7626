"""Mixture-of-experts GGUFs, translated back to their HF form: Mixtral (`general.architecture = llama` with
`llama.expert_count`), Qwen2-MoE (`qwen2moe`) and Qwen3-MoE (`qwen3moe`).

What llama.cpp stores differently from a HF checkpoint (convert_hf_to_gguf.py, llama-model.cpp):
- each layer's experts as 3D tensors, one per projection: `ffn_gate_exps` / `ffn_up_exps` (n_experts, size, hidden)
  and `ffn_down_exps` (n_experts, hidden, size) once its innermost-first shape is read; they are named
  `mlp.experts.{gate,up,down}_proj.weight` here (weights_moe.py reads that form) and loaded dequantized, or with
  16-bit compute kept 4-bit (Q4_0, Q4_1, Q4_K) or as int8 rows (other quantized types);
- the router as `ffn_gate_inp`; Qwen2-MoE's shared expert as `ffn_{gate,up,down}_shexp` and its gate as the vector
  `ffn_gate_inp_shexp`;
- the routing as llama.cpp fixes it per architecture: top-k weights renormalised for Mixtral and Qwen3-MoE, not for
  Qwen2-MoE, unless the file says otherwise (`expert_weights_norm`); a layer without a router is dense;
- the expert widths, where the first Qwen2-MoE conversions left them out, as llama.cpp derives them: experts
  `feed_forward_length / expert_used_count` wide, the shared expert `feed_forward_length` wide.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

ARCHITECTURES = {"qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
MIXTRAL = "MixtralForCausalLM"  # a `llama` GGUF with experts
BLOCK_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
ROUTER = "mlp.gate.weight"
# Whether llama.cpp renormalises the top-k routing weights, per architecture (its build_moe_ffn's norm_w).
NORMALISED = {"llama": True, "qwen2moe": False, "qwen3moe": True}


def moe_fields(arch: str, value: Callable[..., Any], names: Collection[str], n_layers: Any) -> dict[str, Any]:
    """The HF config fields of a GGUF's experts, from its `{arch}.*` metadata (`value(key, default)`) and tensor
    names (HF form); {} for a file without experts. ModelConfig judges the values."""
    n_experts = value("expert_count")
    if not n_experts or arch not in NORMALISED:
        return {}
    fields: dict[str, Any] = {
        "num_experts": n_experts,
        "num_experts_per_tok": value("expert_used_count"),
        "norm_topk_prob": bool(value("expert_weights_norm", NORMALISED[arch])),
    }
    if arch == "llama":
        fields["architectures"] = [MIXTRAL]
        fields["num_local_experts"] = fields.pop("num_experts")
        return fields  # Mixtral's experts are as wide as feed_forward_length, and every layer is sparse
    # llama.cpp's widths where the keys are missing (0 counts as missing there too), not transformers' defaults.
    dense, used = value("feed_forward_length"), fields["num_experts_per_tok"]
    derived = dense // used if isinstance(dense, int) and isinstance(used, int) and used > 0 else None
    fields["moe_intermediate_size"] = value("expert_feed_forward_length") or derived
    if isinstance(n_layers, int):
        fields["mlp_only_layers"] = [
            layer for layer in range(n_layers) if f"model.layers.{layer}.{ROUTER}" not in names
        ]
    if arch == "qwen2moe":
        fields["shared_expert_intermediate_size"] = value("expert_shared_feed_forward_length") or dense
    return fields
