"""Multimodal checkpoints served as their language model (cake_py.models.multimodal): a published config.json, which
leaves most of the language model's fields to transformers' defaults, read as transformers reads it; the language
model's tensors found under either of transformers' layouts; the vision tower and projector never loaded or counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cake_py.cluster.master import ends_bytes, layer_bytes
from cake_py.errors import ModelError, UnsupportedArchitectureError, WeightsError
from cake_py.models.config import ModelConfig
from cake_py.models.hub import resolve_model
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.weights import load_transformer
from tests.conftest import TinyModelFactory
from tests.fixtures.tiny_models import copy_model

transformers = pytest.importorskip("transformers")

KINDS = ("gemma3_vision", "mistral3_vision")
VISION = {"model_type": "siglip_vision_model", "hidden_size": 1152, "num_hidden_layers": 27, "patch_size": 14}
# google/gemma-3-4b-it's and gemma-3-27b-it's config.json as published (their vision_config cut short): the language
# model's head count, vocabulary, context and ropes are Gemma3TextConfig's defaults, its end-of-turn ids top-level.
GEMMA3_4B: dict[str, Any] = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": VISION,
}
GEMMA3_27B_TEXT = {
    "head_dim": 128,
    "hidden_size": 5376,
    "intermediate_size": 21504,
    "model_type": "gemma3_text",
    "num_attention_heads": 32,
    "num_hidden_layers": 62,
    "num_key_value_heads": 16,
    "query_pre_attn_scalar": 168,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
}
GEMMA3_27B = {**GEMMA3_4B, "text_config": GEMMA3_27B_TEXT}
# mistralai/Mistral-Small-3.1-24B-Instruct-2503's config.json (its vision_config cut short).
MISTRAL_SMALL: dict[str, Any] = {
    "architectures": ["Mistral3ForConditionalGeneration"],
    "image_token_index": 10,
    "model_type": "mistral3",
    "multimodal_projector_bias": False,
    "projector_hidden_act": "gelu",
    "spatial_merge_size": 2,
    "text_config": {
        "attention_dropout": 0.0,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "intermediate_size": 32768,
        "max_position_embeddings": 131072,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "sliding_window": None,
        "use_cache": True,
        "vocab_size": 131072,
    },
    "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14},
    "vision_feature_layer": -1,
}


@pytest.mark.parametrize("raw", [GEMMA3_4B, GEMMA3_27B], ids=["4b", "27b"])
def test_a_published_config_reads_as_transformers_reads_it(raw: dict[str, Any]) -> None:
    config = ModelConfig.from_hf(json.loads(json.dumps(raw)))
    text = transformers.Gemma3Config(**json.loads(json.dumps(raw))).text_config
    assert (config.family, config.architecture) == ("gemma3", "Gemma3ForConditionalGeneration")
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.n_layers) == (
        text.vocab_size,
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
    )
    assert (config.n_heads, config.n_kv_heads, config.head_dim) == (
        text.num_attention_heads,
        text.num_key_value_heads,
        text.head_dim,
    )
    assert config.max_position_embeddings == text.max_position_embeddings == 131_072
    assert config.query_pre_attn_scalar == text.query_pre_attn_scalar
    windowed = [config.window_of(layer) is not None for layer in range(config.n_layers)]
    assert windowed == [kind == "sliding_attention" for kind in text.layer_types]
    assert config.sliding_window == text.sliding_window == 1024
    full, local = text.rope_parameters["full_attention"], text.rope_parameters["sliding_attention"]
    assert (config.rope.theta, config.rope.kind, config.rope.factor) == (
        full["rope_theta"],
        full["rope_type"],
        full["factor"],
    )
    assert config.local_rope is not None and config.local_rope.theta == local["rope_theta"]
    assert config.activation == "gelu_tanh" and config.tie_word_embeddings
    assert config.eos_token_ids == (1, 106) and config.bos_token_id == 2  # the top level's, then the text's default


def test_mistral_small_reads_as_transformers_reads_it() -> None:
    config = ModelConfig.from_hf(json.loads(json.dumps(MISTRAL_SMALL)))
    text = transformers.Mistral3Config(**json.loads(json.dumps(MISTRAL_SMALL))).text_config
    assert (config.family, config.architecture) == ("mistral", "Mistral3ForConditionalGeneration")
    assert (config.vocab_size, config.hidden_size, config.n_layers, config.n_heads, config.n_kv_heads) == (
        text.vocab_size,
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads,
    )
    assert config.head_dim == text.head_dim == 128 != config.hidden_size // config.n_heads
    assert config.rope.theta == text.rope_parameters["rope_theta"] == 1e9
    assert config.sliding_window is None and config.max_position_embeddings == text.max_position_embeddings
    assert config.rms_norm_eps == text.rms_norm_eps and config.activation == "silu"
    assert not config.tie_word_embeddings  # its head is stored (language_model.lm_head.weight)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))  # MistralConfig's, as the config leaves them out


def test_another_language_model_under_a_multimodal_architecture_is_refused_by_name() -> None:
    """Ministral 3 is published as Mistral3ForConditionalGeneration with a text model of its own kind."""
    raw = {**MISTRAL_SMALL, "text_config": {**MISTRAL_SMALL["text_config"], "model_type": "ministral3"}}
    with pytest.raises(
        UnsupportedArchitectureError, match="Mistral3ForConditionalGeneration language model 'ministral3'"
    ):
        ModelConfig.from_hf(raw)


def test_a_text_config_that_is_not_an_object_is_named() -> None:
    with pytest.raises(ModelError, match="text_config must be a JSON object, got 7"):
        ModelConfig.from_hf({**GEMMA3_4B, "text_config": 7})


def test_a_multimodal_config_without_text_config_is_refused() -> None:
    """A text model's flat config under the multimodal architecture: read as transformers would, its own fields
    were ignored for Gemma3TextConfig's defaults, which are no published model's."""
    flat = {key: value for key, value in GEMMA3_4B.items() if key != "text_config"} | GEMMA3_4B["text_config"]
    with pytest.raises(ModelError, match="config.json has no 'text_config'"):
        ModelConfig.from_hf(flat)


def _rewrite(folder: Path, rename: dict[str, str]) -> None:
    """The folder's weights with each stored prefix in `rename` replaced."""
    file = folder / "model.safetensors"
    with safe_open(str(file), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    renamed = {}
    for name, tensor in tensors.items():
        old = next((prefix for prefix in rename if name.startswith(prefix)), None)
        renamed[name if old is None else rename[old] + name.removeprefix(old)] = tensor
    save_file(renamed, str(file), metadata={"format": "pt"})


def _logits(folder: Path) -> torch.Tensor:
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    model = load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    ids = torch.tensor([5 + (i * 13) % 300 for i in range(20)])
    return model.head(model.forward_layers(model.embed(ids), [SequenceSlice(0, 0, len(ids))], model.new_kv_store()))


# transformers 4.52-4.57's layout: the language model under the model, the head at the top.
MODEL_LAYOUT = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
}


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_both_layouts_give_the_same_model(kind: str, tiny_model_factory: TinyModelFactory, tmp_path: Path) -> None:
    original = tiny_model_factory(kind)
    folder = copy_model(original, tmp_path)
    _rewrite(folder, MODEL_LAYOUT)
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert "model.language_model.layers.0.self_attn.q_proj.weight" in handle.keys()
    assert SafetensorsWeights(folder).names() == SafetensorsWeights(original).names()
    torch.testing.assert_close(_logits(folder), _logits(original), rtol=0, atol=0)


