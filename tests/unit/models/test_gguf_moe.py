"""Mixture-of-experts GGUFs: the tiny Mixtral, Qwen2-MoE and Qwen3-MoE converted the way llama.cpp's
convert_hf_to_gguf.py converts them (experts as 3D tensors per projection, Mixtral as a `llama` with expert_count,
q/k rows permuted for it) compute what their safetensors originals compute, in float32 and with Q8_0 experts
(int8 rows in bfloat16)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from cake_py.cluster.master import layer_bytes
from cake_py.models.config import ModelConfig
from cake_py.models.gguf import GGUFWeights
from cake_py.models.hub import ModelSource
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.moe import SparseMoE
from cake_py.models.quant import dequantize_rows_int8
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.weights import WeightSource, load_transformer
from tests.fixtures.gguf_files import LLAMA_NAMES, permute, write_file, write_tokenizer

ARCHITECTURES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# HF name (or its part within a block) → llama.cpp's (gguf's MODEL_TENSORS).
NAMES = {
    **LLAMA_NAMES,
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
}
EXPERT_NAMES = {
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
}


def _gguf_tensors(source: SafetensorsWeights, config: ModelConfig) -> dict[str, np.ndarray]:
    """Every tensor under its llama.cpp name, each layer's experts stacked into one 3D tensor per projection."""
    tensors: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, tensor in source.load(source.names(), torch.float32).items():
        array = tensor.numpy()
        if name in NAMES:
            tensors[NAMES[name]] = array
            continue
        _, _, layer, rest = name.split(".", 3)
        part = rest.removesuffix(".weight").removesuffix(".bias")
        if ".experts." in part:  # block_sparse_moe.experts.3.w1 / mlp.experts.3.gate_proj
            index, projection = part.split(".experts.")[1].split(".")
            experts.setdefault(f"blk.{layer}.{EXPERT_NAMES[projection]}.weight", {})[int(index)] = array
            continue
        if ARCHITECTURES[config.family] == "llama" and part == "self_attn.q_proj":
            array = permute(array, config.n_heads)
        elif ARCHITECTURES[config.family] == "llama" and part == "self_attn.k_proj":
            array = permute(array, config.n_kv_heads)
        elif part == "mlp.shared_expert_gate":
            array = array.reshape(-1)  # llama.cpp's is a vector
        tensors[f"blk.{layer}.{NAMES[part]}.{rest.rsplit('.', 1)[1]}"] = array
    for name, per_expert in experts.items():
        tensors[name] = np.stack([per_expert[index] for index in sorted(per_expert)])
    return tensors


def write_moe_gguf(
    folder: Path,
    path: Path,
    expert_type: gguf.GGMLQuantizationType,
    types: Mapping[str, gguf.GGMLQuantizationType] | None = None,
    expert_sizes: bool = True,
) -> Path:
    """The tiny model as llama.cpp converts it, its experts in `expert_type` or, per projection, `types`
    (`{"ffn_up_exps": Q8_0}`: a file whose projections mix types, as Q4_K_M files do); without `expert_sizes`, the
    expert widths are left out of the metadata, as the first Qwen2-MoE conversions left them."""
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    moe = config.moe
    assert moe is not None
    writer = gguf.GGUFWriter(path, ARCHITECTURES[config.family])
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
    writer.add_vocab_size(config.vocab_size)
    writer.add_expert_count(moe.n_experts)
    writer.add_expert_used_count(moe.top_k)
    if config.family != "mixtral" and expert_sizes:
        writer.add_expert_feed_forward_length(moe.expert_intermediate_size)
    if moe.shared_expert_intermediate_size is not None and expert_sizes:
        writer.add_expert_shared_feed_forward_length(moe.shared_expert_intermediate_size)
    write_tokenizer(writer, folder)
    for name, array in _gguf_tensors(source, config).items():
        # Quantized where a row holds whole blocks of 32 (the tiny Qwen3-MoE's gate and up experts).
        quantized = name.endswith("_exps.weight") and array.shape[-1] % 32 == 0
        chosen = (types or {}).get(name.split(".")[-2], expert_type)
        qtype = chosen if quantized else gguf.GGMLQuantizationType.F32
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    write_file(writer)
    return path


@torch.inference_mode()
def logits_of(source: WeightSource, ids: torch.Tensor) -> torch.Tensor:
    config = ModelConfig.from_hf(source.config)
    model = load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    return model.head(model.forward_layers(model.embed(ids), [SequenceSlice(0, 0, len(ids))], model.new_kv_store()))


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_a_moe_gguf_computes_what_its_hf_original_does(kind: str, tiny_model_factory: Any, tmp_path: Path) -> None:
    folder = tiny_model_factory(kind)
    path = write_moe_gguf(folder, tmp_path / f"{kind}.gguf", gguf.GGMLQuantizationType.F32)
    ours, original = GGUFWeights(path), SafetensorsWeights(folder)
    config, expected = ModelConfig.from_hf(ours.config), ModelConfig.from_hf(original.config)
    assert config.architecture == expected.architecture and config.moe == expected.moe
    # llama.cpp's metadata names no window, and ends a generation on <|endoftext|> (id 0) too.
    same = dataclasses.replace(config, rms_norm_eps=expected.rms_norm_eps, eos_token_ids=expected.eos_token_ids)
    assert same == dataclasses.replace(expected, sliding_window=None, windowed_layers=())
    ids = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits_of(ours, ids), logits_of(original, ids), rtol=0, atol=1e-4)


