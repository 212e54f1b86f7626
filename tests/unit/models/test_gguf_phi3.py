"""Phi-3 GGUFs (`general.architecture = phi3`): the tiny Phi-3 converted the way llama.cpp's convert_hf_to_gguf.py
converts it (fused attn_qkv and ffn_up, rope.dimension_count for the partial rotation, LongRoPE as two factor
tensors with its original context and attention factor in the metadata) computes what its safetensors original
computes, within and past the original context."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from cake_py.models.config import ModelConfig
from cake_py.models.gguf import GGUFWeights
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.weights import WeightSource, load_transformer
from tests.fixtures.gguf_files import gguf_name, write_file, write_tokenizer
from tests.unit.models.test_parity import run

# HF name (or its part within a block) → llama.cpp's, for Phi-3 (gguf's MODEL_TENSORS[PHI3]).
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_phi3_gguf(folder: Path, path: Path, *, longrope: bool) -> Path:
    """The tiny Phi-3 as convert_hf_to_gguf.py's Phi3MiniModel writes it (without its LongRoPE: as a config with no
    rope_scaling, Phi-3-mini-4k's, is written)."""
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_vocab_size(config.vocab_size)
    write_tokenizer(writer, folder)
    rope = config.rope
    if longrope:
        original = rope.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = config.max_position_embeddings / original  # as the converter computes it
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        writer.add_tensor("rope_factors_long.weight", np.array(rope.long_factor, dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope.short_factor, dtype=np.float32))
    for name, tensor in source.load(source.names(), torch.float32).items():
        writer.add_tensor(gguf_name(name, GGUF_NAMES), tensor.numpy())
    write_file(writer)
    return path


def logits_of(source: WeightSource, ids: torch.Tensor) -> torch.Tensor:
    config = ModelConfig.from_hf(source.config)
    model = load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    (logits,) = run(model, model.new_kv_store(), [(0, 0, ids)])
    return logits


@pytest.mark.parametrize("length", [20, 80], ids=["within", "past"])
@torch.inference_mode()
def test_a_phi3_gguf_computes_what_its_safetensors_original_does(
    length: int, tiny_model_factory: Any, tmp_path: Path
) -> None:
    folder = tiny_model_factory("phi3")
    weights = GGUFWeights(write_phi3_gguf(folder, tmp_path / "phi3.gguf", longrope=True))
    ours, original = ModelConfig.from_hf(weights.config), ModelConfig.from_hf(SafetensorsWeights(folder).config)
    assert (ours.family, ours.rotary_dim, ours.rope.kind) == ("phi3", original.rotary_dim, "longrope")
    rope, expected = ours.rope, original.rope  # the same, up to what float32 metadata and tensors hold
    assert rope.original_max_position_embeddings == expected.original_max_position_embeddings
    assert rope.attention_factor == pytest.approx(expected.attention_factor, rel=1e-6)
    assert rope.short_factor == pytest.approx(expected.short_factor, rel=1e-6)
    assert rope.long_factor == pytest.approx(expected.long_factor, rel=1e-6)
    ids = torch.randint(3, 384, (length,), generator=torch.Generator().manual_seed(length))
    torch.testing.assert_close(logits_of(weights, ids), logits_of(SafetensorsWeights(folder), ids))


def test_a_phi3_gguf_without_rope_factors_rotates_plainly(tiny_model_factory: Any, tmp_path: Path) -> None:
    """Phi-3-mini-4k has no rope_scaling: its GGUF has no factor tensors, and its rope is the plain one."""
    weights = GGUFWeights(write_phi3_gguf(tiny_model_factory("phi3"), tmp_path / "phi3.gguf", longrope=False))
    config = ModelConfig.from_hf(weights.config)
    assert (config.rope.kind, config.rope.attention_factor, config.rotary_dim) == ("default", 1.0, 12)


@pytest.mark.parametrize(("rotary", "head_dim"), [(96, 128), (30, 44), (62, 78)])  # 30 / 44 * 44 is 29.999...
def test_the_rotated_share_gives_back_the_gguf_dimension_count(rotary: int, head_dim: int) -> None:
    from cake_py.models.gguf_phi3 import phi3_fields

    metadata = {"rope.dimension_count": rotary}
    share = phi3_fields(lambda key, default=None: metadata.get(key, default), {"head_dim": head_dim}, None, None)
    assert int(head_dim * share["partial_rotary_factor"]) == rotary
