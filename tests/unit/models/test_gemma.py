"""Gemma 3 configs read as transformers reads them, and the ones the layer code would compute wrongly refused.

Parity of the model itself (float32 and bfloat16, KV cache, batches, a split model) is in test_parity.py, over
the tiny Gemma 3 of tests/fixtures/tiny_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cake_py.errors import ModelError, UnsupportedArchitectureError
from cake_py.models.config import ModelConfig
from cake_py.models.gemma import GemmaTransformer
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.weights import load_transformer
from tests.conftest import TinyModelFactory
from tests.fixtures.tiny_models import copy_model

transformers = pytest.importorskip("transformers")

# google/gemma-3-1b-it's config.json as published (written by transformers 4.50: no layer_types, the rope of the
# sliding layers as rope_local_base_freq), shrunk to 8 layers.
HUB_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 8,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 262144,
}


def reference_config(raw: dict[str, Any]) -> Any:
    fields = {key: value for key, value in raw.items() if key not in ("model_type", "architectures")}
    return transformers.AutoConfig.for_model("gemma3_text", **fields)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 3},  # as gemma-3-4b's
        {"rope_theta": 5e5, "rope_local_base_freq": 2e4, "num_hidden_layers": 7},
    ],
    ids=["gemma-3-1b", "linear-scaling", "other-thetas"],
)
def test_a_hub_config_reads_as_transformers_reads_it(changes: dict[str, Any]) -> None:
    """Which layers slide, and each layer's rope, from a config.json of the older format and from the one
    transformers writes now (layer_types, rope_parameters per layer kind)."""
    raw = {**HUB_CONFIG, **changes}
    reference = reference_config(raw)
    rewritten = {**reference.to_dict(), "architectures": ["Gemma3ForCausalLM"]}
    for ours in (ModelConfig.from_hf(raw), ModelConfig.from_hf(rewritten)):
        assert ours.family == "gemma3" and ours.eos_token_ids == (1, 106) and ours.tie_word_embeddings
        assert (ours.head_dim, ours.attention_scale, ours.activation) == (256, 256**-0.5, "gelu_tanh")
        windows = [ours.window_of(layer) for layer in range(ours.n_layers)]
        assert windows == [512 if kind == "sliding_attention" else None for kind in reference.layer_types]
        assert None in windows and 512 in windows
        for layer, kind in enumerate(reference.layer_types):
            expected = reference.rope_parameters[kind]
            rope = ours.rope_of(layer)
            assert (rope.theta, rope.kind) == (expected["rope_theta"], expected["rope_type"])
            assert rope.factor == expected.get("factor", 1.0)


def test_a_config_without_architectures_is_read_by_its_model_type() -> None:
    raw = {key: value for key, value in HUB_CONFIG.items() if key != "architectures"}
    config = ModelConfig.from_hf(raw)
    assert (config.family, config.architecture) == ("gemma3", "Gemma3ForCausalLM")


def test_fields_left_out_take_transformers_defaults() -> None:
    """Gemma3TextConfig's defaults differ from the other families': heads 256 wide, an attention scale of 256**-0.5,
    thetas of 1e6 and 1e4, a window of 4096 on five layers of six, tied embeddings, the tanh GeLU."""
    left_out = ("head_dim", "query_pre_attn_scalar", "rope_theta", "rope_local_base_freq", "sliding_window")
    raw = {key: value for key, value in HUB_CONFIG.items() if key not in left_out}
    raw = {key: value for key, value in raw.items() if key not in ("sliding_window_pattern", "hidden_activation")}
    reference = reference_config(raw)
    ours = ModelConfig.from_hf(raw)
    assert ours.head_dim == reference.head_dim == 256
    assert ours.attention_scale == reference.query_pre_attn_scalar**-0.5
    windows = [reference.sliding_window if kind == "sliding_attention" else None for kind in reference.layer_types]
    assert [ours.window_of(layer) for layer in range(ours.n_layers)] == windows
    assert ours.rope.theta == reference.rope_parameters["full_attention"]["rope_theta"]
    assert ours.rope_of(0).theta == reference.rope_parameters["sliding_attention"]["rope_theta"]
    assert ours.tie_word_embeddings == reference.tie_word_embeddings and ours.activation == "gelu_tanh"


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention True"),
        ({"hidden_activation": "gelu"}, "unsupported hidden_activation 'gelu'"),
    ],
    ids=["bidirectional", "exact-gelu"],
)
def test_a_config_the_layers_would_compute_wrongly_is_refused(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(UnsupportedArchitectureError) as raised:
        ModelConfig.from_hf({**HUB_CONFIG, **changes})
    assert needle in str(raised.value)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"sliding_window": None}, "sliding_window must be a number of positions for Gemma 3, got None"),
        ({"sliding_window_pattern": 0}, "sliding_window_pattern must be positive, got 0"),
        ({"rope_local_base_freq": -1}, "rope_local_base_freq must be a finite number > 0, got -1.0"),
        ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a finite number > 0, got 0.0"),
    ],
)
def test_a_malformed_gemma_field_is_named(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModelError, match="config.json") as raised:
        ModelConfig.from_hf({**HUB_CONFIG, **changes})
    assert needle in str(raised.value)


@torch.inference_mode()
def test_a_gemma3_config_with_soft_caps_computes_what_transformers_does(
    tiny_model_factory: TinyModelFactory, tmp_path: Path
) -> None:
    """Gemma3TextConfig's caps (None in the published configs, refused here before) are read as transformers reads
    them: the logits are capped (by Gemma 2's code), the attention scores are not (transformers' Gemma 3 attention,
    eager included, never passes its cap on), through prefill, a chunk and cached decode steps past the window."""
    folder = copy_model(tiny_model_factory("gemma3"), tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(attn_logit_softcapping=3.0, final_logit_softcapping=2.0)
    (folder / "config.json").write_text(json.dumps(raw))
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (None, 2.0)
    ours = load_transformer(source, config, 0, 3, with_embedding=True, with_head=True, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.randint(0, config.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    expected = reference(ids[None]).logits[0]
    assert expected.abs().max() <= 2.0
    kv = ours.new_kv_store()
    for start, end in [(0, 12), (12, 20)] + [(position, position + 1) for position in range(20, 30)]:
        logits = ours.head(ours.forward_layers(ours.embed(ids[start:end]), [SequenceSlice(0, start, end - start)], kv))
        torch.testing.assert_close(logits, expected[start:end], atol=1e-4, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_embedding_scale_is_rounded_to_the_dtype_as_transformers_rounds_it(dtype: torch.dtype) -> None:
    """sqrt(96) is 9.798, 9.8125 in bfloat16: transformers multiplies by the rounded one (the checkpoints were trained
    so). The tiny model's sqrt(64) = 8 cannot show it."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    sizes = {"hidden_size": 96, "vocab_size": 10, "num_hidden_layers": 1, "head_dim": 16}
    config = ModelConfig.from_hf({**HUB_CONFIG, **sizes})
    torch.manual_seed(0)
    reference = Gemma3TextScaledWordEmbedding(10, 96, 0, embed_scale=96**0.5).to(dtype)
    ours = GemmaTransformer(config, 0, 0, with_embedding=True, with_head=False).to(dtype)
    assert ours.embed_tokens is not None
    ours.embed_tokens.weight.data.copy_(reference.weight)
    tokens = torch.arange(10)
    with torch.inference_mode():
        assert torch.equal(ours.embed(tokens), reference(tokens))


