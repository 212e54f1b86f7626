"""ModelConfig: the architecture hyper-parameters of a decoder-only transformer, parsed from HF config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cake_py.errors import ModelError, UnsupportedArchitectureError

# architectures[0] or model_type → family handled by cake_py.models.llama (all are Llama-shaped decoders).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
SUPPORTED_ROPE_TYPES = {"default", "llama3", "linear"}
MAX_LAYERS = 4096  # the largest published models have under 200; a config past this is malformed
# Widths (hidden, intermediate, vocabulary, heads, head size): the largest published are ~260k (a vocabulary); past
# this a config is malformed, and torch would refuse the layer's sizes, or allocate gigabytes for rope tables.
MAX_WIDTH = 1 << 22
MAX_CONTEXT = 1 << 31


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | llama3 | linear
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-frequency divisors as llama.cpp stores them (GGUF `rope_freqs`): how Llama 3 scaling arrives from a GGUF.
    freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    family: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    sliding_window: int | None = None  # the window of the layers that have one (see `window_of`)
    # Per layer, whether it attends through the window; empty: every layer does when sliding_window is set.
    windowed_layers: tuple[bool, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"

    @classmethod
    def from_hf(cls, raw: dict[str, Any], origin: str = "config.json") -> ModelConfig:
        """Parse a HF config.json dict; an architecture we do not implement is an UnsupportedArchitectureError,
        a missing or malformed field a ModelError naming it (and `origin`, where the values came from)."""
        if not isinstance(raw, dict):
            raise ModelError(f"{origin} must hold a JSON object, not a {type(raw).__name__}")
        try:
            config = cls._parse(raw)
        except KeyError as error:
            raise ModelError(f"{origin} has no {error.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as error:  # Overflow: int(Infinity)
            raise ModelError(f"{origin} has a malformed field: {error}") from None
        sizes = {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_kv_heads,
            "head_dim": config.head_dim,
        }
        for name, value in sizes.items():
            if not 0 < value <= MAX_WIDTH:
                raise ModelError(f"{origin}: {name} must be from 1 to {MAX_WIDTH}, got {value}")
        if not 0 < config.max_position_embeddings <= MAX_CONTEXT:
            context = config.max_position_embeddings
            raise ModelError(f"{origin}: max_position_embeddings must be from 1 to {MAX_CONTEXT}, got {context}")
        if config.n_heads % config.n_kv_heads:
            raise ModelError(
                f"{origin}: num_attention_heads ({config.n_heads}) is not a multiple of num_key_value_heads "
                f"({config.n_kv_heads})"
            )
        rope = config.rope
        if not (math.isfinite(config.rms_norm_eps) and config.rms_norm_eps >= 0):
            raise ModelError(f"{origin}: rms_norm_eps must be a finite number ≥ 0, got {config.rms_norm_eps}")
        for name, number in (("rope_theta", rope.theta), ("rope_scaling factor", rope.factor)):
            if not (math.isfinite(number) and number > 0):
                raise ModelError(f"{origin}: {name} must be a finite number > 0, got {number}")
        if rope.freq_factors is not None and len(rope.freq_factors) != config.head_dim // 2:
            raise ModelError(
                f"{origin}: {len(rope.freq_factors)} rope frequency factors for a head_dim of {config.head_dim} "
                f"(it takes {config.head_dim // 2})"
            )
        return config

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (absolute index), or None when it attends to every position."""
        if self.sliding_window is None or (self.windowed_layers and not self.windowed_layers[layer]):
            return None
        return self.sliding_window

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> ModelConfig:
        architectures = raw.get("architectures") or []
        if not isinstance(architectures, list):
            raise ValueError(f"architectures must be a list, got {architectures!r}")
        architecture = architectures[0] if architectures else None
        model_type = raw.get("model_type")
        if architecture is not None and architecture in SUPPORTED_ARCHITECTURES:
            family = SUPPORTED_ARCHITECTURES[architecture]
        elif architecture is None and model_type in SUPPORTED_MODEL_TYPES:
            family = str(model_type)
            architecture = next(a for a, f in SUPPORTED_ARCHITECTURES.items() if f == family)
        else:
            name = architecture or model_type or "<none>"
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise UnsupportedArchitectureError(f"unsupported architecture {name!r} (supported: {supported})")

        _check_computable(raw)
        n_heads = int(raw["num_attention_heads"])
        if n_heads <= 0:
            raise ValueError(f"num_attention_heads must be positive, got {n_heads}")
        hidden = int(raw["hidden_size"])
        # transformers' Qwen3Config defaults head_dim to 128, not hidden_size / heads as the other families do.
        default_head_dim = QWEN3_HEAD_DIM if family == "qwen3" and "head_dim" not in raw else hidden // n_heads
        head_dim = raw.get("head_dim") or default_head_dim
        eos = raw.get("eos_token_id")
        eos_ids = (
            tuple(_token_id(i) for i in eos)
            if isinstance(eos, list)
            else ((_token_id(eos),) if eos is not None else ())
        )
        attention_bias = bool(raw.get("attention_bias", False))
        n_layers = int(raw["num_hidden_layers"])
        if not 0 < n_layers <= MAX_LAYERS:  # every layer is built before its weights are looked for
            raise ValueError(f"num_hidden_layers must be from 1 to {MAX_LAYERS}, got {raw['num_hidden_layers']!r}")
        sliding, windowed = _sliding_window(raw, family, n_layers)
        return cls(
            family=family,
            architecture=str(architecture),
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=_flag(raw, "tie_word_embeddings"),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            windowed_layers=windowed,
            bos_token_id=_token_id(raw["bos_token_id"]) if raw.get("bos_token_id") is not None else None,
            eos_token_ids=eos_ids,
        )


