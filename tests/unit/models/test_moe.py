"""Mixture-of-experts decoders beyond parity (test_parity.py runs the tiny MoE kinds against transformers): the
fixtures exercise every expert, a decode step computes only its token's top-k experts, the three stored forms of
the experts load to the same model, placement counts every expert's bytes, and malformed MoE fields are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cake_py.cluster.master import layer_bytes
from cake_py.errors import ModelError
from cake_py.models import graphs
from cake_py.models.config import ModelConfig
from cake_py.models.hub import ModelSource
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.moe import MoeTransformer, SparseMoE
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.weights import load_transformer

MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe")
# Which layers of each tiny kind are sparse (tests/fixtures/tiny_models.py).
SPARSE_LAYERS = {"mixtral": (True, True, True), "qwen2_moe": (False, True, False), "qwen3_moe": (True, False, True)}


def load_whole(folder: Path) -> MoeTransformer:
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    model = load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    assert isinstance(model, MoeTransformer)
    return model


def sparse_layers(model: MoeTransformer) -> list[SparseMoE]:
    return [layer.feed_forward for layer in model.layers if isinstance(layer.feed_forward, SparseMoE)]


def prompt_ids(model: MoeTransformer, n: int = 24) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(3))


@torch.inference_mode()
def logits_of(model: MoeTransformer, ids: torch.Tensor) -> torch.Tensor:
    hidden = model.forward_layers(model.embed(ids), [SequenceSlice(0, 0, len(ids))], model.new_kv_store())
    return model.head(hidden)


@pytest.mark.parametrize("kind", MOE_KINDS)
@torch.inference_mode()
def test_the_fixture_routes_to_every_expert_of_its_sparse_layers(kind: str, tiny_model_factory) -> None:
    model = load_whole(tiny_model_factory(kind))
    moe = model.config.moe
    assert moe is not None and moe.sparse_layers == SPARSE_LAYERS[kind]
    assert moe.norm_topk_prob == (kind != "qwen2_moe") and moe.float32_routing_weights == (kind == "mixtral")
    assert (moe.shared_expert_intermediate_size is not None) == (kind == "qwen2_moe")
    routed: list[torch.Tensor] = []
    for layer in sparse_layers(model):
        layer.register_forward_hook(lambda module, inputs, _: routed.append(module.route(inputs[0])[1]))
    logits_of(model, prompt_ids(model))
    assert len(routed) == sum(SPARSE_LAYERS[kind])
    for experts in routed:  # every expert matters to the logits: a wrong one would show
        assert set(experts.flatten().tolist()) == set(range(moe.n_experts))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@torch.inference_mode()
def test_a_token_computes_only_its_top_k_experts(
    kind: str, tiny_model_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode step runs its token's k experts, and a prefill each picked expert once over its tokens: never every
    expert for every token."""
    model = load_whole(tiny_model_factory(kind))
    moe = sparse_layers(model)[0]
    calls: list[tuple[int, int]] = []  # (expert, tokens it ran over)
    original = SparseMoE._expert

    def counting(self: SparseMoE, expert: int, x: torch.Tensor) -> torch.Tensor:
        calls.append((expert, x.shape[0]))
        return original(self, expert, x)

    monkeypatch.setattr(SparseMoE, "_expert", counting)
    x = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    out = moe(x)
    _, chosen = moe.route(x)
    assert sorted(expert for expert, _ in calls) == sorted(chosen[0].tolist())
    assert len(calls) == moe.moe.top_k < moe.moe.n_experts and all(n == 1 for _, n in calls)
    # The sum of the chosen experts' weighted outputs, computed one by one here.
    weights, experts = moe.route(x)
    expected = sum(w * original(moe, int(e), x) for w, e in zip(weights[0], experts[0], strict=True))
    torch.testing.assert_close(out, expected)

    calls.clear()
    tokens = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    batched = moe(tokens)
    one_by_one = torch.cat([moe(token[None]) for token in tokens])
    prefill_calls = calls[: len(calls) - 40 * moe.moe.top_k]
    assert len({expert for expert, _ in prefill_calls}) == len(prefill_calls)  # each expert at most once
    assert sum(n for _, n in prefill_calls) == 40 * moe.moe.top_k  # k (token, expert) pairs per token
    torch.testing.assert_close(batched, one_by_one)
    assert moe(tokens[:0]).shape == (0, model.config.hidden_size)  # no tokens: nothing to route, no error