def test_a_checkpoint_holding_both_layouts_is_refused_naming_both(
    tiny_model_factory: TinyModelFactory, tmp_path: Path
) -> None:
    folder = copy_model(tiny_model_factory(KINDS[0]), tmp_path)
    file = folder / "model.safetensors"
    with safe_open(str(file), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    extra = tensors["language_model.model.norm.weight"].clone()
    save_file({**tensors, "model.language_model.norm.weight": extra}, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="'language_model.model.norm.weight' and 'model.language_model.norm.weight'"):
        SafetensorsWeights(folder)


@pytest.mark.parametrize("kind", KINDS)
def test_the_vision_tower_is_never_counted_or_loaded(kind: str, tiny_model_factory: TinyModelFactory) -> None:
    """Placement's per-layer sizes and the master's own part add up to the language model's bytes, not the file's."""
    folder = tiny_model_factory(kind)
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        sizes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    language = sum(4 * torch.Size(shape).numel() for name, shape in sizes.items() if name.startswith("language_model"))
    vision = sum(
        4 * torch.Size(shape).numel() for name, shape in sizes.items() if not name.startswith("language_model")
    )
    assert vision > 0
    source = resolve_model(str(folder))
    assert sum(layer_bytes(source, torch.float32)) + ends_bytes(source, torch.float32) == language
    assert not any("vision" in name or "projector" in name for name in source.weights.names())