@pytest.mark.parametrize("split", [1, 2])
def test_a_model_split_at_any_layer_computes_what_the_whole_does(
    split: int, tiny_model_factory: TinyModelFactory
) -> None:
    """Each stage holds the ropes of its own layers only (sliding, full, sliding: a stage of layer 0 has the local
    rope alone), and the two stages chained, prefilling past the window and then decoding, equal the whole model."""
    source = SafetensorsWeights(tiny_model_factory("gemma3"))
    config = ModelConfig.from_hf(source.config)

    def stage(start: int, end: int) -> GemmaTransformer:
        model = load_transformer(
            source, config, start, end, with_embedding=start == 0, with_head=end == 3, dtype=torch.float32
        )
        assert isinstance(model, GemmaTransformer)
        return model

    whole, front, back = stage(0, 3), stage(0, split), stage(split, 3)
    assert len(whole.ropes) == 2 and {len(front.ropes), len(back.ropes)} == {1, 2}
    assert [whole.ropes[i] for i in whole.layer_ropes] == [config.rope_of(layer) for layer in range(3)]
    kvs = [model.new_kv_store() for model in (whole, front, back)]
    ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for start, end in [(0, 20), (20, 21), (21, 22), (22, 24)]:
            batch = [SequenceSlice(0, start, end - start)]
            expected = whole.head(whole.forward_layers(whole.embed(ids[start:end]), batch, kvs[0]))
            hidden = front.forward_layers(front.embed(ids[start:end]), batch, kvs[1])
            torch.testing.assert_close(back.head(back.forward_layers(hidden, batch, kvs[2])), expected)
