"""The fields of a YaRN or LongRoPE rope scaling, read from a config's rope parameters as transformers reads them
(its `standardize_rope_params` and `_compute_{yarn,longrope}_parameters`), defaults included. No torch here: configs
are parsed by commands that never load a model."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from cake_py.errors import ModelError
from cake_py.models import config_fields as fields

if TYPE_CHECKING:
    from cake_py.models.config import ModelConfig


def scaling_fields(kind: str, params: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """`RopeConfig` keyword arguments for a `yarn` or `longrope` rope, beyond its theta and kind."""
    context = fields.integer(raw, "max_position_embeddings", 2048)
    # A top-level original_max_position_embeddings (Phi-3 writes it there) wins over the rope parameters' own; with
    # neither, the model was trained at its full context.
    name = "rope_scaling original_max_position_embeddings"
    inner = fields.integer(params, "original_max_position_embeddings", context, name)
    original = fields.integer(raw, "original_max_position_embeddings", inner)
    if original <= 0 or (kind == "longrope" and original == 1):  # LongRoPE's attention factor divides by ln of it
        least = 1 if kind == "yarn" else 2
        raise ValueError(f"rope_scaling original_max_position_embeddings must be at least {least}, got {original}")
    # No factor: the ratio of the contexts, as transformers takes it.
    factor = fields.number(params, "factor", context / original, "rope_scaling factor")
    attention = None
    if params.get("attention_factor") is not None:
        attention = fields.number(params, "attention_factor", 1.0, "rope_scaling attention_factor")
    out: dict[str, Any] = {"factor": factor, "original_max_position_embeddings": original}
    if kind == "yarn":
        mscale = fields.number(params, "mscale", 0.0, "rope_scaling mscale")
        mscale_all_dim = fields.number(params, "mscale_all_dim", 0.0, "rope_scaling mscale_all_dim")
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ValueError(f"rope_scaling truncate must be true or false, got {fields.shown(truncate)}")
        out.update(
            attention_factor=yarn_attention_factor(factor, mscale, mscale_all_dim) if attention is None else attention,
            # 0 or null takes the paper's default, as in transformers
            beta_fast=fields.number(params, "beta_fast", 0.0, "rope_scaling beta_fast") or 32.0,
            beta_slow=fields.number(params, "beta_slow", 0.0, "rope_scaling beta_slow") or 1.0,
            truncate=truncate,
        )
    else:
        out.update(
            attention_factor=longrope_attention_factor(factor, original) if attention is None else attention,
            short_factor=_factors(params, "short_factor"),
            long_factor=_factors(params, "long_factor"),
        )
    return out


def scaling_numbers(config: ModelConfig, origin: str) -> list[tuple[str, float]]:
    """The numbers of `config`'s rope scaling and partial rotation that must be finite and > 0, by name; a
    ModelError (naming `origin`) for a rotated share or a count of LongRoPE factors that does not fit the heads."""
    rope, share = config.rope, config.partial_rotary_factor
    numbers = [("rope_scaling attention_factor", rope.attention_factor), ("partial_rotary_factor", share)]
    if rope.kind == "yarn":  # the ramp's ends are logarithms of the betas, divided by the theta's
        numbers += [("rope_scaling beta_fast", rope.beta_fast), ("rope_scaling beta_slow", rope.beta_slow)]
        if rope.theta == 1:
            raise ModelError(f"{origin}: rope_theta must not be 1 with yarn rope scaling (its logarithm divides)")
    rotary = int(config.head_dim * share) if math.isfinite(share) else 0
    if not (0 < rotary <= config.head_dim and rotary % 2 == 0):
        raise ModelError(
            f"{origin}: partial_rotary_factor {share} rotates {rotary} of a head's {config.head_dim} dimensions (it "
            "must rotate an even number of them, at least 2)"
        )
    for name, factors in (("short_factor", rope.short_factor), ("long_factor", rope.long_factor)):
        if factors is not None and len(factors) != rotary // 2:
            raise ModelError(
                f"{origin}: rope_scaling {name} has {len(factors)} factors for {rotary} rotated dimensions (it takes "
                f"{rotary // 2})"
            )
        numbers += [(f"rope_scaling {name}", factor) for factor in factors or ()]
    return numbers


def _factors(params: dict[str, Any], key: str) -> tuple[float, ...]:
    value = params.get(key)
    if not isinstance(value, list) or not value or not all(fields.is_number(f) for f in value):
        raise ValueError(f"rope_scaling {key} must be a list of numbers, got {fields.shown(value)}")
    return tuple(float(f) for f in value)


def yarn_attention_factor(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    """What YaRN multiplies cos and sin by when the config gives no attention_factor: 0.1 ln(factor) + 1, or the
    ratio of two such terms weighted by mscale and mscale_all_dim when both are given (DeepSeek's configs)."""

    def get_mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return get_mscale(factor)


def longrope_attention_factor(factor: float, original_context: int) -> float:
    """What LongRoPE multiplies cos and sin by when the config gives no attention_factor."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_context))
