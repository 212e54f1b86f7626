"""Phi-3 as llama.cpp stores it in a GGUF (`general.architecture = phi3`), translated back to its HF form.

What differs from the Llama-shaped architectures (convert_hf_to_gguf.py's `Phi3MiniModel`):
- q/k/v come fused as `attn_qkv` (HF `qkv_proj`), gate/up as `ffn_up` (HF `gate_up_proj`), rows in HF's order (its
  rope is llama.cpp's NEOX, HF's rotate-half layout: nothing is permuted);
- `rope.dimension_count` is how many of each head's dimensions rope rotates (Phi-4-mini: 96 of 128);
- LongRoPE comes as two tensors of per-frequency factors, `rope_factors_long` and `rope_factors_short`, with the
  original context in `rope.scaling.original_context_length` and the factor cos and sin are multiplied by in
  `rope.scaling.attn_factor` (no `rope.scaling.type`). llama.cpp picks one set of factors for a whole session by
  its context size; here they are picked as from an HF config (cake_py.models.rope).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

ARCHITECTURE = "phi3"
BLOCK_NAMES = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
LONG_FACTORS, SHORT_FACTORS = "rope_factors_long.weight", "rope_factors_short.weight"


def phi3_fields(
    value: Callable[..., Any], config: dict[str, Any], long: list[float] | None, short: list[float] | None
) -> dict[str, Any]:
    """Phi-3's HF config fields from its `phi3.*` metadata (`value(key, default)`) and its rope factor tensors,
    given the fields read as for any architecture (`config`); ModelConfig judges the values."""
    fields: dict[str, Any] = {}
    rotary, head_dim = value("rope.dimension_count"), config["head_dim"]
    if isinstance(rotary, int) and isinstance(head_dim, int) and head_dim > 0 and rotary != head_dim:
        share = rotary / head_dim
        if int(head_dim * share) != rotary:  # transformers rounds the product down: keep it from losing one
            share = math.nextafter(share, math.inf)
        fields["partial_rotary_factor"] = share
    if long is not None or short is not None:
        fields["original_max_position_embeddings"] = value("rope.scaling.original_context_length")
        fields["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": long,
            "short_factor": short,
            "attention_factor": value("rope.scaling.attn_factor"),
        }
    return fields
