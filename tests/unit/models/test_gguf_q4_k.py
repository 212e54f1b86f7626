"""GGUF Q4_K layer weights run on the int4 kernel as stored, computing what their exact dequantization computes."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import pytest
import torch

from cake_py.models.config import ModelConfig
from cake_py.models.gguf import GGUFWeights
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.quant import Int4Linear, dequantize
from cake_py.models.weights import load_stage_tensors, load_transformer, loaded_sizes
from tests.fixtures.q4_k import quantize_q4_k, write_random_llama


def test_the_q4_k_writer_agrees_with_gguf_and_rounds_to_half_a_step() -> None:
    weights = torch.randn(8, 512).numpy()
    blocks = quantize_q4_k(weights)
    assert blocks.shape == (8, 2 * 144)
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K).reshape(8, 512)
    # half a step of 1/15 of a group's range, plus the 6-bit rounding of its scale and min
    assert abs(back - weights).max() <= abs(weights).max() / 15


def test_q4_k_groups_equal_gguf_dequantization(tmp_path: Path) -> None:
    """Every layer weight's values and group scales (q/k rows un-permuted) are exactly gguf-py's dequantization."""
    source = GGUFWeights(write_random_llama(tmp_path / "q4k.gguf"))
    names = {n for n in source.names() if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    assert source.int4_names() == names
    for name in names:
        q, scales = source.load_int4(name)
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        assert scales.shape == (q.shape[1] // 32, q.shape[0], 2)
        expected = source.load([name], torch.float32)[name]  # gguf.quants.dequantize, rows un-permuted
        assert torch.allclose(dequantize(q, scales), expected, rtol=0, atol=1e-6 * expected.abs().max().item()), name


def _logits(source: GGUFWeights, dtype: torch.dtype) -> tuple[torch.Tensor, torch.nn.Module]:
    config = ModelConfig.from_hf(source.config)
    model = load_transformer(source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=dtype)
    ids = torch.tensor([5, 17, 3, 90, 41, 41, 8, 60])
    with torch.inference_mode():
        batch = [SequenceSlice(0, 0, len(ids))]
        return model.head(model.forward_layers(model.embed(ids), batch, model.new_kv_store())).float(), model


@pytest.mark.parametrize("dense", [(), ("attn_v.weight",)])
def test_q4_k_layers_run_on_the_int4_kernel_and_match_the_dense_model(dense: tuple[str, ...], tmp_path: Path) -> None:
    """In bf16 on the CPU the Q4_K projections are Int4Linear modules (a fused projection only when all its parts are
    Q4_K: an F32 v_proj leaves q/k/v dense) and the logits are the float32 dequantized model's to bf16 tolerance."""
    source = GGUFWeights(write_random_llama(tmp_path / "q4k.gguf", dense=dense))
    logits, model = _logits(source, torch.bfloat16)
    expected, _ = _logits(source, torch.float32)
    int4 = {name for name, module in model.named_modules() if isinstance(module, Int4Linear)}
    kept = {"attention.wo", "feed_forward.w13", "feed_forward.w2"} | (set() if dense else {"attention.wqkv"})
    assert int4 == {f"layers.{i}.{part}" for i in range(2) for part in kept}
    assert torch.allclose(logits, expected, rtol=0, atol=0.05 * expected.abs().max().item())
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


def test_q4_k_weights_are_sized_and_sent_as_4_bit(tmp_path: Path) -> None:
    """Placement counts a Q4_K weight at half a byte per value plus its groups' bf16 scale and zero, and a stage's
    tensors (what a worker is sent) carry it as q4_weight/q4_scales, not dense."""
    source = GGUFWeights(write_random_llama(tmp_path / "q4k.gguf"))
    name = "model.layers.1.mlp.down_proj.weight"
    sizes = dict(loaded_sizes(source, torch.bfloat16, "cpu"))
    elements = math.prod(source.info(name).shape)
    assert sizes[name] == elements // 2 + elements // 32 * 4
    tensors = load_stage_tensors(source, [name], torch.bfloat16)
    assert set(tensors) == {"model.layers.1.mlp.down_proj.q4_weight", "model.layers.1.mlp.down_proj.q4_scales"}
