"""MoeConfig: the mixture-of-experts hyper-parameters of Mixtral, Qwen2-MoE and Qwen3-MoE, parsed from config.json.

Kept apart from config.py (which calls `parse_moe`) so the dense families' parsing does not grow with it. The
fields are transformers' (MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig), with their defaults where a config.json
leaves one out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cake_py.models import config_fields as fields

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
MAX_EXPERTS = 4096  # the largest published models route over 256 or 384; past this a config is malformed


@dataclass(frozen=True)
class MoeConfig:
    n_experts: int
    top_k: int  # experts each token is routed to
    expert_intermediate_size: int
    # Whether the top-k routing weights are divided by their sum (Mixtral always; Qwen with norm_topk_prob).
    norm_topk_prob: bool
    # Mixtral multiplies an expert's output by its float32 routing weight; Qwen casts the weight to the hidden
    # states' dtype first (the same in float32, a rounding apart in 16 bits).
    float32_routing_weights: bool
    # Per layer, whether its MLP is the sparse one (Qwen's mlp_only_layers and decoder_sparse_step keep some dense).
    sparse_layers: tuple[bool, ...]
    # Qwen2-MoE: one dense expert every token goes through, its output scaled by a sigmoid gate.
    shared_expert_intermediate_size: int | None = None

    def is_sparse(self, layer: int) -> bool:
        return self.sparse_layers[layer]


def parse_moe(raw: dict[str, Any], family: str, n_layers: int) -> MoeConfig | None:
    """The MoE fields of a MoE family's config.json (None for the other families); a malformed one is a ValueError
    naming it."""
    if family not in MOE_FAMILIES:
        return None
    mixtral = family == "mixtral"
    # Hub configs name it num_local_experts (Mixtral) or num_experts (Qwen); transformers 5 writes Qwen3-MoE's as
    # num_local_experts too.
    key = "num_local_experts" if "num_local_experts" in raw else "num_experts"
    n_experts = fields.integer(raw, key, 8 if mixtral else 60 if family == "qwen2_moe" else 128)
    if not 0 < n_experts <= MAX_EXPERTS:
        raise ValueError(f"{key} must be from 1 to {MAX_EXPERTS}, got {n_experts}")
    top_k = fields.integer(raw, "num_experts_per_tok", 2 if mixtral else 4 if family == "qwen2_moe" else 8)
    if not 0 < top_k <= n_experts:
        raise ValueError(f"num_experts_per_tok must be from 1 to {key} ({n_experts}), got {top_k}")
    if mixtral:
        # Every Mixtral layer is sparse, with experts as wide as intermediate_size.
        size = fields.integer(raw, "intermediate_size")
        return MoeConfig(n_experts, top_k, size, True, True, (True,) * n_layers)
    size = fields.integer(raw, "moe_intermediate_size", 1408 if family == "qwen2_moe" else 768)
    if size <= 0:
        raise ValueError(f"moe_intermediate_size must be positive, got {size}")
    step = fields.integer(raw, "decoder_sparse_step", 1)
    if step <= 0:
        raise ValueError(f"decoder_sparse_step must be positive, got {step}")
    dense = raw.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise ValueError(f"mlp_only_layers must be a list of layer indices, got {fields.shown(dense)}")
    # As transformers' decoder layers decide: sparse unless listed, on every `step`-th layer.
    sparse = tuple(layer not in dense and (layer + 1) % step == 0 for layer in range(n_layers))
    shared = None
    if family == "qwen2_moe":
        shared = fields.integer(raw, "shared_expert_intermediate_size", 5632)
        if shared <= 0:
            raise ValueError(f"shared_expert_intermediate_size must be positive, got {shared}")
    norm = raw.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ValueError(f"norm_topk_prob must be true or false, got {fields.shown(norm)}")
    return MoeConfig(n_experts, top_k, size, norm, False, sparse, shared)
