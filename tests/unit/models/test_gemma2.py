"""Gemma 2 configs read as transformers reads them: which layers slide, the attention scale, the soft-caps (with
Gemma2Config's defaults when left out, none when null), and malformed caps named.

Parity of the model itself (logits, cached decode, greedy tokens, batches, bfloat16, a split model) is in
test_parity.py, over the tiny Gemma 2 of tests/fixtures/tiny_models.py; its attention in test_softcapping.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from cake_py.errors import ModelError, UnsupportedArchitectureError
from cake_py.models.config import ModelConfig

transformers = pytest.importorskip("transformers")

# google/gemma-2-2b-it's config.json as published (written by transformers 4.42: no layer_types), shrunk to 6 layers.
HUB_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": [1, 107],
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 6,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 256000,
}
# gemma-2-27b's shape: heads 128 wide, scaled by (hidden / heads) ** -0.5 instead.
GEMMA2_27B = {"hidden_size": 4608, "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
              "query_pre_attn_scalar": 144, "num_hidden_layers": 5}  # fmt: skip


def reference_config(raw: dict[str, Any]) -> Any:
    fields = {key: value for key, value in raw.items() if key not in ("model_type", "architectures")}
    return transformers.AutoConfig.for_model("gemma2", **fields)


@pytest.mark.parametrize("changes", [{}, GEMMA2_27B], ids=["gemma-2-2b", "gemma-2-27b"])
def test_a_hub_config_reads_as_transformers_reads_it(changes: dict[str, Any]) -> None:
    """From a config.json of the older format and from the one transformers writes now (layer_types,
    rope_parameters)."""
    raw = {**HUB_CONFIG, **changes}
    reference = reference_config(raw)
    rewritten = {**reference.to_dict(), "architectures": ["Gemma2ForCausalLM"]}
    for ours in (ModelConfig.from_hf(raw), ModelConfig.from_hf(rewritten)):
        assert (ours.family, ours.architecture) == ("gemma2", "Gemma2ForCausalLM")
        assert ours.eos_token_ids == (1, 107) and ours.tie_word_embeddings and not ours.qk_norm
        assert (ours.head_dim, ours.activation) == (reference.head_dim, "gelu_tanh")
        assert ours.attention_scale == reference.query_pre_attn_scalar**-0.5
        assert ours.attn_logit_softcapping == reference.attn_logit_softcapping == 50.0
        assert ours.final_logit_softcapping == reference.final_logit_softcapping == 30.0
        windows = [ours.window_of(layer) for layer in range(ours.n_layers)]
        assert windows == [4096 if kind == "sliding_attention" else None for kind in reference.layer_types]
        assert windows[:2] == [4096, None]  # layer 0 slides
        assert ours.local_rope is None and ours.rope.theta == reference.rope_parameters["rope_theta"]


def test_a_config_without_architectures_is_read_by_its_model_type() -> None:
    raw = {key: value for key, value in HUB_CONFIG.items() if key != "architectures"}
    config = ModelConfig.from_hf(raw)
    assert (config.family, config.architecture) == ("gemma2", "Gemma2ForCausalLM")


def test_fields_left_out_take_transformers_defaults() -> None:
    """Gemma2Config caps at 50 and 30, windows at 4096, heads 256 wide scaled by 256 ** -0.5, ties the embedding."""
    left_out = ("attn_logit_softcapping", "final_logit_softcapping", "head_dim", "query_pre_attn_scalar",
                "sliding_window", "hidden_act", "hidden_activation", "rope_theta")  # fmt: skip
    raw = {key: value for key, value in HUB_CONFIG.items() if key not in left_out}
    reference = reference_config(raw)
    ours = ModelConfig.from_hf(raw)
    assert (ours.attn_logit_softcapping, ours.final_logit_softcapping) == (50.0, 30.0)
    assert (reference.attn_logit_softcapping, reference.final_logit_softcapping) == (50.0, 30.0)
    assert ours.head_dim == reference.head_dim and ours.attention_scale == reference.query_pre_attn_scalar**-0.5
    windows = [reference.sliding_window if kind == "sliding_attention" else None for kind in reference.layer_types]
    assert [ours.window_of(layer) for layer in range(ours.n_layers)] == windows
    assert ours.tie_word_embeddings == reference.tie_word_embeddings and ours.activation == "gelu_tanh"


def test_a_null_cap_is_no_cap() -> None:
    ours = ModelConfig.from_hf({**HUB_CONFIG, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (ours.attn_logit_softcapping, ours.final_logit_softcapping) == (None, None)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"attn_logit_softcapping": 0}, "attn_logit_softcapping must be a finite number > 0, got 0.0"),
        ({"final_logit_softcapping": -30}, "final_logit_softcapping must be a finite number > 0, got -30.0"),
        ({"final_logit_softcapping": "30"}, "final_logit_softcapping must be a number, got '30'"),
        ({"sliding_window": None}, "sliding_window must be a number of positions for Gemma 2, got None"),
    ],
)
def test_a_malformed_gemma2_field_is_named(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModelError, match="config.json") as raised:
        ModelConfig.from_hf({**HUB_CONFIG, **changes})
    assert needle in str(raised.value)


def test_bidirectional_attention_is_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="use_bidirectional_attention True"):
        ModelConfig.from_hf({**HUB_CONFIG, "use_bidirectional_attention": True})
