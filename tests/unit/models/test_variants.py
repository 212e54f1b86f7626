"""SmolLM3, Granite and OLMo 2 (cake_py.models.variants): their config fields read as transformers reads them, and
each variant's difference from Llama visible in its tiny model's logits (test_parity.py checks those logits against
transformers; here, that a model computed without the difference would fail that check)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from cake_py.errors import ModelError
from cake_py.models.config import ModelConfig
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.weights import build_transformer, stage_tensor_names
from tests.conftest import TinyModelFactory
from tests.fixtures.tiny_models import copy_model
from tests.unit.models.test_parity import encode_prompt, load_reference, reference_logits, run

transformers = pytest.importorskip("transformers")

SIZES = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 8}


# ---- SmolLM3: which layers rotate, which attend through a window ----


@pytest.mark.parametrize(
    "fields",
    [
        {},  # every 4th layer NoPE, SmolLM3Config's default
        {"no_rope_layer_interval": 3},
        {"no_rope_layers": [1, 0, 0, 1, 1, 1, 0, 1]},
        {"use_sliding_window": True, "sliding_window": 8},  # the NoPE layers windowed
        {"use_sliding_window": True, "sliding_window": 8, "no_rope_layers": [0, 1, 1, 1, 1, 1, 1, 0]},
    ],
)
@pytest.mark.parametrize("with_layer_types", [True, False], ids=["layer_types", "no_layer_types"])
def test_smollm3_layers_take_rope_and_window_as_transformers_decides(
    fields: dict[str, Any], with_layer_types: bool
) -> None:
    reference = transformers.SmolLM3Config(**SIZES, **fields)
    raw = reference.to_dict()
    if "no_rope_layers" not in fields:
        raw.pop("no_rope_layers")  # as a config.json that relies on the interval
    if not with_layer_types:
        raw.pop("layer_types")  # as configs written before transformers wrote them
    ours = ModelConfig.from_hf(raw)
    assert ours.family == "smollm3"
    assert [ours.uses_rope(layer) for layer in range(ours.n_layers)] == [bool(f) for f in reference.no_rope_layers]
    window = reference.sliding_window
    expected = [window if kind == "sliding_attention" else None for kind in reference.layer_types]
    assert [ours.window_of(layer) for layer in range(ours.n_layers)] == expected
    assert ours.attention_scale == ours.head_dim**-0.5


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"no_rope_layers": [1, 0, 1]}, "no_rope_layers"),  # shorter than the 8 layers
        ({"no_rope_layers": [1, 0, 1, 1, 2, 1, 1, 1]}, "no_rope_layers"),
        ({"no_rope_layers": "1,0,1"}, "no_rope_layers"),
        ({"no_rope_layer_interval": 0}, "no_rope_layer_interval"),
        ({"no_rope_layer_interval": "4"}, "no_rope_layer_interval"),
    ],
)
def test_malformed_smollm3_rope_fields_are_named(fields: dict[str, Any], named: str) -> None:
    raw = {"architectures": ["SmolLM3ForCausalLM"], "vocab_size": 384, "intermediate_size": 128, **SIZES, **fields}
    with pytest.raises(ModelError, match=named):
        ModelConfig.from_hf(raw)


# ---- Granite: four scalings, each 1.0 when left out ----

GRANITE_FIELDS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


def test_granite_scalings_left_out_take_transformers_defaults() -> None:
    raw = transformers.GraniteConfig(**SIZES).to_dict()
    for name in GRANITE_FIELDS:
        raw.pop(name)
    reference = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    ours = ModelConfig.from_hf({**raw, "model_type": "granite"})
    assert ours.family == "granite"
    # attention_multiplier defaults to 1.0, not head_dim ** -0.5: the scores of a Granite are not scaled by width.
    assert ours.attention_scale == reference.attention_multiplier == 1.0
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        assert getattr(ours, name) == getattr(reference, name) == 1.0


@pytest.mark.parametrize("name", GRANITE_FIELDS)
@pytest.mark.parametrize("value", [0, -0.5, math.inf, "2.0", True])
def test_a_bad_granite_scaling_is_named(name: str, value: object) -> None:
    raw = {**transformers.GraniteConfig(**SIZES).to_dict(), name: value}
    with pytest.raises(ModelError, match=name):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize(("config_class", "family"), [("GraniteConfig", "granite"), ("Olmo2Config", "olmo2")])
def test_families_without_a_window_ignore_one_in_config_json(config_class: str, family: str) -> None:
    """transformers' Granite and OLMo 2 attend to every position whatever config.json says of a window."""
    raw = getattr(transformers, config_class)(**SIZES).to_dict()
    raw.update(sliding_window=16, use_sliding_window=True, layer_types=["sliding_attention"] * 8)
    ours = ModelConfig.from_hf(raw)
    assert ours.family == family
    assert [ours.window_of(layer) for layer in range(ours.n_layers)] == [None] * 8