@pytest.mark.parametrize("kind", MOE_KINDS)
@torch.inference_mode()
def test_a_sparse_layer_in_bfloat16_equals_transformers_to_the_last_bit(kind: str, tiny_model_factory) -> None:
    """transformers' default experts sum a token's k weighted outputs in float32 (Mixtral's weights stay float32
    too): adding them in bfloat16, expert by expert, differed in the last bit, and flipped greedy near-ties."""
    transformers = pytest.importorskip("transformers")
    folder = tiny_model_factory(kind)
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    ours = load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.bfloat16
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    x = torch.randn(40, config.hidden_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    sparse = [index for index, layer in enumerate(ours.layers) if isinstance(layer.feed_forward, SparseMoE)]
    assert sparse
    for index in sparse:
        expected = reference.model.layers[index].mlp(x[None])[0]
        assert torch.equal(ours.layers[index].feed_forward(x), expected)  # a prefill
        assert torch.equal(ours.layers[index].feed_forward(x[:1]), expected[:1])  # a decode step


def test_moe_models_decode_eagerly_never_as_cuda_graphs(tiny_model_factory) -> None:
    """Which experts a step runs is read back from the device: a recorded graph would replay the recorded step's."""
    assert graphs.enabled()
    assert load_whole(tiny_model_factory("mixtral")).cuda_graphs is False


def _fuse_experts(folder: Path, destination: Path, *, per_projection: bool) -> Path:
    """A copy of the Qwen3-MoE tiny model whose experts are 3D tensors: transformers' in-memory layout
    (`experts.gate_up_proj`, `experts.down_proj`), or llama.cpp's one per projection (`experts.gate_proj.weight`, …)."""
    copy = Path(shutil.copytree(folder, destination / "fused"))
    tensors = load_file(copy / "model.safetensors")
    config = ModelConfig.from_hf(json.loads((copy / "config.json").read_text()))
    assert config.moe is not None
    for layer in range(config.n_layers):
        experts = f"model.layers.{layer}.mlp.experts."
        if not config.moe.is_sparse(layer):
            continue
        parts = {
            projection: torch.stack(
                [tensors.pop(f"{experts}{e}.{projection}.weight") for e in range(config.moe.n_experts)]
            )
            for projection in ("gate_proj", "up_proj", "down_proj")
        }
        if per_projection:
            tensors.update({f"{experts}{name}.weight": stacked for name, stacked in parts.items()})
        else:
            tensors[experts + "gate_up_proj"] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=1)
            tensors[experts + "down_proj"] = parts["down_proj"]
    save_file(tensors, copy / "model.safetensors")
    return copy


@pytest.mark.parametrize("per_projection", [False, True])
def test_experts_stored_as_3d_tensors_load_to_the_same_model(
    per_projection: bool, tiny_model_factory, tmp_path: Path
) -> None:
    folder = tiny_model_factory("qwen3_moe")
    fused = _fuse_experts(folder, tmp_path, per_projection=per_projection)
    assert not any(".experts.0." in name for name in SafetensorsWeights(fused).names())
    per_expert, from_3d = load_whole(folder), load_whole(fused)
    ids = prompt_ids(per_expert)
    assert torch.equal(logits_of(from_3d, ids), logits_of(per_expert, ids))


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_placement_counts_every_expert(kind: str, tiny_model_factory) -> None:
    """Automatic placement's per-layer bytes hold all n_experts experts of a sparse layer, not k, nor a dense MLP."""
    source = ModelSource(kind, SafetensorsWeights(tiny_model_factory(kind)))
    config, moe = source.config, source.config.moe
    assert moe is not None
    attention = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim * config.hidden_size
    attention += config.n_heads * config.head_dim * config.hidden_size  # o_proj
    if config.qkv_bias:
        attention += (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    if config.qk_norm:
        attention += 2 * config.head_dim
    norms = 2 * config.hidden_size
    experts = moe.n_experts * 3 * config.hidden_size * moe.expert_intermediate_size + moe.n_experts * config.hidden_size
    if moe.shared_expert_intermediate_size is not None:
        experts += 3 * config.hidden_size * moe.shared_expert_intermediate_size + config.hidden_size
    dense = 3 * config.hidden_size * config.intermediate_size
    expected = [4 * (attention + norms + (experts if sparse else dense)) for sparse in moe.sparse_layers]
    assert layer_bytes(source, torch.float32) == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok must be from 1 to num_local_experts (8), got 9"),
        ({"num_local_experts": 0}, "num_local_experts must be from 1 to 4096, got 0"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be positive, got 0"),
        ({"mlp_only_layers": "1"}, "mlp_only_layers must be a list of layer indices, got '1'"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false, got 'yes'"),
        ({"moe_intermediate_size": -1}, "moe_intermediate_size must be positive, got -1"),
    ],
)
def test_malformed_moe_fields_are_refused_by_name(changes: dict[str, object], message: str, tiny_model_factory) -> None:
    raw = json.loads((tiny_model_factory("qwen3_moe") / "config.json").read_text())
    with pytest.raises(ModelError, match="config.json has a malformed field") as error:
        ModelConfig.from_hf({**raw, **changes})
    assert message in str(error.value)


def test_mixtral_layers_are_all_sparse_and_unwindowed_by_default() -> None:
    """Mixtral's config leaves the window out (none, as transformers' MixtralConfig) and every layer sparse."""
    raw = {
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    }
    config = ModelConfig.from_hf(raw)
    assert config.sliding_window is None and config.moe is not None
    assert (config.moe.n_experts, config.moe.top_k, config.moe.expert_intermediate_size) == (8, 2, 14336)
    assert all(config.moe.sparse_layers) and len(config.moe.sparse_layers) == 32


@pytest.mark.parametrize("max_window_layers", [3, 28])
def test_qwen2_moe_windows_the_layers_transformers_windows(max_window_layers: int) -> None:
    """Qwen2MoeConfig windows every other layer below max_window_layers (not Qwen2's layers from it on)."""
    transformers = pytest.importorskip("transformers")
    raw = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "use_sliding_window": True,
        "sliding_window": 8,
        "max_window_layers": max_window_layers,
    }
    reference = transformers.Qwen2MoeConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    config = ModelConfig.from_hf(raw)
    assert config.sliding_window == reference.sliding_window == 8
    expected = [kind == "sliding_attention" for kind in reference.layer_types]
    assert [config.window_of(layer) is not None for layer in range(6)] == expected
