"""SmolLM3, Granite and OLMo 2 GGUFs (`general.architecture` smollm3, granite, olmo2): tiny models converted the way
llama.cpp's convert_hf_to_gguf.py converts them compute what their safetensors originals compute, what llama.cpp
fixes or defaults takes its values, and an OLMo 3 (converted to olmo2, with a window) is refused by name."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch

from cake_py.errors import UnsupportedArchitectureError, WeightsError
from cake_py.models.config import ModelConfig
from cake_py.models.gguf import GGUFWeights
from cake_py.models.safetensors_folder import SafetensorsWeights
from tests.fixtures.gguf_files import LLAMA_NAMES, gguf_name, permute, write_file, write_tokenizer
from tests.fixtures.tiny_models import _randomise
from tests.unit.models.test_gguf_gemma import logits

transformers = pytest.importorskip("transformers")

# Where OLMo 2's blocks differ from Llama's in llama.cpp's names (gguf's MODEL_TENSORS[OLMO2]).
OLMO2_NAMES = {"post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def write_variant_gguf(folder: Path, path: Path, metadata: dict[str, Any] | None = None) -> Path:
    """The tiny model in `folder` as convert_hf_to_gguf.py writes it: SmolLM3 and Granite by its LlamaModel (q/k
    rows interleaved), Granite's multipliers as `*_scale` keys, OLMo 2 with its rows as they are. `metadata`
    replaces the Granite keys ({key: None} leaves one out) or adds others ({key: value})."""
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    arch = config.family
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_vocab_size(config.vocab_size)
    keys: dict[str, Any] = {}
    if arch == "granite":
        keys = {
            "embedding_scale": config.embedding_multiplier,
            "residual_scale": config.residual_multiplier,
            "attention.scale": config.attention_multiplier,
            "logit_scale": config.logits_scaling,
        }
    for key, value in {**keys, **(metadata or {})}.items():
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        elif value is not None:
            writer.add_uint32(f"{arch}.{key}", value)
    write_tokenizer(writer, folder)
    names = {**LLAMA_NAMES, **(OLMO2_NAMES if arch == "olmo2" else {})}
    for name, tensor in source.load(source.names(), torch.float32).items():
        array = tensor.numpy()
        if arch != "olmo2" and ".q_proj." in name:
            array = permute(array, config.n_heads)
        elif arch != "olmo2" and ".k_proj." in name:
            array = permute(array, config.n_kv_heads)
        writer.add_tensor(gguf_name(name, names), array, raw_dtype=gguf.GGMLQuantizationType.F32)
    write_file(writer)
    return path


@pytest.fixture(scope="module")
def smollm3_of_four_layers(tiny_model_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SmolLM3 with 4 layers and SmolLM3Config's default NoPE layers (the 4th), which is what llama.cpp
    computes for any smollm3 GGUF: its converter drops `no_rope_layers`."""
    tiny = tiny_model_factory("smollm3")
    folder = tmp_path_factory.mktemp("smollm3") / "smollm3-4"
    raw = json.loads((tiny / "config.json").read_text())
    raw.pop("no_rope_layers")
    raw.pop("layer_types")
    config = transformers.SmolLM3Config(**{**raw, "num_hidden_layers": 4})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, 0)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, folder / name)
    return folder


@pytest.mark.parametrize("kind", ["smollm3", "granite", "olmo2"])
def test_a_variant_gguf_computes_what_its_safetensors_original_does(
    kind: str, tiny_model_factory: Any, smollm3_of_four_layers: Path, tmp_path: Path
) -> None:
    folder = smollm3_of_four_layers if kind == "smollm3" else tiny_model_factory(kind)
    ours = GGUFWeights(write_variant_gguf(folder, tmp_path / f"{kind}.gguf"))
    reference = SafetensorsWeights(folder)
    expected_config = ModelConfig.from_hf(reference.config)
    config = ModelConfig.from_hf(ours.config)
    assert config.family == kind and config.rms_norm_eps == pytest.approx(expected_config.rms_norm_eps)
    if kind == "smollm3":
        assert config.rope_layers == (True, True, True, False)
    if kind == "granite":  # float32 metadata: to its precision
        for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
            assert getattr(config, name) == pytest.approx(getattr(expected_config, name), rel=1e-7), name
    ignored: dict[str, Any] = {"rms_norm_eps": 0.0, "eos_token_ids": (), "bos_token_id": None}
    if kind == "granite":
        ignored.update(embedding_multiplier=1.0, residual_multiplier=1.0, attention_multiplier=1.0, logits_scaling=1.0)
    assert dataclasses.replace(config, **ignored) == dataclasses.replace(expected_config, **ignored)
    assert sorted(ours.names()) == sorted(reference.names())
    loaded, expected = ours.load(ours.names(), torch.float32), reference.load(reference.names(), torch.float32)
    for name, tensor in expected.items():  # q/k rows back in HF's order
        assert torch.equal(loaded[name], tensor), name
    ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(ours, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_granite_scales_left_out_scale_nothing_but_the_logit_scale_is_required(
    tiny_model_factory: Any, tmp_path: Path
) -> None:
    """As llama.cpp reads them: an absent scale (or 0) is none, the attention's then head_dim ** -0.5; a file
    without `granite.logit_scale` does not load."""
    folder = tiny_model_factory("granite")
    left_out = {"embedding_scale": None, "residual_scale": None, "attention.scale": None, "logit_scale": 0.0}
    config = ModelConfig.from_hf(GGUFWeights(write_variant_gguf(folder, tmp_path / "plain.gguf", left_out)).config)
    assert (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) == (1.0, 1.0, 1.0)
    assert config.attention_scale == pytest.approx(config.head_dim**-0.5)
    with pytest.raises(WeightsError, match="granite.logit_scale"):
        GGUFWeights(write_variant_gguf(folder, tmp_path / "no-logit-scale.gguf", {"logit_scale": None}))


def test_an_olmo3_gguf_is_refused_naming_its_window(tiny_model_factory: Any, tmp_path: Path) -> None:
    """llama.cpp converts OLMo 3 to olmo2 with a sliding window on three layers of four: not computed here."""
    path = write_variant_gguf(tiny_model_factory("olmo2"), tmp_path / "olmo3.gguf", {"attention.sliding_window": 16})
    with pytest.raises(UnsupportedArchitectureError, match=r"olmo2 GGUF with a sliding window \(16\).*OLMo 3"):
        GGUFWeights(path)