# transformers' defaults for fields a config.json may leave out, where they differ by family.
QWEN3_HEAD_DIM = 128
DEFAULT_SLIDING_WINDOW = 4096

# What the layer code computes: a checkpoint that needs anything else would load and answer garbage, so it is refused.
SUPPORTED_ACTIVATIONS = {"silu", "swish"}


def _check_computable(raw: dict[str, Any]) -> None:
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise UnsupportedArchitectureError(
            f"unsupported quantized checkpoint (quantization_config quant_method {method!r}); use the unquantized "
            "model or a GGUF file"
        )
    activation = raw.get("hidden_act", "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"unsupported hidden_act {activation!r} (supported: {', '.join(sorted(SUPPORTED_ACTIVATIONS))})"
        )


def _flag(raw: dict[str, Any], name: str) -> bool:
    """A true/false field: a string like "false" is refused, not read as true."""
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _token_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"token ids must be integers, got {value!r}")
    return value


def _sliding_window(raw: dict[str, Any], family: str, n_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """The window and which layers use it, as transformers decides: config.json's `layer_types` when given; else
    Mistral windows every layer, and Qwen2/Qwen3 (with use_sliding_window) the layers from max_window_layers on."""
    # Absent, transformers' Mistral and Qwen configs default it to 4096 (Qwen's applies with use_sliding_window).
    window = raw.get("sliding_window", DEFAULT_SLIDING_WINDOW if family != "llama" else None)
    if not window:
        return None, ()
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == n_layers:
        windowed = tuple(kind == "sliding_attention" for kind in layer_types)
    elif family == "mistral":
        windowed = (True,) * n_layers
    elif family in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        first = int(raw.get("max_window_layers", 28))
        windowed = tuple(index >= first for index in range(n_layers))
    else:
        return None, ()
    return (int(window), windowed) if any(windowed) else (None, ())


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    # transformers ≥5 writes `rope_parameters`; older configs use `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**params, **{k: v for k, v in scaling.items() if v is not None}}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    # rope_scaling's own kind wins: transformers 5 also writes rope_parameters' "rope_type": "default" beside it.
    kind = str(
        scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or params.get("type") or "default"
    )
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"unsupported rope_scaling type {kind!r} (supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})"
        )
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        freq_factors=tuple(float(f) for f in raw["rope_freq_factors"]) if raw.get("rope_freq_factors") else None,
    )
