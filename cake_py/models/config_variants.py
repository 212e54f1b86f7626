"""The config fields of the Llama variants (models/variants.py) that no other family has, read as transformers' own
configs read them: SmolLM3's NoPE layers and Granite's four scalings. ModelConfig.from_hf judges their ranges."""

from __future__ import annotations

from typing import Any

from cake_py.models import config_fields as fields

# GraniteConfig's scalings, each 1.0 when absent (attention_multiplier too: not head_dim ** -0.5).
GRANITE_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
SMOLLM3_NO_ROPE_LAYER_INTERVAL = 4  # SmolLM3Config's default: every 4th layer has no rope
# Families whose transformers model has no sliding window, whatever config.json says of one.
WINDOWLESS_FAMILIES = ("granite", "olmo2")


def granite_scalings(raw: dict[str, Any]) -> dict[str, float]:
    """Granite's four multipliers by field name (ModelConfig's names are the same)."""
    return {name: fields.number(raw, name, 1.0) for name in GRANITE_MULTIPLIERS}


def smollm3_rope_layers(raw: dict[str, Any], n_layers: int) -> tuple[bool, ...]:
    """SmolLM3's per-layer rope, as SmolLM3Config decides: `no_rope_layers` (1: rope, 0: none, one per layer at
    least), else no rope on every `no_rope_layer_interval`-th layer."""
    flags = raw.get("no_rope_layers")
    if flags is None:
        interval = fields.integer(raw, "no_rope_layer_interval", SMOLLM3_NO_ROPE_LAYER_INTERVAL)
        if interval <= 0:
            raise ValueError(f"no_rope_layer_interval must be positive, got {interval}")
        return tuple(bool((index + 1) % interval) for index in range(n_layers))
    if not isinstance(flags, list) or len(flags) < n_layers or any(flag not in (0, 1) for flag in flags):
        raise ValueError(f"no_rope_layers must be a list of 0 or 1 per layer ({n_layers}), got {fields.shown(flags)}")
    return tuple(bool(flag) for flag in flags[:n_layers])
