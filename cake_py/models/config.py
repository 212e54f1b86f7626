"""ModelConfig: the architecture hyper-parameters of a decoder-only transformer, parsed from HF config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cake_py.errors import ModelError, UnsupportedArchitectureError
from cake_py.models import config_fields as fields
from cake_py.models import config_variants as variants
from cake_py.models import multimodal
from cake_py.models.config_moe import MoeConfig, parse_moe
from cake_py.models.config_rope import RopeConfig, parse_gemma_ropes, parse_rope, partial_rotary_factor
from cake_py.models.rope_fields import scaling_numbers

# architectures[0] → family: Llama-shaped decoders (cake_py.models.llama) and Gemma 3 (cake_py.models.gemma).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma2ForCausalLM": "gemma2",
    # Multimodal checkpoints, served as their language model (cake_py.models.multimodal).
    "Gemma3ForConditionalGeneration": "gemma3",
    "Mistral3ForConditionalGeneration": "mistral",
    # Llama variants (cake_py.models.variants).
    "SmolLM3ForCausalLM": "smollm3",
    "GraniteForCausalLM": "granite",
    "Olmo2ForCausalLM": "olmo2",
    "Phi3ForCausalLM": "phi3",
    # Mixtures of experts (cake_py.models.moe).
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# model_type → family, for a config.json without `architectures`.
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma2": "gemma2",
    "smollm3": "smollm3",
    "granite": "granite",
    "olmo2": "olmo2",
    "phi3": "phi3",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
}
MAX_LAYERS = 4096  # the largest published models have under 200; a config past this is malformed
# Widths (hidden, intermediate, vocabulary, heads, head size): the largest published are ~260k (a vocabulary); past
# this a config is malformed, and torch would refuse the layer's sizes, or allocate gigabytes for rope tables.
MAX_WIDTH = 1 << 22
MAX_CONTEXT = 1 << 31


@dataclass(frozen=True)
class ModelConfig:
    family: str  # a value of SUPPORTED_ARCHITECTURES: llama, mistral, qwen2, gemma3, mixtral, phi3…
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
    qk_norm: bool = False  # RMSNorm on q and k before rope: per head (Qwen3, Gemma 3), all heads at once (OLMo 2)
    activation: str = "silu"  # of the feed-forward's gate: silu | gelu_tanh (Gemma's gelu_pytorch_tanh)
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma), else by head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    # The rope of the windowed layers where it differs from `rope` (Gemma 3: rope_local_base_freq, unscaled).
    local_rope: RopeConfig | None = None
    # The share of each head's dimensions rope rotates, the first ones (Phi-4-mini: 0.75); the rest pass through.
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None  # the window of the layers that have one (see `window_of`)
    # Per layer, whether it attends through the window; empty: every layer does when sliding_window is set.
    windowed_layers: tuple[bool, ...] = ()
    # cap · tanh(x / cap) on the attention scores before the mask, and on the head's logits (Gemma 2; Gemma 3 may).
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Per layer, whether it rotates q and k; empty: every layer does (SmolLM3's NoPE layers do not).
    rope_layers: tuple[bool, ...] = ()
    # Granite's scalings: the embedding multiplied, each branch multiplied before it is added back, the attention
    # scores scaled by attention_multiplier (in place of head_dim ** -0.5), the logits divided.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"
    moe: MoeConfig | None = None  # the experts of a mixture-of-experts family (models/moe.py)

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
        numbers = [("rope_theta", rope.theta), ("rope_scaling factor", rope.factor)]
        if config.local_rope is not None:
            numbers.append(("rope_local_base_freq", config.local_rope.theta))
        if config.query_pre_attn_scalar is not None:
            numbers.append(("query_pre_attn_scalar", config.query_pre_attn_scalar))
        for cap_name in ("attn_logit_softcapping", "final_logit_softcapping"):  # a 0 divides, a negative flips
            if (cap := getattr(config, cap_name)) is not None:
                numbers.append((cap_name, cap))
        if config.family == "granite":
            numbers += [(name, getattr(config, name)) for name in variants.GRANITE_MULTIPLIERS]
        if rope.kind == "llama3":  # the wavelengths divide by them: a 0 was a ZeroDivisionError's traceback
            numbers.append(("rope_scaling low_freq_factor", rope.low_freq_factor))
            numbers.append(("rope_scaling original_max_position_embeddings", rope.original_max_position_embeddings))
            if not rope.high_freq_factor > rope.low_freq_factor:  # the band between them is smoothed over
                raise ModelError(
                    f"{origin}: rope_scaling high_freq_factor ({rope.high_freq_factor}) must be greater than its "
                    f"low_freq_factor ({rope.low_freq_factor})"
                )
        numbers += scaling_numbers(config, origin)  # YaRN's, LongRoPE's, the rotated share's
        for name, number in numbers:
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

    def uses_rope(self, layer: int) -> bool:
        """Whether layer `layer` (absolute index) rotates its queries and keys."""
        return not self.rope_layers or self.rope_layers[layer]

    def rope_of(self, layer: int) -> RopeConfig:
        """The rope of layer `layer` (absolute index): `local_rope` for a windowed layer where there is one."""
        if self.local_rope is not None and self.window_of(layer) is not None:
            return self.local_rope
        return self.rope

    @property
    def rotary_dim(self) -> int:
        """How many of each head's first dimensions rope rotates, as transformers rounds it."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """What attention scores are multiplied by before the softmax."""
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> ModelConfig:
        raw = multimodal.text_config(raw)
        architectures = raw.get("architectures") or []
        if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
            raise ValueError(f"architectures must be a list of class names, got {fields.shown(architectures)}")
        architecture = architectures[0] if architectures else None
        model_type = raw.get("model_type")
        if architecture is not None and architecture in SUPPORTED_ARCHITECTURES:
            family = SUPPORTED_ARCHITECTURES[architecture]
        elif architecture is None and isinstance(model_type, str) and model_type in SUPPORTED_MODEL_TYPES:
            family = SUPPORTED_MODEL_TYPES[model_type]
            architecture = next(a for a, f in SUPPORTED_ARCHITECTURES.items() if f == family)
        else:
            name = architecture or model_type or "<none>"
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise UnsupportedArchitectureError(f"unsupported architecture {name!r} (supported: {supported})")

        _check_computable(raw, family)
        n_heads = fields.integer(raw, "num_attention_heads")
        if n_heads <= 0:
            raise ValueError(f"num_attention_heads must be positive, got {n_heads}")
        hidden = fields.integer(raw, "hidden_size")
        # transformers' Qwen3Config and Gemma3TextConfig default head_dim to a width of their own, not hidden_size /
        # heads as the other families do (a head_dim of null is hidden_size / heads in all).
        default_head_dim = DEFAULT_HEAD_DIMS.get(family) if "head_dim" not in raw else None
        head_dim = fields.integer(raw, "head_dim", None) or default_head_dim or hidden // n_heads
        eos = raw.get("eos_token_id")
        eos_ids = (
            tuple(_token_id(i) for i in eos)
            if isinstance(eos, list)
            else ((_token_id(eos),) if eos is not None else ())
        )
        attention_bias = bool(raw.get("attention_bias", False))
        n_layers = fields.integer(raw, "num_hidden_layers")
        if not 0 < n_layers <= MAX_LAYERS:  # every layer is built before its weights are looked for
            raise ValueError(f"num_hidden_layers must be from 1 to {MAX_LAYERS}, got {raw['num_hidden_layers']!r}")
        sliding, windowed = _sliding_window(raw, family, n_layers)
        gemma = family in GEMMA_FAMILIES
        rope, local_rope = parse_gemma_ropes(raw) if family == "gemma3" else (parse_rope(raw, family), None)
        scalar = fields.number(raw, "query_pre_attn_scalar", GEMMA_QUERY_PRE_ATTN_SCALAR) if gemma else None
        granite = variants.granite_scalings(raw) if family == "granite" else {}
        return cls(
            family=family,
            architecture=str(architecture),
            vocab_size=fields.integer(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=fields.integer(raw, "intermediate_size"),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=fields.integer(raw, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            rms_norm_eps=fields.number(raw, "rms_norm_eps", 1e-6),
            rope=rope,
            local_rope=local_rope,
            max_position_embeddings=fields.integer(raw, "max_position_embeddings", 2048),
            tie_word_embeddings=_flag(raw, "tie_word_embeddings", default=gemma),  # Gemma's default: tied
            # Qwen2-MoE's q/k/v bias is its own field, on unless a config turns it off.
            qkv_bias=family == "qwen2" or attention_bias or (family == "qwen2_moe" and _flag(raw, "qkv_bias", True)),
            o_bias=family not in ("qwen2", "qwen2_moe") and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "gemma3", "olmo2", "qwen3_moe"),
            activation=SUPPORTED_ACTIVATIONS[_activation(raw, family)],
            query_pre_attn_scalar=scalar,
            partial_rotary_factor=partial_rotary_factor(raw) if family == "phi3" else 1.0,
            sliding_window=sliding,
            windowed_layers=windowed,
            attn_logit_softcapping=_softcap(raw, "attn_logit_softcapping", family),
            final_logit_softcapping=_softcap(raw, "final_logit_softcapping", family),
            rope_layers=variants.smollm3_rope_layers(raw, n_layers) if family == "smollm3" else (),
            **granite,
            bos_token_id=_token_id(raw["bos_token_id"]) if raw.get("bos_token_id") is not None else None,
            eos_token_ids=eos_ids,
            moe=parse_moe(raw, family, n_layers),
        )


# transformers' defaults for fields a config.json may leave out, where they differ by family.
DEFAULT_HEAD_DIMS = {"qwen3": 128, "gemma3": 256, "gemma2": 256}
DEFAULT_SLIDING_WINDOW = 4096
GEMMA_QUERY_PRE_ATTN_SCALAR = 256
GEMMA_SLIDING_WINDOW_PATTERN = 6  # every 6th layer attends to everything, the others through the window
GEMMA2_SLIDING_WINDOW_PATTERN = 2  # Gemma 2: every other layer, from layer 0, through the window
GEMMA_FAMILIES = ("gemma3", "gemma2")  # (1 + weight) norms, four per block, a scaled embedding (models/gemma.py)
# Gemma2Config's soft-caps where config.json leaves them out (null: none); Gemma3TextConfig's are None.
SOFTCAP_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}

