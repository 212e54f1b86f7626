"""Gemma 3 GGUFs (`general.architecture = gemma3`): the tiny Gemma 3 converted the way llama.cpp's
convert_hf_to_gguf.py converts it (norm weights + 1, four norms per block under llama.cpp's names) computes what its
safetensors original computes, and the metadata llama.cpp leaves out takes llama.cpp's values."""

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
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.weights import WeightSource, load_transformer
from tests.fixtures.gguf_files import gguf_name, write_file
from tests.fixtures.tiny_models import copy_model

# HF name (or its part within a block) → llama.cpp's, for Gemma 3 (gguf's MODEL_TENSORS[GEMMA3]).
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gemma_gguf(folder: Path, path: Path, *, spelled_out: bool) -> Path:
    """The tiny Gemma 3 as convert_hf_to_gguf.py's Gemma3Model writes it; `spelled_out` adds the window pattern and
    local rope base (the converter leaves them out: llama.cpp fixes them for the architecture)."""
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(config.rope.factor)
    assert config.sliding_window is not None
    writer.add_sliding_window(config.sliding_window)
    if spelled_out:
        writer.add_sliding_window_pattern([config.window_of(layer) is not None for layer in range(config.n_layers)])
        writer.add_rope_freq_base_swa(config.rope_of(0).theta)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{added["content"]: added["id"] for added in spec["added_tokens"]}}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(sorted(vocab, key=vocab.__getitem__))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    for name, tensor in source.load(source.names(), torch.float32).items():
        if name.endswith("norm.weight"):
            tensor = tensor + 1  # Gemma3Model.modify_tensors: llama.cpp's norms multiply by the weight alone
        writer.add_tensor(gguf_name(name, GGUF_NAMES), tensor.numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    write_file(writer)
    return path


@pytest.fixture(scope="module")
def original(tiny_model_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma 3 with the attention scale llama.cpp computes (head_dim's): its own 24 has no GGUF key."""
    folder = copy_model(tiny_model_factory("gemma3"), tmp_path_factory.mktemp("gemma"))
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "query_pre_attn_scalar": raw["head_dim"]}))
    return folder


def logits(source: WeightSource, ids: torch.Tensor) -> torch.Tensor:
    """Prefill all but the last 4 tokens, then decode those one by one: (len(ids), vocab)."""
    config = ModelConfig.from_hf(source.config)
    model = load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    kv, steps = model.new_kv_store(), [(0, len(ids) - 4)] + [(p, p + 1) for p in range(len(ids) - 4, len(ids))]
    with torch.inference_mode():
        return torch.cat(
            [
                model.head(
                    model.forward_layers(model.embed(ids[start:end]), [SequenceSlice(0, start, end - start)], kv)
                )
                for start, end in steps
            ]
        )


def test_a_gemma3_gguf_computes_what_its_safetensors_original_does(original: Path, tmp_path: Path) -> None:
    ours = GGUFWeights(write_gemma_gguf(original, tmp_path / "gemma.gguf", spelled_out=True))
    reference = SafetensorsWeights(original)
    expected_config = ModelConfig.from_hf(reference.config)
    config = ModelConfig.from_hf(ours.config)
    assert config.family == "gemma3" and config.rms_norm_eps == pytest.approx(expected_config.rms_norm_eps)
    ignored = {"rms_norm_eps": 0.0, "max_position_embeddings": 0, "eos_token_ids": (), "bos_token_id": None}
    assert dataclasses.replace(config, **ignored) == dataclasses.replace(expected_config, **ignored)
    assert sorted(ours.names()) == sorted(reference.names())
    loaded, expected = ours.load(ours.names(), torch.float32), reference.load(reference.names(), torch.float32)
    for name, tensor in expected.items():  # norms back to HF's zero-centred weights, to float32 rounding
        torch.testing.assert_close(loaded[name], tensor, atol=1e-7, rtol=0, msg=name)
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))  # past the window
    torch.testing.assert_close(logits(ours, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_what_llama_cpp_leaves_out_takes_its_values(original: Path, tmp_path: Path) -> None:
    """As the converter writes it: no window pattern (five sliding layers of six: all three here) nor local rope
    base (10000), and the attention scale is head_dim's."""
    config = ModelConfig.from_hf(
        GGUFWeights(write_gemma_gguf(original, tmp_path / "plain.gguf", spelled_out=False)).config
    )
    assert [config.window_of(layer) for layer in range(config.n_layers)] == [16, 16, 16]
    assert config.rope_of(0).theta == gguf_gemma.LOCAL_ROPE_THETA and config.rope_of(0).kind == "default"
    assert config.attention_scale == config.head_dim**-0.5


def test_the_27b_scales_attention_by_hidden_over_heads() -> None:
    """llama.cpp's rule (after gemma_pytorch): 62 layers is the 27B, whose heads (128) are narrower than 5376 / 32."""
    metadata: dict[str, Any] = {"attention.sliding_window": 1024}
    sizes = {"num_hidden_layers": 62, "hidden_size": 5376, "num_attention_heads": 32, "head_dim": 128}
    fields = gguf_gemma.gemma3_fields(lambda key, default=None: metadata.get(key, default), sizes)
    assert fields["query_pre_attn_scalar"] == 168
    other = gguf_gemma.gemma3_fields(
        lambda key, default=None: metadata.get(key, default), {**sizes, "num_hidden_layers": 34}
    )
    assert other["query_pre_attn_scalar"] == 128


def test_a_softcapped_gguf_caps_its_logits_as_its_config_would() -> None:
    """The caps in the metadata become the config's, read as transformers reads a Gemma 3 config: the logits capped,
    the attention scores not (test_gemma.py)."""
    metadata = {"attention.sliding_window": 1024, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
    sizes = {"num_hidden_layers": 26, "hidden_size": 1152, "num_attention_heads": 4, "head_dim": 256}
    fields = gguf_gemma.gemma3_fields(lambda key, default=None: metadata.get(key, default), sizes)
    raw = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 256, "intermediate_size": 64, **sizes, **fields}
    config = ModelConfig.from_hf(raw)
    assert (config.final_logit_softcapping, config.attn_logit_softcapping) == (30.0, None)
