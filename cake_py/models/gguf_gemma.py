"""Gemma 3 as llama.cpp stores it in a GGUF (`general.architecture = gemma3`), translated back to its HF form.

What differs from the Llama-shaped architectures (convert_hf_to_gguf.py's `Gemma3Model`, llama-model.cpp's hparams):
- four norms per block: `ffn_norm` is the feed-forward's input norm (HF `pre_feedforward_layernorm`), not Llama's
  `post_attention_layernorm`; `post_attention_norm` and `post_ffw_norm` normalise the two branches' outputs;
- every norm weight is stored with the 1 of Gemma's (1 + weight) already added;
- the metadata leaves out what llama.cpp fixes for the architecture: a sliding window on five layers of six, a local
  rope base of 10000, and an attention scale of head_dim ** -0.5, (hidden / heads) ** -0.5 for the 27B (62 layers).
  A file that does spell out the window pattern or the local rope base (`attention.sliding_window_pattern`,
  `rope.freq_base_swa`) is read as it says.

Gemma 2 (`general.architecture = gemma2`, the converter's `Gemma2Model`) is stored the same way, without q/k norms;
its metadata holds the soft-caps (`gemma2.attn_logit_softcapping`, `gemma2.final_logit_softcapping`) and the window,
and leaves out what llama.cpp fixes: every other layer windowed from layer 0 (a window of 4096 and caps of 50 and 30
where the keys are missing), the attention scale as Gemma 3's (hidden / heads for the 27B, 46 layers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ARCHITECTURE = "gemma3"
GEMMA2_ARCHITECTURE = "gemma2"
ARCHITECTURES = (ARCHITECTURE, GEMMA2_ARCHITECTURE)
BLOCK_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
NORM_OFFSET = 1.0  # added to every `*norm.weight` by the converter
LOCAL_ROPE_THETA = 10000.0
SLIDING_WINDOW_PATTERN = 6
LAYERS_OF_27B = 62
GEMMA2_LAYERS_OF_27B = 46
GEMMA2_SLIDING_WINDOW = 4096  # llama.cpp's n_swa for gemma2 when the file has none
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}  # llama.cpp's hparams defaults


def is_shifted_norm(hf_name: str) -> bool:
    """Whether the converter stored this tensor with NORM_OFFSET added."""
    return hf_name.endswith("norm.weight")


def gemma3_fields(value: Callable[..., Any], config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's HF config fields from its `gemma3.*` metadata (`value(key, default)`), given the fields read as for
    any architecture (`config`); ModelConfig judges the values."""
    n_layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    wide_heads = n_layers == LAYERS_OF_27B and isinstance(hidden, int) and isinstance(heads, int) and heads > 0
    fields: dict[str, Any] = {
        "sliding_window": value("attention.sliding_window"),
        "rope_local_base_freq": value("rope.freq_base_swa", LOCAL_ROPE_THETA),
        "query_pre_attn_scalar": hidden // heads if wide_heads else config["head_dim"],
        "final_logit_softcapping": value("final_logit_softcapping"),
        "attn_logit_softcapping": value("attn_logit_softcapping"),
    }
    pattern = value("attention.sliding_window_pattern", SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):  # per layer, whether it slides
        fields["layer_types"] = ["sliding_attention" if sliding else "full_attention" for sliding in pattern]
    else:
        fields["sliding_window_pattern"] = pattern
    return fields


def gemma2_fields(value: Callable[..., Any], config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2's HF config fields from its `gemma2.*` metadata, as `gemma3_fields`; the layers alternate as
    ModelConfig alternates a Gemma 2 config's without `layer_types`."""
    n_layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    wide_heads = n_layers == GEMMA2_LAYERS_OF_27B and isinstance(hidden, int) and isinstance(heads, int) and heads > 0
    return {
        "sliding_window": value("attention.sliding_window", GEMMA2_SLIDING_WINDOW),
        "query_pre_attn_scalar": hidden // heads if wide_heads else config["head_dim"],
        **{name: value(name, default) for name, default in GEMMA2_SOFTCAPS.items()},
    }