# What the layer code computes: a checkpoint that needs anything else would load and answer garbage, so it is refused.
# HF's activation name → ours.
SUPPORTED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# Gemma fields that change what a layer computes, which the layer code does not implement.
GEMMA_UNSUPPORTED = ("use_bidirectional_attention",)


def _check_computable(raw: dict[str, Any], family: str) -> None:
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise UnsupportedArchitectureError(
            f"unsupported quantized checkpoint (quantization_config quant_method {method!r}); use the unquantized "
            "model or a GGUF file"
        )
    name, activation = _activation_field(raw, family), _activation(raw, family)
    if activation not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"unsupported {name} {activation!r} (supported: {', '.join(sorted(SUPPORTED_ACTIVATIONS))})"
        )
    if family in GEMMA_FAMILIES:
        for field_name in GEMMA_UNSUPPORTED:
            if raw.get(field_name) not in (None, False):
                raise UnsupportedArchitectureError(
                    f"unsupported {field_name} {raw[field_name]!r} (Gemma text models are computed without it)"
                )


def _activation_field(raw: dict[str, Any], family: str) -> str:
    """Gemma configs name the activation `hidden_activation`; the others `hidden_act`."""
    return "hidden_activation" if family in GEMMA_FAMILIES and "hidden_activation" in raw else "hidden_act"


