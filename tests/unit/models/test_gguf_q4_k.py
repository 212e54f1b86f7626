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
from cake_py.models.quant import Int4Linear, Int8Linear, SplitLinear, dequantize, quantize_rows_int8
from cake_py.models.weights import (
    build_transformer,
    load_stage_tensors,
    load_transformer,
    loaded_sizes,
    stage_tensor_names,
)
from cake_py.rpc.codec import decode_tensor, encode_tensor
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


@pytest.mark.parametrize(
    ("dense", "q8_0", "split"),
    [
        ((), (), {}),
        (("attn_v.weight",), (), {"attention.wqkv": "4d"}),  # q‖k int4, v dense (stored as F32)
        ((), ("attn_v.weight",), {"attention.wqkv": "48"}),  # a Q4_K_M file's Q6_K v, modelled by Q8_0: int8 rows
        ((), ("attn_k.weight", "ffn_gate.weight"), {"attention.wqkv": "484", "feed_forward.w13": "84"}),
        ((), ("ffn_down.weight",), {"feed_forward.w2": "8"}),  # a standalone projection: int8 rows alone
    ],
)
def test_q4_k_layers_run_on_the_int4_kernel_and_match_the_dense_model(
    dense: tuple[str, ...], q8_0: tuple[str, ...], split: dict[str, str], tmp_path: Path
) -> None:
    """In bf16 on the CPU every Q4_K projection runs on the int4 kernel, every Q8_0 one on int8 rows: a fused one
    whose parts mix types (Q4_K, Q8_0, F32) as a SplitLinear of int4, int8 and dense pieces ("4d": q‖k int4, v
    dense; "48": v int8 rows), and the logits are the float32 dequantized model's to bf16 tolerance."""
    source = GGUFWeights(write_random_llama(tmp_path / "q4k.gguf", dense=dense, q8_0=q8_0))
    logits, model = _logits(source, torch.bfloat16)
    expected, reference = _logits(source, torch.float32)
    assert not any(isinstance(m, Int4Linear | Int8Linear | SplitLinear) for m in reference.modules())  # exact
    int4, kinds = set(), {}
    for i in range(2):
        for part in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
            module, path = model.get_submodule(f"layers.{i}.{part}"), f"layers.{i}.{part}"
            if isinstance(module, SplitLinear):
                kinds[part] = "".join(
                    "4" if isinstance(p, Int4Linear) else "8" if isinstance(p, Int8Linear) else "d"
                    for p in module.pieces
                )
                int4 |= {f"{path}.pieces.{j}" for j, p in enumerate(module.pieces) if isinstance(p, Int4Linear)}
            elif isinstance(module, Int4Linear):
                int4.add(path)
            elif isinstance(module, Int8Linear):
                kinds[part] = "8"
            else:
                kinds[part] = ""  # dense whole
    assert kinds == split
    assert int4 == {name for name, module in model.named_modules() if isinstance(module, Int4Linear)}
    tolerance = 0.05 * expected.abs().max().item()
    assert torch.allclose(logits, expected, rtol=0, atol=tolerance)
    # the token picked is the reference's best, or within the tolerance of it (random weights make near-ties)
    picked = expected.gather(-1, logits.argmax(-1, keepdim=True))[:, 0]
    assert (picked >= expected.max(-1).values - tolerance).all()


def test_a_split_projection_holds_its_4_bit_rows_packed_and_the_rest_as_int8_rows(tmp_path: Path) -> None:
    """q‖k stay packed 4-bit in the state dict, v's rows int8 (before, v was dense bf16, and before that all of
    q/k/v were)."""
    source = GGUFWeights(write_random_llama(tmp_path / "q4k.gguf", q8_0=("attn_v.weight",)))
    _, model = _logits(source, torch.bfloat16)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("layers.0.attention.wqkv.")}
    assert set(state) == {f"layers.0.attention.wqkv.pieces.0.{n}" for n in ("packed", "scales")} | {
        f"layers.0.attention.wqkv.pieces.1.{n}" for n in ("q", "scales")
    }
    assert state["layers.0.attention.wqkv.pieces.1.q"].shape == (2 * 64, 256)  # v: kv_heads * head_dim rows
    assert state["layers.0.attention.wqkv.pieces.1.q"].dtype == torch.int8
    assert model.get_submodule("layers.0.attention.wqkv.pieces.0").out_features == (4 + 2) * 64  # q‖k