def test_expert_widths_missing_from_the_metadata_are_llama_cpps(tiny_model_factory: Any, tmp_path: Path) -> None:
    """Without `expert_feed_forward_length` llama.cpp sizes the experts feed_forward_length / expert_used_count, and
    without `expert_shared_feed_forward_length` the shared expert feed_forward_length (llama-model.cpp, qwen2moe and
    qwen3moe): transformers' defaults (1408 / 768 wide experts, a 5632 wide shared expert) were read instead, and
    such a file failed to load or loaded as another model."""
    folder = tiny_model_factory("qwen3_moe")  # feed_forward_length 96, 2 experts per token: 48 wide, as it has
    ours = GGUFWeights(
        write_moe_gguf(folder, tmp_path / "qwen3.gguf", gguf.GGMLQuantizationType.F32, expert_sizes=False)
    )
    assert ModelConfig.from_hf(ours.config).moe == ModelConfig.from_hf(SafetensorsWeights(folder).config).moe
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits_of(ours, ids), logits_of(SafetensorsWeights(folder), ids), rtol=0, atol=1e-4)
    path = write_moe_gguf(
        tiny_model_factory("qwen2_moe"), tmp_path / "qwen2.gguf", gguf.GGMLQuantizationType.F32, expert_sizes=False
    )
    moe = ModelConfig.from_hf(GGUFWeights(path).config).moe  # feed_forward_length 160, 2 experts per token
    assert moe is not None and (moe.expert_intermediate_size, moe.shared_expert_intermediate_size) == (80, 160)


def test_quantized_experts_are_dequantized(tiny_model_factory: Any, tmp_path: Path) -> None:
    """Q8_0 expert tensors (3D) load dequantized and compute close to the original."""
    folder = tiny_model_factory("qwen3_moe")
    path = write_moe_gguf(folder, tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    ours = GGUFWeights(path)
    assert ours.info("model.layers.0.mlp.experts.gate_proj.weight").dtype == "Q8_0"
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(5))
    quantized, original = logits_of(ours, ids), logits_of(SafetensorsWeights(folder), ids)
    assert not torch.equal(quantized, original)
    torch.testing.assert_close(quantized, original, rtol=0, atol=0.02 * float(original.abs().max()))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_quantized_experts_stay_int8_rows_in_bfloat16(kind: str, tiny_model_factory: Any, tmp_path: Path) -> None:
    """With 16-bit compute on a CPU, Q8_0 experts run as int8 rows (torch's int8 kernel for a decode step, cast to
    bf16 for an expert given 16 rows or more), as placement counted them: a quarter of float32's bytes, not bf16's
    half. The tiny Qwen3-MoE's down experts (rows of 48, no whole Q8_0 block) stay float and run dense beside its
    int8 gate/up."""
    folder = tiny_model_factory(kind)
    source = GGUFWeights(write_moe_gguf(folder, tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0))
    config = ModelConfig.from_hf(source.config)
    model = load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.bfloat16
    )
    layers = [layer for layer in model.layers if isinstance(layer.feed_forward, SparseMoE)]
    for layer in layers:
        moe = layer.feed_forward
        assert moe.w13_q8 is not None and moe.w13_q8.dtype == torch.int8 and not hasattr(moe, "w13")
        assert (moe.w2_q8 is not None) == (kind == "mixtral") and hasattr(moe, "w2") == (kind != "mixtral")
    placement = layer_bytes(ModelSource(kind, source), torch.bfloat16, "cpu")
    assert [sum(t.nbytes for t in (*layer.parameters(), *layer.buffers())) for layer in model.layers] == placement
    generator = torch.Generator().manual_seed(6)
    for layer in layers:
        moe = layer.feed_forward
        for n_tokens in (1, 20, 100):  # the int8 kernel below INT8_DENSE_ROWS (16) rows an expert, a cast from them
            x = torch.randn(n_tokens, config.hidden_size, generator=generator).to(torch.bfloat16)
            with torch.inference_mode():
                weights, experts = moe.route(x)
                ours = moe._experts(x, weights, experts).float()
            # The same experts, weights dequantized from the int8 rows, computed in float32.
            w13 = dequantize_rows_int8(moe.w13_q8, moe.w13_scales.float()) if moe.w13_q8 is not None else None
            w2 = dequantize_rows_int8(moe.w2_q8, moe.w2_scales.float()) if moe.w2_q8 is not None else moe.w2.float()
            assert w13 is not None
            expected = torch.zeros(n_tokens, config.hidden_size)
            for token in range(n_tokens):
                for weight, expert in zip(weights[token].tolist(), experts[token].tolist(), strict=True):
                    gate, up = (w13[expert] @ x[token].float()).split(moe.moe.expert_intermediate_size)
                    expected[token] += weight * (w2[expert] @ (torch.nn.functional.silu(gate) * up))
            torch.testing.assert_close(ours, expected, rtol=0, atol=0.02 * float(expected.abs().max()))
