"""Multimodal checkpoints served as the text models they hold, as llama.cpp serves them (its GGUF holds the language
model; the vision part is a separate mmproj file that is not read).

A `Gemma3ForConditionalGeneration` or `Mistral3ForConditionalGeneration` config.json nests its language model's
config under `text_config`, which leaves out whatever transformers' config class defaults, and keeps a few of its
fields (the tied head, the token ids) at the top level. Its weights hold the language model under a prefix
(`language_model.model.layers.N…` as transformers writes them, `model.language_model.layers.N…` in its 4.52-4.57
layout) beside a vision tower and a projector, which are never loaded, streamed to workers, or counted in placement.
"""

from __future__ import annotations

from typing import Any

from cake_py.errors import UnsupportedArchitectureError
from cake_py.models import config_fields as fields

# Gemma3TextConfig's defaults (transformers' configuration_gemma3.py), applied to what `text_config` leaves out: the
# published gemma-3-4b/12b/27b configs give only the sizes that differ from them (no head count, no vocabulary).
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}
# MistralConfig's defaults, for Mistral3ForConditionalGeneration (Mistral Small 3.1/3.2): its published configs give
# nearly every field, but the context (the class's 131072, not the 2048 a text config.json is read with) and the
# window (4096 unless null) are left out by some.
MISTRAL_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "sliding_window": 4096,
}
# Multimodal architecture → the defaults of its language model's config class.
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "Gemma3ForConditionalGeneration": GEMMA3_TEXT_DEFAULTS,
    "Mistral3ForConditionalGeneration": MISTRAL_TEXT_DEFAULTS,
}
# The `text_config` model_type each serves (absent: that one). Another is another model (Ministral 3's `ministral3`
# under Mistral3ForConditionalGeneration computes its attention otherwise): refused, naming it.
TEXT_MODEL_TYPES = {"Gemma3ForConditionalGeneration": "gemma3_text", "Mistral3ForConditionalGeneration": "mistral"}
# A config.json without `architectures`: its model_type → the architecture.
MODEL_TYPES = {"gemma3": "Gemma3ForConditionalGeneration", "mistral3": "Mistral3ForConditionalGeneration"}
# Fields of the whole model's config that are its language model's: where the top level gives one, it wins (the
# published Gemma 3 configs give their two end-of-turn ids there only).
TOP_LEVEL_FIELDS = ("tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id")
# Stored prefix of the language model's tensors → the name weights.py speaks (a text model's checkpoint).
TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)


def architecture_of(raw: Any) -> str | None:
    """The multimodal architecture `raw` (a config.json) describes, or None for a text model's config."""
    if not isinstance(raw, dict):
        return None
    architectures = raw.get("architectures")
    if isinstance(architectures, list) and architectures:
        first = architectures[0]
        return first if isinstance(first, str) and first in TEXT_DEFAULTS else None
    model_type = raw.get("model_type")
    return MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The language model's config of a multimodal config.json, as a text model's config.json would give it:
    `text_config` over its class's defaults, the top level's token ids and tied head over those, and the
    multimodal architecture's name kept (it is what is served). `raw` unchanged when it is not multimodal."""
    architecture = architecture_of(raw)
    if architecture is None:
        return raw
    # Required, though transformers would take Gemma3TextConfig's defaults whole: those are no published model's, and
    # a config without it is a text model's config under the wrong architecture.
    if raw.get("text_config") is None:
        raise KeyError("text_config")
    nested = fields.json_object(raw, "text_config")
    text_type = nested.get("model_type", TEXT_MODEL_TYPES[architecture])
    if text_type != TEXT_MODEL_TYPES[architecture]:
        raise UnsupportedArchitectureError(
            f"unsupported {architecture} language model {fields.shown(text_type)} (text_config model_type; "
            f"supported: {TEXT_MODEL_TYPES[architecture]!r})"
        )
    merged = {**TEXT_DEFAULTS[architecture], **nested}
    merged.update({name: raw[name] for name in TOP_LEVEL_FIELDS if raw.get(name) is not None})
    merged["architectures"] = [architecture]
    return merged


def text_tensor_names(stored: list[str]) -> dict[str, str]:
    """The language model's tensors among a multimodal checkpoint's `stored` names: the name weights.py speaks →
    the stored name. The vision tower's and projector's are left out. ValueError naming both when two stored names
    would be one tensor (a checkpoint holding both layouts)."""
    ours: dict[str, str] = {}
    for name in stored:
        prefix = next((p for p in TEXT_PREFIXES if name.startswith(p[0])), None)
        if prefix is None:
            continue
        text_name = prefix[1] + name.removeprefix(prefix[0])
        if text_name in ours:
            raise ValueError(f"tensors {ours[text_name]!r} and {name!r} are both the language model's {text_name!r}")
        ours[text_name] = name
    return ours