def test_a_worker_given_a_split_projection_decodes_the_single_nodes_tokens(tmp_path: Path) -> None:
    """A worker holding the second layer and the head, built from the tensors the master streams (q4_weight/q4_scales
    and a Q8_0 v as q8_weight/q8_scales, through the wire codec), decodes the same greedy tokens as one node holding
    it all."""
    source = GGUFWeights(write_random_llama(tmp_path / "q4k.gguf", q8_0=("attn_v.weight", "ffn_down.weight")))
    config = ModelConfig.from_hf(source.config)
    whole = load_transformer(source, config, 0, 2, with_embedding=True, with_head=True, dtype=torch.bfloat16)
    master = load_transformer(source, config, 0, 1, with_embedding=True, with_head=False, dtype=torch.bfloat16)
    names = stage_tensor_names(source, config, 1, 2, with_embedding=False, with_head=True)
    sent = load_stage_tensors(source, names, torch.bfloat16)
    assert "model.layers.1.self_attn.q_proj.q4_weight" in sent and "model.layers.1.self_attn.v_proj.q8_weight" in sent
    received = {name: decode_tensor(encode_tensor(tensor)) for name, tensor in sent.items()}
    build_transformer(config, received, 1, 2, with_embedding=False, with_head=True, dtype=torch.bfloat16, device="meta")
    worker = build_transformer(config, received, 1, 2, with_embedding=False, with_head=True, dtype=torch.bfloat16)
    assert isinstance(worker.get_submodule("layers.0.attention.wqkv"), SplitLinear)

    def greedy(stages: list[torch.nn.Module]) -> list[int]:
        kvs, tokens = [stage.new_kv_store() for stage in stages], [5, 17, 3, 90]
        with torch.inference_mode():
            for step in range(8):
                ids = torch.tensor(tokens if step == 0 else tokens[-1:])
                hidden, batch = stages[0].embed(ids), [SequenceSlice(0, len(tokens) - len(ids), len(ids))]
                for stage, kv in zip(stages, kvs, strict=True):
                    hidden = stage.forward_layers(hidden, batch, kv)
                tokens.append(int(stages[-1].head(hidden)[-1].argmax()))
        return tokens

    assert greedy([master, worker]) == greedy([whole])


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


def test_q8_0_layer_weights_are_sized_and_sent_as_int8_rows(tmp_path: Path) -> None:
    """Placement counts a layer weight stored in another quantized type (Q8_0 here; Q6_K, Q5_K alike) at a byte per
    value plus a scale per row, and a worker is sent it as q8_weight/q8_scales; float32 still reads it dense."""
    source = GGUFWeights(write_random_llama(tmp_path / "q8.gguf", q8_0=("ffn_down.weight",)))
    name = "model.layers.1.mlp.down_proj.weight"
    rows, columns = source.info(name).shape
    assert dict(loaded_sizes(source, torch.bfloat16, "cpu"))[name] == rows * columns + rows * 2
    assert dict(loaded_sizes(source, torch.float32, "cpu"))[name] == rows * columns * 4
    tensors = load_stage_tensors(source, [name], torch.bfloat16)
    assert set(tensors) == {"model.layers.1.mlp.down_proj.q8_weight", "model.layers.1.mlp.down_proj.q8_scales"}
    assert tensors["model.layers.1.mlp.down_proj.q8_weight"].dtype == torch.int8
    dense = source.load([name], torch.float32)[name]
    back = (
        tensors["model.layers.1.mlp.down_proj.q8_weight"].float()
        * tensors["model.layers.1.mlp.down_proj.q8_scales"][:, None]
    )
    assert (back - dense).abs().max() <= dense.abs().amax(dim=1).max() / 254 + 1e-6  # half a step of the row's scale
    assert set(load_stage_tensors(source, [name], torch.float32)) == {name}


@pytest.mark.parametrize("v_rows", ["dense", "int8"])
def test_a_split_projection_splits_its_bias_by_rows(v_rows: str) -> None:
    """Qwen2's q/k/v bias goes with each piece's rows (v dense, or int8 rows): the split projection computes the
    dense one's output."""
    config = ModelConfig.from_hf(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": 16,
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        }
    )
    assert config.qkv_bias
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    prefix = "model.layers.0."
    for name, rows in [("self_attn.q_proj", 64), ("self_attn.k_proj", 32), ("mlp.gate_proj", 64), ("mlp.up_proj", 64)]:
        tensors[f"{prefix}{name}.q4_weight"] = torch.randint(0, 16, (rows, 64), dtype=torch.uint8, generator=generator)
        tensors[f"{prefix}{name}.q4_scales"] = torch.rand(2, rows, 2, generator=generator) * 0.1
    for name, shape in [("self_attn.v_proj.weight", (32, 64)), ("self_attn.o_proj.weight", (64, 64))]:
        tensors[prefix + name] = torch.randn(shape, generator=generator) * 0.1
    if v_rows == "int8":
        q8, scales8 = quantize_rows_int8(tensors.pop(prefix + "self_attn.v_proj.weight"))
        tensors[prefix + "self_attn.v_proj.q8_weight"], tensors[prefix + "self_attn.v_proj.q8_scales"] = q8, scales8
    tensors[prefix + "mlp.down_proj.weight"] = torch.randn(64, 64, generator=generator) * 0.1
    for name, rows in [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)]:
        tensors[f"{prefix}self_attn.{name}.bias"] = torch.randn(rows, generator=generator)
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        tensors[prefix + name] = torch.ones(64)
    models = {
        dtype: build_transformer(config, dict(tensors), 0, 1, with_embedding=False, with_head=False, dtype=dtype)
        for dtype in (torch.bfloat16, torch.float32)
    }
    split, dense = (models[dtype].get_submodule("layers.0.attention.wqkv") for dtype in models)
    assert isinstance(split, SplitLinear) and isinstance(dense, torch.nn.Linear)
    assert isinstance(split.pieces[1], Int8Linear if v_rows == "int8" else torch.nn.Linear)
    x = torch.randn(3, 64, generator=generator)
    expected = dense(x)
    assert torch.allclose(split(x.bfloat16()).float(), expected, rtol=0.02, atol=0.05 * expected.abs().max().item())
