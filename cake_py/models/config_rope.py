"""A model's rope (its rotary position embedding) as its config describes it: the base, the scaling kind and its
fields, read as transformers reads them. No torch here: configs are parsed by commands that never load a model; the
tables are computed in llama.py and rope.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cake_py.errors import UnsupportedArchitectureError
from cake_py.models import config_fields as fields
from cake_py.models.rope_fields import scaling_fields

SUPPORTED_ROPE_TYPES = {"default", "llama3", "linear", "yarn", "longrope"}
# Rope types refused with a reason of their own (the others are named as unsupported).
REFUSED_ROPE_TYPES = {
    "dynamic": "dynamic NTK recomputes the frequencies for each length a sequence reaches, so the keys a KV cache "
    "holds were rotated with other frequencies than the queries that read them, and transformers' answer depends on "
    "the calls before (it keeps the frequencies of the longest sequence seen)",
}
PHI3_LONGROPE_NAMES = ("su", "yarn")  # what Phi-3 configs before "longrope" called it (Phi3Config renames them)
PHI3_ORIGINAL_CONTEXT = 4096  # Phi3Config's original_max_position_embeddings, where config.json leaves it out
GEMMA_ROPE_THETA, GEMMA_LOCAL_ROPE_THETA = 1_000_000.0, 10_000.0


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | llama3 | linear | yarn | longrope (cake_py.models.rope)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-frequency divisors as llama.cpp stores them (GGUF `rope_freqs`): how Llama 3 scaling arrives from a GGUF.
    freq_factors: tuple[float, ...] | None = None
    # What cos and sin are multiplied by (YaRN, LongRoPE), resolved from the config's fields when it is parsed.
    attention_factor: float = 1.0
    beta_fast: float = 32.0  # YaRN: the ramp between interpolated and extrapolated frequencies
    beta_slow: float = 1.0
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None  # LongRoPE: per-frequency divisors within the original context
    long_factor: tuple[float, ...] | None = None  # and past it

    @property
    def long_from(self) -> int | None:
        """LongRoPE's original context: a sequence longer than it is rotated with the long factors, all of it (its
        caches computed within it are computed again: engine/plan.py). None for every other rope."""
        return self.original_max_position_embeddings if self.kind == "longrope" else None


def parse_rope(raw: dict[str, Any], family: str) -> RopeConfig:
    # transformers ≥5 writes `rope_parameters`; older configs use `rope_theta` + `rope_scaling`.
    params = {"rope_theta": raw.get("rope_theta", 10000.0), **fields.json_object(raw, "rope_parameters")}
    params = _with_scaling(params, fields.json_object(raw, "rope_scaling"))
    kind = params.get("rope_type") or params.get("type")
    if family == "phi3" and kind in PHI3_LONGROPE_NAMES:  # as transformers' Phi3Config reads older configs
        params["rope_type"] = kind = "longrope"
    if family == "phi3" and kind not in (None, "default", "longrope"):  # as Phi3Config.validate_rope refuses them
        raise UnsupportedArchitectureError(
            f"unsupported rope_scaling type {kind!r} for Phi-3 (its configs take 'longrope' or none, as "
            "transformers' Phi3Config)"
        )
    if family == "phi3" and "original_max_position_embeddings" not in raw:  # Phi3Config's default, over the rope's
        params["original_max_position_embeddings"] = PHI3_ORIGINAL_CONTEXT
    return _rope(params, raw)


def partial_rotary_factor(raw: dict[str, Any]) -> float:
    """Phi-3's share of rotated dimensions: top-level (Phi-4-mini) or among transformers 5's rope_parameters."""
    inner = fields.number(fields.json_object(raw, "rope_parameters"), "partial_rotary_factor", 1.0)
    return fields.number(raw, "partial_rotary_factor", inner)


def parse_gemma_ropes(raw: dict[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """Gemma 3's two ropes as transformers' Gemma3TextConfig sets them: full-attention layers take `rope_theta`
    with `rope_scaling`, sliding ones `rope_local_base_freq` unscaled; transformers ≥5 writes both as
    `rope_parameters` per layer kind."""
    per_kind = fields.json_object(raw, "rope_parameters")
    full = {"rope_theta": raw.get("rope_theta", GEMMA_ROPE_THETA), **fields.json_object(per_kind, "full_attention")}
    local = {"rope_theta": raw.get("rope_local_base_freq", GEMMA_LOCAL_ROPE_THETA)}
    local.update(fields.json_object(per_kind, "sliding_attention"))
    return _rope(_with_scaling(full, fields.json_object(raw, "rope_scaling")), raw), _rope(local, raw)


def _with_scaling(params: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    """`params` updated by an older config's `rope_scaling`, whose own kind wins: transformers 5 also writes
    rope_parameters' "rope_type": "default" beside it."""
    merged = {**params, **{k: v for k, v in scaling.items() if v is not None}}
    if kind := scaling.get("rope_type") or scaling.get("type"):
        merged["rope_type"] = kind
    return merged


def _rope(params: dict[str, Any], raw: dict[str, Any]) -> RopeConfig:
    theta = fields.number(params, "rope_theta", 10000.0)
    kind = str(params.get("rope_type") or params.get("type") or "default")
    if kind in REFUSED_ROPE_TYPES:
        raise UnsupportedArchitectureError(f"unsupported rope_scaling type {kind!r}: {REFUSED_ROPE_TYPES[kind]}")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"unsupported rope_scaling type {kind!r} (supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})"
        )
    if kind in ("yarn", "longrope"):
        return RopeConfig(theta=theta, kind=kind, **scaling_fields(kind, params, raw))
    # Llama 3's original context, as transformers' standardize_rope_params fills it: a top-level field wins, and
    # with none the model's own context (not 8192).
    key, original = "original_max_position_embeddings", 8192  # unused by the other kinds
    if kind == "llama3":
        context = fields.integer(raw, "max_position_embeddings", 2048)
        original = fields.integer(raw, key, fields.integer(params, key, context, f"rope_scaling {key}"))
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=fields.number(params, "factor", 1.0, "rope_scaling factor"),
        low_freq_factor=fields.number(params, "low_freq_factor", 1.0, "rope_scaling low_freq_factor"),
        high_freq_factor=fields.number(params, "high_freq_factor", 4.0, "rope_scaling high_freq_factor"),
        original_max_position_embeddings=original,
        freq_factors=_freq_factors(raw.get("rope_freq_factors")),
    )


def _freq_factors(value: Any) -> tuple[float, ...] | None:
    if not value:
        return None
    if not isinstance(value, list) or not all(fields.is_number(f) for f in value):
        raise ValueError(f"rope_freq_factors must be a list of numbers, got {fields.shown(value)}")
    return tuple(float(f) for f in value)
