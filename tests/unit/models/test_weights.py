"""Loading weights from HF safetensors folders: sharding, layer ranges that read only their own tensors, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cake_py.errors import ModelError, UnsupportedArchitectureError, WeightsError
from cake_py.models.config import ModelConfig
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.weights import load_transformer, stage_tensor_names, to_module_state
from tests.fixtures.tiny_models import copy_model


def load_whole(folder: Path) -> torch.nn.Module:
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    return load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_sharded_model_equals_single_file(tiny_model_factory) -> None:
    single_folder, sharded_folder = tiny_model_factory("llama"), tiny_model_factory("llama", sharded=True)
    shards = sorted(sharded_folder.glob("model-*.safetensors"))
    assert (sharded_folder / "model.safetensors.index.json").is_file() and len(shards) > 2
    assert not (sharded_folder / "model.safetensors").exists()

    single, sharded = SafetensorsWeights(single_folder), SafetensorsWeights(sharded_folder)
    assert sorted(sharded.names()) == sorted(single.names())
    assert all(sharded.info(name) == single.info(name) for name in single.names())

    single_state, sharded_state = load_whole(single_folder).state_dict(), load_whole(sharded_folder).state_dict()
    assert single_state.keys() == sharded_state.keys()
    for name, tensor in single_state.items():
        assert torch.equal(sharded_state[name], tensor), name


def test_layer_range_reads_only_its_layer(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = SafetensorsWeights(tiny_llama)
    config = ModelConfig.from_hf(source.config)
    assert config.n_layers >= 3

    names = stage_tensor_names(source, config, 1, 2, with_embedding=False, with_head=False)
    assert names and all(name.startswith("model.layers.1.") for name in names)
    assert set(names) == {name for name in source.names() if name.startswith("model.layers.1.")}

    read: list[str] = []
    original_load = SafetensorsWeights.load

    def recording_load(self: SafetensorsWeights, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        names = list(names)
        read.extend(names)
        return original_load(self, names, dtype)

    monkeypatch.setattr(SafetensorsWeights, "load", recording_load)
    model = load_transformer(source, config, 1, 2, with_embedding=False, with_head=False, dtype=torch.float32)
    assert sorted(read) == sorted(names)

    assert model.embed_tokens is None and model.norm is None and model.lm_head is None
    assert len(model.layers) == 1 and (model.start, model.end) == (1, 2)
    parameters = dict(model.named_parameters())
    assert parameters and all(name.startswith("layers.0.") for name in parameters)
    # Our layer 0 is the model's layer 1, not layer 0 or 2.
    expected = source.load(
        ["model.layers.1.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight"], torch.float32
    )
    assert torch.equal(parameters["layers.0.attention.wo.weight"], expected["model.layers.1.self_attn.o_proj.weight"])
    assert not torch.equal(
        parameters["layers.0.attention.wo.weight"], expected["model.layers.0.self_attn.o_proj.weight"]
    )


def test_tied_head_reads_the_embedding(tiny_model_factory) -> None:
    source = SafetensorsWeights(tiny_model_factory("smollm"))
    config = ModelConfig.from_hf(source.config)
    names = stage_tensor_names(source, config, config.n_layers, config.n_layers, with_embedding=False, with_head=True)
    assert sorted(names) == ["model.embed_tokens.weight", "model.norm.weight"]
    model = load_transformer(
        source, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    assert model.lm_head is not None and model.embed_tokens is not None
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_unsupported_architecture_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    edit_config(folder, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    source = SafetensorsWeights(folder)
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM"):
        ModelConfig.from_hf(source.config)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ([1, 2], "JSON object"),
        ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}, "'num_attention_heads'"),
        ({"num_attention_heads": 0}, "num_attention_heads must be positive, got 0"),
        ({"num_attention_heads": "four"}, "malformed field"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads (3)"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be from 1 to 4096, got 0"),
        ({"num_hidden_layers": 1e12}, "num_hidden_layers must be from 1 to 4096, got 1000000000000.0"),
        ({"architectures": "LlamaForCausalLM"}, "architectures must be a list"),
        ({"eos_token_id": [2, None]}, "token ids must be integers, got None"),
        ({"hidden_size": float("inf")}, "malformed field: hidden_size must be a whole number, got inf"),
        ({"hidden_size": 2**62}, "hidden_size must be from 1 to 4194304, got 4611686018427387904"),
        ({"intermediate_size": 2**62}, "intermediate_size must be from 1 to 4194304"),
        ({"head_dim": 2**29}, "head_dim must be from 1 to 4194304, got 536870912"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be from 1 to 2147483648, got 0"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
        ({"rms_norm_eps": -1}, "rms_norm_eps must be a finite number ≥ 0, got -1.0"),
        ({"rope_parameters": {"rope_theta": 0}}, "rope_theta must be a finite number > 0, got 0.0"),
        ({"rope_freq_factors": [1.0]}, "1 rope frequency factors for a head_dim of 16 (it takes 8)"),
    ],
    ids=[
        "a-list",
        "missing-heads",
        "zero-heads",
        "text-heads",
        "gqa-mismatch",
        "no-layers",
        "1e12-layers",
        "arch-text",
        "eos-null",
        "infinite-width",
        "huge-width",
        "huge-intermediate",
        "huge-head",
        "no-context",
        "tie-text",
        "negative-eps",
        "zero-theta",
        "rope-factors",
    ],  # fmt: skip
)
def test_a_malformed_config_is_a_model_error_naming_the_field(
    tiny_llama: Path, tmp_path: Path, config: object, needle: str
) -> None:
    raw = config if not isinstance(config, dict) or "architectures" in config else None
    if raw is None:
        folder = copy_model(tiny_llama, tmp_path)
        edit_config(folder, **config)  # type: ignore[arg-type]
        raw = SafetensorsWeights(folder).config
    with pytest.raises(ModelError) as raised:
        ModelConfig.from_hf(raw)  # type: ignore[arg-type]
    assert needle in str(raised.value)


def test_projections_whose_parts_do_not_fit_together_are_named(tiny_llama: Path, tmp_path: Path) -> None:
    """A transposed k_proj made torch.cat raise before any shape was checked."""
    folder = copy_model(tiny_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight"
    tensors[key] = tensors[key].T.contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"do not fit together: .*k_proj \(64, 32\)"):
        load_whole(folder)


def test_a_build_from_shapes_alone_is_what_the_weights_build(tiny_llama: Path) -> None:
    """The model is first built on the meta device, from shapes alone (a worker checks its assignment so, a master
    a model it resolves): the fused projections come out as from the real tensors, dtype promotion included."""
    source = SafetensorsWeights(tiny_llama)
    config = ModelConfig.from_hf(source.config)
    tensors = source.load(source.names(), torch.float32)
    tensors["model.layers.1.self_attn.q_proj.weight"] = tensors["model.layers.1.self_attn.q_proj.weight"].half()
    shapes = {name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta") for name, tensor in tensors.items()}
    real = to_module_state(tensors, config, 0, config.n_layers, with_embedding=True, with_head=True)
    meta = to_module_state(shapes, config, 0, config.n_layers, with_embedding=True, with_head=True)
    assert {name: (t.shape, t.dtype) for name, t in meta.items()} == {
        name: (t.shape, t.dtype) for name, t in real.items()
    }
    assert all(tensor.is_meta for tensor in meta.values())


def test_building_a_model_from_shapes_does_not_import_torch_dynamo(tiny_llama: Path) -> None:
    """torch.cat's and nn.init's meta kernels are Python code whose first call imports torch._dynamo: a second and
    more added to each worker's first assignment and each master's model resolution."""
    code = (
        "import sys, torch\n"
        "from cake_py.models.config import ModelConfig\n"
        "from cake_py.models.safetensors_folder import SafetensorsWeights\n"
        "from cake_py.models.weights import build_transformer\n"
        "from pathlib import Path\n"
        "source = SafetensorsWeights(Path(sys.argv[1]))\n"
        "config = ModelConfig.from_hf(source.config)\n"
        "shapes = {n: torch.empty(source.info(n).shape, device='meta') for n in source.names()}\n"
        "for start, end, edges in ((0, config.n_layers, True), (1, 2, False)):\n"
        "    build_transformer(config, shapes, start, end, with_embedding=edges, with_head=edges,\n"
        "                      dtype=torch.float32, device='meta')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_llama)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    "rope_fields",
    [
        {"rope_scaling": {"rope_type": "proportional", "factor": 4.0}},
        {"rope_parameters": {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 4.0}},
    ],
    ids=["rope_scaling", "rope_parameters"],
)
def test_unsupported_rope_type_is_named(tiny_llama: Path, tmp_path: Path, rope_fields: dict[str, object]) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    edit_config(folder, **rope_fields)
    with pytest.raises(UnsupportedArchitectureError, match="proportional"):
        ModelConfig.from_hf(SafetensorsWeights(folder).config)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (
            {"quantization_config": {"quant_method": "fp8"}},
            "quantized checkpoint (quantization_config quant_method 'fp8')",
        ),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method 'gptq'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        # transformers 5 writes rope_parameters' "default" beside an older rope_scaling: the scaling is what counts.
        ({"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ],
    ids=["fp8", "gptq", "gelu", "dynamic-type"],
)
def test_a_checkpoint_the_layers_would_compute_wrongly_is_refused(
    tiny_llama: Path, tmp_path: Path, fields: dict[str, object], needle: str
) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    edit_config(folder, **fields)
    with pytest.raises(UnsupportedArchitectureError) as raised:
        ModelConfig.from_hf(SafetensorsWeights(folder).config)
    assert needle in str(raised.value)


def test_rope_scaling_type_is_read_beside_default_rope_parameters(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    edit_config(
        folder,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        rope_scaling={"type": "linear", "factor": 2.0},
    )
    rope = ModelConfig.from_hf(SafetensorsWeights(folder).config).rope
    assert (rope.kind, rope.factor) == ("linear", 2.0)
    edit_config(folder, hidden_act="silu", rope_scaling=None)
    assert ModelConfig.from_hf(SafetensorsWeights(folder).config).rope.kind == "default"


def test_llama3_rope_parameters_are_parsed(tiny_model_factory) -> None:
    rope = ModelConfig.from_hf(SafetensorsWeights(tiny_model_factory("llama3")).config).rope
    assert (rope.kind, rope.theta, rope.factor) == ("llama3", 500000.0, 8.0)
    assert (rope.low_freq_factor, rope.high_freq_factor, rope.original_max_position_embeddings) == (1.0, 4.0, 64)


def test_kv_store_releases_idle_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import torch

    from cake_py.models import kv_cache
    from cake_py.models.kv_cache import KVStore, SequenceSlice

    # The store's own clock, moved by hand: with real time a loaded machine could pause this thread for the 30 ms
    # between the second use and the check, and sequence 2 looked idle too.
    now = [100.0]
    monkeypatch.setattr(kv_cache, "time", SimpleNamespace(monotonic=lambda: now[0]))
    store = KVStore(2, 1, 4, torch.float32, torch.device("cpu"))
    store.for_batch([SequenceSlice(1, 0, 1), SequenceSlice(2, 0, 1)])
    now[0] += 0.05
    store.for_batch([SequenceSlice(2, 1, 1)])
    assert store.release_idle(0.03) == [1]
    assert store.sequence_ids() == [2]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # Qwen2 without layer_types: transformers' rule, the layers from max_window_layers on (default 28).
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, [None] * 3),
        (
            {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "max_window_layers": 2},
            [None, None, 8],
        ),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False}, [None] * 3),
        # layer_types, when given, decides.
        ({"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, [8, None, 8]),
        # Llama has no sliding window, whatever the config carries.
        ({"use_sliding_window": True}, [None] * 3),
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, [8] * 3),
    ],
    ids=["qwen-default", "qwen-from-2", "qwen-off", "layer-types", "llama", "mistral"],
)
def test_which_layers_use_the_sliding_window(
    tiny_llama: Path, tmp_path: Path, fields: dict[str, object], expected: list[int | None]
) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    edit_config(folder, sliding_window=8, **fields)
    config = ModelConfig.from_hf(SafetensorsWeights(folder).config)
    assert [config.window_of(layer) for layer in range(config.n_layers)] == expected


def test_a_device_without_the_memory_is_a_one_line_error() -> None:
    import torch

    from cake_py.errors import WeightsError
    from cake_py.models.weights import placed

    class OnAFullGpu:
        def to(self, **_: object) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nIncluding other memory")

    with pytest.raises(WeightsError) as caught:
        placed({"w": OnAFullGpu()}, torch.bfloat16, "cuda:0", "layers 0-4")  # type: ignore[dict-item]
    message = str(caught.value)
    assert message.startswith("cannot place layers 0-4 on cuda:0 in bfloat16: CUDA out of memory. Tried to allocate")
    assert "\n" not in message and "spread the model over workers" in message


def test_a_bug_while_placing_weights_is_not_reported_as_a_full_device() -> None:
    import torch

    from cake_py.models.weights import placed

    class Broken:
        def to(self, **_: object) -> torch.Tensor:
            raise RuntimeError("view size is not compatible with input tensor's size and stride")

    with pytest.raises(RuntimeError, match="view size"):
        placed({"w": Broken()}, torch.bfloat16, "cuda:0", "layers 0-4")  # type: ignore[dict-item]
