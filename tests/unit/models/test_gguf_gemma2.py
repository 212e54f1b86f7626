"""Gemma 2 GGUFs (`general.architecture = gemma2`): the tiny Gemma 2 converted the way llama.cpp's
convert_hf_to_gguf.py converts it (norm weights + 1, four norms per block, the soft-caps and the window in the
metadata, no rope base) computes what its safetensors original computes; what llama.cpp leaves out takes its values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch

from cake_py.models import gguf_gemma
from cake_py.models.config import ModelConfig
from cake_py.models.gguf import GGUFWeights
from cake_py.models.safetensors_folder import SafetensorsWeights
from tests.fixtures.gguf_files import gguf_name, write_file
from tests.fixtures.tiny_models import copy_model
from tests.unit.models.test_gguf_gemma import GGUF_NAMES, logits


def write_gemma2_gguf(folder: Path, path: Path, *, with_metadata: bool = True) -> Path:
    """The tiny Gemma 2 as convert_hf_to_gguf.py's Gemma2Model writes it; without `with_metadata`, the caps and the
    window left out (as an older converter could)."""
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    writer = gguf.GGUFWriter(path, "gemma2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if with_metadata:
        assert config.attn_logit_softcapping is not None and config.final_logit_softcapping is not None
        assert config.sliding_window is not None
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{added["content"]: added["id"] for added in spec["added_tokens"]}}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(sorted(vocab, key=vocab.__getitem__))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    for name, tensor in source.load(source.names(), torch.float32).items():
        if name.endswith("norm.weight"):
            tensor = tensor + 1  # Gemma2Model.modify_tensors: llama.cpp's norms multiply by the weight alone
        writer.add_tensor(gguf_name(name, GGUF_NAMES), tensor.numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    write_file(writer)
    return path


@pytest.fixture(scope="module")
def original(tiny_model_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma 2 with the attention scale llama.cpp computes (head_dim's): its own 24 has no GGUF key."""
    folder = copy_model(tiny_model_factory("gemma2"), tmp_path_factory.mktemp("gemma2"))
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "query_pre_attn_scalar": raw["head_dim"]}))
    return folder


def test_a_gemma2_gguf_computes_what_its_safetensors_original_does(original: Path, tmp_path: Path) -> None:
    ours = GGUFWeights(write_gemma2_gguf(original, tmp_path / "gemma2.gguf"))
    reference = SafetensorsWeights(original)
    expected_config = ModelConfig.from_hf(reference.config)
    config = ModelConfig.from_hf(ours.config)
    assert config.family == "gemma2" and (config.attn_logit_softcapping, config.final_logit_softcapping) == (5.0, 1.0)
    ignored = {"rms_norm_eps": 0.0, "max_position_embeddings": 0, "eos_token_ids": (), "bos_token_id": None}
    assert dataclasses.replace(config, **ignored) == dataclasses.replace(expected_config, **ignored)
    assert sorted(ours.names()) == sorted(reference.names())
    loaded, expected = ours.load(ours.names(), torch.float32), reference.load(reference.names(), torch.float32)
    for name, tensor in expected.items():  # norms back to HF's zero-centred weights, to float32 rounding
        torch.testing.assert_close(loaded[name], tensor, atol=1e-7, rtol=0, msg=name)
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))  # past the window
    torch.testing.assert_close(logits(ours, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_what_llama_cpp_leaves_out_takes_its_values(original: Path, tmp_path: Path) -> None:
    """No caps nor window in the file: llama.cpp's 50, 30 and 4096, on every other layer from layer 0."""
    config = ModelConfig.from_hf(
        GGUFWeights(write_gemma2_gguf(original, tmp_path / "plain.gguf", with_metadata=False)).config
    )
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    assert [config.window_of(layer) for layer in range(config.n_layers)] == [4096, None, 4096]
    assert config.attention_scale == config.head_dim**-0.5 and config.rope.theta == 10000.0


def test_the_27b_scales_attention_by_hidden_over_heads() -> None:
    """llama.cpp's rule (after gemma_pytorch): 46 layers is Gemma 2's 27B, whose heads (128) are narrower than
    4608 / 32; its HF config says so in query_pre_attn_scalar (144)."""
    sizes = {"num_hidden_layers": 46, "hidden_size": 4608, "num_attention_heads": 32, "head_dim": 128}
    fields = gguf_gemma.gemma2_fields(lambda key, default=None: default, sizes)
    assert fields["query_pre_attn_scalar"] == 144
    other = gguf_gemma.gemma2_fields(lambda key, default=None: default, {**sizes, "num_hidden_layers": 42})
    assert other["query_pre_attn_scalar"] == 128
