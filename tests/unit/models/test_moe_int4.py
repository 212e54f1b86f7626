"""A GGUF's 4-bit experts (Q4_0, Q4_1; Q4_K alike, see gguf_int4) stay 4-bit in bfloat16 on a CPU: one Int4Linear
per expert and projection, counted by placement at their packed size, sent to workers as q4_weight/q4_scales, and
computing what the same file's dequantized experts compute."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch

from cake_py.cluster.master import layer_bytes
from cake_py.models.config import ModelConfig
from cake_py.models.gguf import GGUFWeights
from cake_py.models.hub import ModelSource
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.moe import SparseMoE
from cake_py.models.quant import Int4Linear, dequantize
from cake_py.models.weights import (
    build_transformer,
    load_stage_tensors,
    load_transformer,
    loaded_sizes,
    stage_tensor_names,
)
from tests.fixtures.gguf_files import write_file
from tests.fixtures.q4_k import quantize_q4_k
from tests.unit.models.test_gguf_moe import logits_of, write_moe_gguf

Q4 = {"Q4_0": gguf.GGMLQuantizationType.Q4_0, "Q4_1": gguf.GGMLQuantizationType.Q4_1}


def _bf16_model(source: GGUFWeights) -> tuple[ModelConfig, torch.nn.Module]:
    config = ModelConfig.from_hf(source.config)
    model = load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.bfloat16
    )
    return config, model


@pytest.mark.parametrize("qtype", list(Q4))
def test_4_bit_experts_stay_int4_and_each_computes_its_dequantized_weights(
    qtype: str, tiny_model_factory: Any, tmp_path: Path
) -> None:
    """Every expert of every sparse layer is an Int4Linear (no dense 3D weight), and each one's gated MLP at 1, 20
    (the kernel) and 100 rows (unpacked for one dense matmul) is the float32 product of gguf's own dequantization."""
    source = GGUFWeights(write_moe_gguf(tiny_model_factory("mixtral"), tmp_path / "q4.gguf", Q4[qtype]))
    config, model = _bf16_model(source)
    generator = torch.Generator().manual_seed(7)
    for index, layer in enumerate(model.layers):
        moe = layer.feed_forward
        assert isinstance(moe, SparseMoE) and not hasattr(moe, "w13") and not hasattr(moe, "w2")
        assert moe.w13_q4 is not None and moe.w2_q4 is not None
        assert all(isinstance(m, Int4Linear) for m in (*moe.w13_q4, *moe.w2_q4))
        assert moe.w13_q4[0].unpacks  # 320 rows, whole blocks of 64: the 100-row case takes the dense matmul
        hf = f"model.layers.{index}.mlp.experts."
        names = [f"{hf}{p}_proj.weight" for p in ("gate", "up", "down")]
        gate_w, up_w, down_w = source.load(names, torch.float32).values()
        for expert in range(moe.moe.n_experts):
            for rows in (1, 20, 100):
                x = torch.randn(rows, config.hidden_size, generator=generator).to(torch.bfloat16)
                with torch.inference_mode():
                    ours = moe._expert(expert, x).float()
                xf = x.float()
                expected = (torch.nn.functional.silu(xf @ gate_w[expert].t()) * (xf @ up_w[expert].t())) @ down_w[
                    expert
                ].t()
                torch.testing.assert_close(ours, expected, rtol=0, atol=0.03 * float(expected.abs().max()))


def test_4_bit_experts_are_sized_and_sent_as_4_bit(tiny_model_factory: Any, tmp_path: Path) -> None:
    """Placement counts a Q4_0 expert tensor at half a byte per value plus its groups' bf16 scale and zero, a stage's
    tensors carry it as q4_weight (E, N, K) / q4_scales (E, K/32, N, 2), and the built layers hold those bytes."""
    source = GGUFWeights(
        write_moe_gguf(tiny_model_factory("mixtral"), tmp_path / "q4.gguf", gguf.GGMLQuantizationType.Q4_0)
    )
    name = "model.layers.1.mlp.experts.down_proj.weight"
    n_experts, rows, columns = source.info(name).shape
    elements = math.prod((n_experts, rows, columns))
    assert dict(loaded_sizes(source, torch.bfloat16, "cpu"))[name] == elements // 2 + elements // 32 * 4
    tensors = load_stage_tensors(source, [name], torch.bfloat16)
    prefix = name.removesuffix(".weight")
    assert {k: tuple(t.shape) for k, t in tensors.items()} == {
        f"{prefix}.q4_weight": (n_experts, rows, columns),
        f"{prefix}.q4_scales": (n_experts, columns // 32, rows, 2),
    }
    _, model = _bf16_model(source)
    placement = layer_bytes(ModelSource("mixtral", source), torch.bfloat16, "cpu")
    assert [sum(t.nbytes for t in (*layer.parameters(), *layer.buffers())) for layer in model.layers] == placement


@pytest.mark.parametrize(("kind", "qtype"), [("mixtral", "Q4_0"), ("mixtral", "Q4_1"), ("qwen3_moe", "Q4_0")])
def test_a_4_bit_moe_gguf_gives_its_dequantized_logits(
    kind: str, qtype: str, tiny_model_factory: Any, tmp_path: Path
) -> None:
    """The whole model in bfloat16 on the int4 experts against the same file dequantized in float32: close to bf16
    tolerance (the tiny Qwen3-MoE's 48-wide down experts stay float beside its 4-bit gate/up)."""
    source = GGUFWeights(write_moe_gguf(tiny_model_factory(kind), tmp_path / "q4.gguf", Q4[qtype]))
    config, model = _bf16_model(source)
    assert any(isinstance(m, Int4Linear) for m in model.modules())
    ids = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(5))
    expected = logits_of(source, ids)  # float32: every expert dequantized by gguf
    with torch.inference_mode():
        hidden = model.forward_layers(model.embed(ids), [SequenceSlice(0, 0, len(ids))], model.new_kv_store())
        logits = model.head(hidden).float()
    # bf16's own rounding (activations, attention) is most of the gap: the tiny Mixtral with its Q4_1 experts
    # dequantized to dense bf16 was 0.048 of the largest logit off, on int4 0.057.
    tolerance = 0.08 * expected.abs().max().item()
    assert torch.allclose(logits, expected, rtol=0, atol=tolerance)
    picked = expected.gather(-1, logits.argmax(-1, keepdim=True))[:, 0]  # the best token, or a near-tie of it
    assert (picked >= expected.max(-1).values - tolerance).all()