def _activation(raw: dict[str, Any], family: str) -> str:
    default = "gelu_pytorch_tanh" if family in GEMMA_FAMILIES else "silu"
    name = _activation_field(raw, family)
    value = raw.get(name, default)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be the name of an activation, got {fields.shown(value)}")
    return value


def _flag(raw: dict[str, Any], name: str, default: bool = False) -> bool:
    """A true/false field: a string like "false" is refused, not read as true."""
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _softcap(raw: dict[str, Any], name: str, family: str) -> float | None:
    """A soft-cap of a Gemma config (None: no capping): absent, transformers' default for the family; null, none.
    Gemma 3 normalises q and k instead of capping their scores: transformers' Gemma 3 caps its logits but never its
    attention scores (its attention passes no cap on, eager included), whatever the config says, and so does this."""
    if family not in GEMMA_FAMILIES:
        return None
    if name not in raw:
        return SOFTCAP_DEFAULTS[name] if family == "gemma2" else None
    cap = None if raw[name] is None else fields.number(raw, name, 0.0)
    return None if family == "gemma3" and name == "attn_logit_softcapping" else cap


def _token_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"token ids must be integers, got {value!r}")
    return value


def _sliding_window(raw: dict[str, Any], family: str, n_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """The window and which layers use it, as transformers decides: config.json's `layer_types` when given; else
    Mistral windows every layer, Qwen2/Qwen3 (with use_sliding_window) the layers from max_window_layers on,
    Qwen2-MoE every other layer below it, and Gemma 3 all but every `sliding_window_pattern`-th layer."""
    if family in variants.WINDOWLESS_FAMILIES:
        return None, ()
    # Absent, transformers' Mistral, Qwen and Gemma configs default it to 4096 (Qwen's applies with
    # use_sliding_window; SmolLM3's, Mixtral's and Phi-3's have none, like Llama's).
    default = DEFAULT_SLIDING_WINDOW if family not in ("llama", "smollm3", "mixtral", "phi3") else None
    window = raw.get("sliding_window", default)  # null: none
    if window is not None:
        window = fields.whole(window, "sliding_window")
        if window < 0:  # a negative window was taken as one, and masked every key out
            raise ValueError(f"sliding_window must be a number of positions, got {window}")
    if not window:
        if family in GEMMA_FAMILIES:  # its windowed layers would attend to everything (Gemma 3's: the wrong rope)
            name = "Gemma 3" if family == "gemma3" else "Gemma 2"
            raise ValueError(f"sliding_window must be a number of positions for {name}, got {window!r}")
        return None, ()
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == n_layers:
        windowed = tuple(kind == "sliding_attention" for kind in layer_types)
    elif family in ("mistral", "mixtral", "phi3") or (family == "qwen3_moe" and raw.get("use_sliding_window")):
        windowed = (True,) * n_layers  # Qwen3-MoE's attention takes the window in every layer, when it is used
    elif family == "gemma3":
        pattern = fields.integer(raw, "sliding_window_pattern", GEMMA_SLIDING_WINDOW_PATTERN)
        if pattern <= 0:
            raise ValueError(f"sliding_window_pattern must be positive, got {pattern}")
        windowed = tuple(bool((index + 1) % pattern) for index in range(n_layers))
    elif family == "gemma2":  # Gemma2Config has no pattern field: its layers alternate
        windowed = tuple(bool((index + 1) % GEMMA2_SLIDING_WINDOW_PATTERN) for index in range(n_layers))
    elif family in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        first = fields.integer(raw, "max_window_layers", 28)
        windowed = tuple(index >= first for index in range(n_layers))
    elif family == "qwen2_moe" and raw.get("use_sliding_window"):  # Qwen2MoeConfig: every other layer, below them
        below = fields.integer(raw, "max_window_layers", 28)
        windowed = tuple(bool((index + 1) % 2) and index < below for index in range(n_layers))
    elif family == "smollm3" and raw.get("use_sliding_window"):  # SmolLM3Config: its NoPE layers are the windowed
        windowed = tuple(not rope for rope in variants.smollm3_rope_layers(raw, n_layers))
    else:
        return None, ()
    return (window, windowed) if any(windowed) else (None, ())
