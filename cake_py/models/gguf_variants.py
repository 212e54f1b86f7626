"""SmolLM3, Granite and OLMo 2 as llama.cpp stores them in a GGUF (`general.architecture` smollm3, granite, olmo2),
translated back to their HF form (models/variants.py computes them).

What differs from the Llama-shaped architectures (convert_hf_to_gguf.py's converters, llama-model.cpp's hparams):
- smollm3: no metadata says which layers are NoPE: llama.cpp fixes it at every 4th (`n_no_rope_layer_step = 4`),
  whatever the HF config said. Its converter is Llama's, q/k rows interleaved for llama.cpp's "normal" rope.
- granite: the four scalings as `granite.embedding_scale`, `granite.residual_scale`, `granite.attention.scale` and
  `granite.logit_scale` (the last required, as llama.cpp requires it); one left out (or 0) scales nothing, and the
  attention scale then is head_dim ** -0.5. Llama's converter too: q/k rows interleaved.
- olmo2: two norms per block, on the branches' outputs (`post_attention_norm`, `post_ffw_norm`); q/k rows stored as
  HF has them (NEOX rope). OLMo 3 is converted to this architecture too, with a sliding window
  (`olmo2.attention.sliding_window`): such a file is refused, naming the window, as OLMo 3 is not implemented here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cake_py.errors import UnsupportedArchitectureError

# general.architecture → HF architectures[0]
ARCHITECTURES = {"smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM", "olmo2": "Olmo2ForCausalLM"}
PERMUTED = {"smollm3", "granite"}  # converted by llama.cpp's LlamaModel, which interleaves each q/k head's rows
BLOCK_NAMES = {
    "olmo2": {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
}
REQUIRED_KEYS = {"granite": ("logit_scale",)}  # beyond every architecture's, as llama.cpp's loader asks
NO_ROPE_LAYER_STEP = 4  # llama.cpp's for smollm3


def variant_fields(arch: str, value: Callable[..., Any], config: dict[str, Any]) -> dict[str, Any]:
    """The HF config fields of `arch` (one of ARCHITECTURES) from its metadata (`value(key, default)`), given the
    fields read as for any architecture (`config`); ModelConfig judges the values."""
    if arch == "smollm3":
        return {"no_rope_layer_interval": NO_ROPE_LAYER_STEP, "use_sliding_window": False}
    if arch == "granite":
        head_dim = config["head_dim"]
        default_scale = head_dim**-0.5 if isinstance(head_dim, int | float) and head_dim > 0 else None
        return {
            "embedding_multiplier": value("embedding_scale") or 1.0,
            "residual_multiplier": value("residual_scale") or 1.0,
            "attention_multiplier": value("attention.scale") or default_scale,
            "logits_scaling": value("logit_scale") or 1.0,
        }
    window = value("attention.sliding_window")
    if window:
        raise UnsupportedArchitectureError(
            f"unsupported olmo2 GGUF with a sliding window ({window}): OLMo 3, which is converted to olmo2, is not "
            "implemented; OLMo 2 files have no window"
        )
    return {}