@pytest.mark.parametrize(
    ("types", "forms"),
    [
        ({"ffn_down_exps": "Q8_0"}, ("q4", "q8")),  # a Q4_K_M file's gate/up 4-bit, down in another type
        ({"ffn_up_exps": "Q8_0"}, ("q8", "q4")),  # gate 4-bit beside an int8 up: both int8 rows
    ],
)
def test_experts_whose_projections_mix_types_keep_each_form(
    types: dict[str, str], forms: tuple[str, str], tiny_model_factory: Any, tmp_path: Path
) -> None:
    """Gate ‖ up is 4-bit only when both are; otherwise int8 rows (a 4-bit part requantized), and down on its own."""
    qtypes = {name: gguf.GGMLQuantizationType[qtype] for name, qtype in types.items()}
    path = write_moe_gguf(tiny_model_factory("mixtral"), tmp_path / "mixed.gguf", Q4["Q4_0"], qtypes)
    source = GGUFWeights(path)
    config, model = _bf16_model(source)
    for layer in model.layers:
        moe = layer.feed_forward
        assert isinstance(moe, SparseMoE)
        for name, form in zip(("w13", "w2"), forms, strict=True):
            assert (getattr(moe, f"{name}_q4") is not None) == (form == "q4")
            assert (getattr(moe, f"{name}_q8") is not None) == (form == "q8")
    ids = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(5))
    expected = logits_of(source, ids)
    with torch.inference_mode():
        hidden = model.forward_layers(model.embed(ids), [SequenceSlice(0, 0, len(ids))], model.new_kv_store())
        logits = model.head(hidden).float()
    assert torch.allclose(logits, expected, rtol=0, atol=0.08 * expected.abs().max().item())


def test_3d_q4_k_experts_load_as_each_experts_groups(tmp_path: Path) -> None:
    """A 3D Q4_K expert tensor's values and groups, expert by expert, are exactly gguf-py's dequantization."""
    weights = torch.randn(3, 8, 512, generator=torch.Generator().manual_seed(3)).numpy()
    path = tmp_path / "experts.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(512)
    writer.add_feed_forward_length(8)
    writer.add_head_count(4)
    blocks = quantize_q4_k(weights.reshape(24, 512)).reshape(3, 8, -1)
    writer.add_tensor("blk.0.ffn_up_exps.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    write_file(writer)
    source = GGUFWeights(path)
    name = "model.layers.0.mlp.experts.up_proj.weight"
    assert source.int4_names() == {name}
    q, scales = source.load_int4(name)
    assert q.shape == (3, 8, 512) and scales.shape == (3, 512 // 32, 8, 2)
    expected = source.load([name], torch.float32)[name]  # gguf.quants.dequantize
    assert torch.allclose(dequantize(q, scales), expected, rtol=0, atol=1e-6 * expected.abs().max().item())


def test_4_bit_experts_are_dequantized_where_the_int4_kernel_does_not_run(
    tiny_model_factory: Any, tmp_path: Path
) -> None:
    """A stage's 4-bit experts built where torch's int4 kernel does not run (float32 here; a GPU alike) become dense
    3D weights, the same as gguf's own dequantization: the float32 logits are the dequantized file's."""
    source = GGUFWeights(
        write_moe_gguf(tiny_model_factory("mixtral"), tmp_path / "q4.gguf", gguf.GGMLQuantizationType.Q4_1)
    )
    config = ModelConfig.from_hf(source.config)
    names = stage_tensor_names(source, config, 0, config.n_layers, with_embedding=True, with_head=True)
    experts = [name for name in names if ".experts." in name]
    tensors = load_stage_tensors(source, experts, torch.bfloat16)  # as a bf16 stage is sent them: 4-bit
    assert len(tensors) == 2 * len(experts) and all(".q4_" in name for name in tensors)
    tensors |= source.load([name for name in names if name not in experts], torch.float32)
    model = build_transformer(
        config, tensors, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    moe = model.layers[0].feed_forward
    assert isinstance(moe, SparseMoE) and moe.w13_q4 is None and moe.w13.dtype == torch.float32
    ids = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        hidden = model.forward_layers(model.embed(ids), [SequenceSlice(0, 0, len(ids))], model.new_kv_store())
        logits = model.head(hidden)
    torch.testing.assert_close(logits, logits_of(source, ids), rtol=0, atol=1e-4)