def test_olmo2_q_and_k_norms_span_every_head(tiny_model_factory: TinyModelFactory) -> None:
    source = SafetensorsWeights(tiny_model_factory("olmo2"))
    config = ModelConfig.from_hf(source.config)
    assert config.qk_norm
    assert source.info("model.layers.0.self_attn.q_norm.weight").shape == (config.n_heads * config.head_dim,)
    assert source.info("model.layers.0.self_attn.k_norm.weight").shape == (config.n_kv_heads * config.head_dim,)
    assert not any("input_layernorm" in name for name in source.names())


# ---- each difference shows in the tiny model's logits ----


def _prefill_logits(folder: Path, config: ModelConfig) -> torch.Tensor:
    """Our float32 prefill logits of the parity prompt, computed with `config` (perhaps not the folder's own)."""
    source = SafetensorsWeights(folder)
    names = stage_tensor_names(source, config, 0, config.n_layers, with_embedding=True, with_head=True)
    tensors = source.load(names, torch.float32)
    model = build_transformer(
        config, tensors, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    (logits,) = run(model, model.new_kv_store(), [(0, 0, encode_prompt(folder))])
    return logits


@pytest.mark.parametrize(
    ("kind", "without"),
    [
        ("smollm3", {"rope_layers": ()}),  # rope on its NoPE layer too
        ("granite", {"embedding_multiplier": 1.0}),
        ("granite", {"residual_multiplier": 1.0}),
        ("granite", {"attention_multiplier": None}),  # head_dim ** -0.5
        ("granite", {"logits_scaling": 1.0}),
    ],
    ids=["smollm3-nope", "granite-embedding", "granite-residual", "granite-attention", "granite-logits"],
)
@torch.inference_mode()
def test_a_variant_computed_without_its_difference_leaves_transformers(
    kind: str, without: dict[str, Any], tiny_model_factory: TinyModelFactory
) -> None:
    folder = tiny_model_factory(kind)
    config = ModelConfig.from_hf(SafetensorsWeights(folder).config)
    expected = reference_logits(load_reference(folder), encode_prompt(folder))
    scale = expected.abs().max().item()
    assert (_prefill_logits(folder, config) - expected).abs().max().item() < 1e-4 * scale
    changed = _prefill_logits(folder, dataclasses.replace(config, **without))
    assert (changed - expected).abs().max().item() > 0.05 * scale


@torch.inference_mode()
def test_a_windowed_smollm3_matches_transformers(tiny_model_factory: TinyModelFactory, tmp_path: Path) -> None:
    """SmolLM3 with use_sliding_window: its NoPE layer (layer 1) attends through an 8-position window, shorter than
    the prompt, and its other layers to everything (SmolLM3-3B itself has no window)."""
    folder = copy_model(tiny_model_factory("smollm3"), tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(use_sliding_window=True, sliding_window=8)
    raw.pop("layer_types")  # transformers derives them: the NoPE layers windowed
    raw["layer_types"] = transformers.SmolLM3Config(**raw).layer_types
    (folder / "config.json").write_text(json.dumps(raw))
    config = ModelConfig.from_hf(raw)
    assert [config.window_of(layer) for layer in range(config.n_layers)] == [None, 8, None]
    assert len(encode_prompt(folder)) > 8
    expected = reference_logits(load_reference(folder), encode_prompt(folder))
    torch.testing.assert_close(_prefill_logits(folder, config), expected, rtol=0.0, atol=1e-4 * expected.abs().max())
    unwindowed = _prefill_logits(folder, dataclasses.replace(config, sliding_window=None, windowed_layers=()))
    assert (unwindowed - expected).abs().max() > 0.05 * expected.abs().max()  # the window shows
