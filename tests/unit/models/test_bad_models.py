"""Models got elsewhere that cannot be loaded: each is refused with one WeightsError or ModelError naming the file and
the bad value, where it is read, never a traceback of another type, a hang, or memory spent on what a header claims."""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cake_py.errors import ModelError, ModelNotFoundError, WeightsError
from cake_py.models import chat_template
from cake_py.models.config import ModelConfig
from cake_py.models.gguf import GGUFWeights
from cake_py.models.hub import resolve_model
from tests.fixtures.tiny_models import copy_model

MAX_TENSORS = 1 << 20  # what a header may declare (cake_py.models.gguf_header.MAX_TENSORS)


# The hyper-parameters a llama GGUF cannot do without (GGUFWeights names the first one missing).
HYPER_PARAMETERS = {
    "llama.block_count": 1,
    "llama.embedding_length": 8,
    "llama.feed_forward_length": 16,
    "llama.attention.head_count": 2,
}


def _small_gguf(path: Path, embedding: np.ndarray | None = None, **metadata: object) -> Path:
    """A llama GGUF of two tensors (three with `embedding`) and the given metadata (ints as UINT32, strings as
    strings): no model to run, enough for GGUFWeights to read."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in {**HYPER_PARAMETERS, **metadata}.items():
        kind = gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32
        writer.add_key_value(key, value, kind)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    if embedding is not None:
        writer.add_tensor("token_embd.weight", embedding)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _with_tensor_count(path: Path, count: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 8, count)  # after the magic and the version
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("cut", ["empty", "magic", "counts", "metadata", "descriptors", "data"])
def test_a_cut_gguf_says_where_it_ends_in_its_own_words(tmp_path: Path, cut: str) -> None:
    """A GGUF cut at 20 bytes or 1 MB was "(corrupt or truncated): When changing to a larger dtype, its size must be
    a divisor of …", numpy's words about the reader's short views."""
    whole = _small_gguf(tmp_path / "whole.gguf")
    reader = gguf.GGUFReader(whole)
    data_start = min(tensor.data_offset for tensor in reader.tensors)
    data_end = max(tensor.data_offset + tensor.n_bytes for tensor in reader.tensors)
    second_descriptor = whole.read_bytes().index(b"output_norm.weight")  # cut in its name
    size = {"empty": 0, "magic": 3, "counts": 20, "metadata": 60, "descriptors": second_descriptor + 4}
    size["data"] = data_end - 1
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole.read_bytes()[: size[cut]])
    said = {
        "empty": "the file is empty",
        "data": f"the file ends before its tensor data does: {data_end - 1} bytes, {data_end} expected",
    }.get(cut, f"its header runs past the end of the file ({size[cut]} bytes)")
    assert size[cut] < data_start or cut == "data"
    with pytest.raises(WeightsError) as raised:
        GGUFWeights(path)
    assert str(raised.value) == f"cannot read GGUF file {str(path)!r} (corrupt or truncated): {said}"


@pytest.mark.parametrize("count", [2**64 - 1, 5 * 10**9, MAX_TENSORS + 1])
def test_a_tensor_count_of_billions_is_refused_before_it_is_read(count: int, tmp_path: Path) -> None:
    """The header check read descriptors on into the data, and an offset past what struct can index ended the load
    in an OverflowError's traceback."""
    path = _with_tensor_count(_small_gguf(tmp_path / "lying.gguf"), count)
    with pytest.raises(WeightsError, match=rf"'{path}' declares {count} tensors, past {MAX_TENSORS}"):
        GGUFWeights(path)


def test_a_tensor_count_the_file_cannot_hold_is_refused(tmp_path: Path) -> None:
    path = _with_tensor_count(_small_gguf(tmp_path / "lying.gguf"), 100_000)
    with pytest.raises(WeightsError, match=r"declares 100000 tensors, more than its \d+ bytes can describe"):
        GGUFWeights(path)


def test_one_tensor_more_than_the_file_holds_is_a_weights_error(tmp_path: Path) -> None:
    """The last descriptor is read from the bytes after the real ones: a name's length there took the offset past
    what struct can index, and an OverflowError's traceback ended the load."""
    path = _with_tensor_count(_small_gguf(tmp_path / "one-more.gguf"), 3)
    data = path.read_bytes()
    last = data.index(b"output_norm.weight") + len(b"output_norm.weight") + 4 + 8 + 4 + 8  # its dims, type, offset
    path.write_bytes(data[:last] + b"\xff" * (len(data) - last))  # a name 2**64 - 1 bytes long
    with pytest.raises(WeightsError, match=rf"cannot read GGUF file '{path}' \(corrupt or truncated\)"):
        GGUFWeights(path)


@pytest.mark.parametrize("key", ["eos_token_id", "bos_token_id", "eot_token_id"])
def test_a_token_id_that_is_not_a_number_is_named(key: str, tmp_path: Path) -> None:
    path = _small_gguf(tmp_path / "ids.gguf", **{f"tokenizer.ggml.{key}": "x"})
    with pytest.raises(WeightsError, match=rf"metadata tokenizer.ggml.{key} must be a token id, got 'x'"):
        GGUFWeights(path)


@pytest.mark.parametrize("key", ["split.count", "split.no"])
def test_split_metadata_that_is_not_a_number_is_named(key: str, tmp_path: Path) -> None:
    values: dict[str, object] = {"split.count": 2, "split.no": 0, key: "a"}
    path = _small_gguf(tmp_path / "model-00001-of-00002.gguf", **values)
    with pytest.raises(WeightsError, match=rf"'{path}': metadata {key} must be a whole number, got 'a'"):
        GGUFWeights(path)


def test_a_split_of_thousands_of_missing_parts_names_a_few(tmp_path: Path) -> None:
    """A first part claiming 65535 parts listed all 65534 missing paths: a line of megabytes."""
    path = _small_gguf(tmp_path / "big-00001-of-65535.gguf", **{"split.count": 65535, "split.no": 0})
    with pytest.raises(ModelNotFoundError) as raised:
        GGUFWeights(path)
    message = str(raised.value)
    assert "big-00005-of-65535" not in message
    assert "big-00004-of-65535.gguf' and 65531 more do not exist" in message
    assert len(message) < 1000


def _damaged_copy(folder: Path, destination: Path, **config: object) -> Path:
    copy = copy_model(folder, destination)
    path = copy / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return copy


def test_weights_for_layers_past_the_config_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    """A config of 2 layers over weights of 3 loaded, ran layers 0-1 and answered garbage: layer 2 was never read."""
    folder = _damaged_copy(tiny_llama, tmp_path, num_hidden_layers=2)
    with pytest.raises(WeightsError, match=r"holds weights for layer 2, but .*config.json says the model has 2 layers"):
        resolve_model(str(folder))


def test_a_tensor_of_the_wrong_shape_in_the_last_layer_is_found_at_resolve(tiny_llama: Path, tmp_path: Path) -> None:
    """Found only when its stage loaded: after /models/load had dropped the served model, or once a cluster's first
    workers had taken their layers of a model the last one refused."""
    folder = copy_model(tiny_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=rf"'{folder}': tensor for 'layers.2.feed_forward.w2.weight' has shape"):
        resolve_model(str(folder))


def test_a_tensor_missing_from_the_last_layer_is_found_at_resolve(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"'model.layers.2.self_attn.k_proj.weight' is missing"):
        resolve_model(str(folder))


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        # int() took these without a word: 64.5 as 64, true as 1 (one layer of three loaded), "64" as 64.
        ("hidden_size", 64.5, "hidden_size must be a whole number, got 64.5"),
        ("num_hidden_layers", True, "num_hidden_layers must be a whole number, got True"),
        ("num_attention_heads", "4", "num_attention_heads must be a whole number, got '4'"),
        ("vocab_size", [384], "vocab_size must be a whole number, got [384]"),
        # Refused before, but naming no field: "int() argument must be ... not 'NoneType'", "unhashable type".
        ("intermediate_size", None, "intermediate_size must be a whole number, got None"),
        ("rms_norm_eps", "x", "rms_norm_eps must be a number, got 'x'"),
        ("rope_scaling", [1, 2], "rope_scaling must be a JSON object, got [1, 2]"),
        ("rope_scaling", {"rope_type": "linear", "factor": "x"}, "rope_scaling factor must be a number, got 'x'"),
        ("rope_freq_factors", "abc", "rope_freq_factors must be a list of numbers, got 'abc'"),
        ("hidden_act", ["silu"], "hidden_act must be the name of an activation, got ['silu']"),
        ("architectures", [{"a": 1}], "architectures must be a list of class names"),
        # Llama 3 rope wavelengths divide by these: a 0 was a ZeroDivisionError's traceback when the model was built.
        ("rope_scaling", {**LLAMA3_ROPE, "low_freq_factor": 0}, "low_freq_factor must be a finite number > 0, got 0"),
        ("rope_scaling", {**LLAMA3_ROPE, "high_freq_factor": 1}, "high_freq_factor (1.0) must be greater than its"),
        ("rope_scaling", {**LLAMA3_ROPE, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
    ],
)
def test_a_bad_config_field_is_named(field: str, value: object, needle: str) -> None:
    with pytest.raises(ModelError) as raised:
        ModelConfig.from_hf({**LLAMA_CONFIG, field: value}, "config.json")
    assert str(raised.value).startswith("config.json"), raised.value
    assert needle in str(raised.value)


def test_whole_numbers_written_as_floats_and_absent_windows_still_load() -> None:
    config = ModelConfig.from_hf({**LLAMA_CONFIG, "hidden_size": 64.0, "sliding_window": None})
    assert config.hidden_size == 64 and isinstance(config.hidden_size, int)
    mistral = {**LLAMA_CONFIG, "architectures": ["MistralForCausalLM"]}
    assert ModelConfig.from_hf({**mistral, "sliding_window": None}).sliding_window is None  # Mistral 7B v0.2's
    assert ModelConfig.from_hf(mistral).sliding_window == 4096  # transformers' default


def test_a_negative_sliding_window_is_refused() -> None:
    """It was taken as a window, and masked out every key: a model that loaded and answered garbage."""
    with pytest.raises(ModelError, match="sliding_window must be a number of positions, got -3"):
        ModelConfig.from_hf({**LLAMA_CONFIG, "architectures": ["MistralForCausalLM"], "sliding_window": -3})


def test_a_chat_template_writing_many_small_pieces_holds_about_a_byte_per_character() -> None:
    """Each piece a template writes is a string object of ~60 bytes: kept apart until the end, a loop writing the
    32M characters allowed held 750 MB for the 5 s a render may take, on every request."""
    template = chat_template.compile_template(
        "{% for i in range(200) %}{% for j in range(500) %}{{ j }}{% endfor %}{% endfor %}", "the chat template"
    )
    tracemalloc.start()
    try:
        rendered = chat_template.render(template, {}, "the chat template")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(rendered) == 200 * sum(len(str(j)) for j in range(500))
    assert peak < 8 * len(rendered), f"{peak / len(rendered):.1f} bytes per character"


@pytest.mark.parametrize("file", ["tokenizer_config.json", "generation_config.json"])
def test_a_tokenizer_setting_file_that_is_not_an_object_is_named(file: str, tiny_llama: Path, tmp_path: Path) -> None:
    """Read as no settings: the model lost its chat template, special tokens and end tokens without a word, and
    rendered chats with the ChatML fallback."""
    folder = copy_model(tiny_llama, tmp_path)
    (folder / file).write_text("[1]")
    with pytest.raises(ModelError, match=rf"'{folder / file}' must hold a JSON object, not a list"):
        resolve_model(str(folder)).tokenizer  # noqa: B018 - read for its error


def test_a_chat_template_list_without_a_named_template_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": [1, 2]}))
    with pytest.raises(ModelError, match=r"chat_template list holds no named template: \[1, 2\]"):
        resolve_model(str(folder)).tokenizer  # noqa: B018 - read for its error


def test_a_safetensors_header_past_the_formats_limit_is_refused_unread(tiny_llama: Path, tmp_path: Path) -> None:
    """A header as long as its file allows was read and parsed whole: the format's own readers stop at 100 MB."""
    folder = copy_model(tiny_llama, tmp_path)
    weights = folder / "model.safetensors"
    with weights.open("wb") as handle:
        handle.write(struct.pack("<Q", 100_000_001) + b"{")
        handle.truncate(8 + 100_000_001)  # sparse: a file that long, on no disk space
    with pytest.raises(WeightsError, match=r"declares a header of 100000001 bytes, past the format's limit"):
        resolve_model(str(folder))


def test_a_tensor_stored_as_integers_is_found_at_resolve(tiny_llama: Path, tmp_path: Path) -> None:
    """Found only when its stage read it: after /models/load had dropped the served model."""
    folder = copy_model(tiny_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.2.mlp.up_proj.weight"].to(torch.int32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"'model.layers.2.mlp.up_proj.weight' in .* is stored as I32"):
        resolve_model(str(folder))


def test_a_gguf_tensor_of_a_type_gguf_cannot_dequantize_is_named_unread(tmp_path: Path) -> None:
    path = _small_gguf(tmp_path / "integers.gguf", embedding=np.ones((4, 8), dtype=np.int32))
    weights = GGUFWeights(path)
    weights.check_readable(["model.norm.weight"])  # F32
    with pytest.raises(WeightsError, match=r"'model.embed_tokens.weight' in .* has quantization type 'I32'"):
        weights.check_readable(["model.norm.weight", "model.embed_tokens.weight"])


def _edit_header(weights: Path, edit: Callable[[dict[str, Any]], None], tail: bytes = b"") -> None:
    """Rewrite a safetensors file's header through `edit` (its data kept, `tail` bytes added after it)."""
    data = weights.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :] + tail)


def _norm(header: dict[str, Any], **entry: Any) -> None:
    header["model.norm.weight"].update(entry)


@pytest.mark.parametrize(
    ("edit", "tail", "needle"),
    [
        # The library refused these only when the tensor was read, naming no tensor ("invalid shape, data type, or
        # offset", "invalid offset"), after /models/load had dropped the served model.
        (
            lambda h: _norm(h, data_offsets=[h["model.norm.weight"]["data_offsets"][0]] * 2),
            b"",
            r"'model.norm.weight' of shape \[64\] in F32 takes 256 bytes, but its offsets .* give it 0",
        ),
        (
            lambda h: _norm(h, data_offsets=[0, 256]),
            b"",
            r"begins at byte 0, and overlaps where 'model.norm.weight' ends",
        ),
        (lambda h: None, b"\0" * 8, r"its tensors end at byte \d+ of its \d+ bytes of data"),
        # Two negative dimensions made a size that fit its offsets, and torch's refusal a traceback.
        (lambda h: _norm(h, shape=[-8, -8]), b"", r"'model.norm.weight' has shape \[-8, -8\]"),
    ],
    ids=["size", "overlap", "trailing-bytes", "negative-shape"],
)
def test_a_safetensors_layout_the_format_forbids_is_named_at_resolve(
    edit: Callable[[dict[str, Any]], None], tail: bytes, needle: str, tiny_llama: Path, tmp_path: Path
) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    _edit_header(folder / "model.safetensors", edit, tail)
    with pytest.raises(WeightsError, match=needle):
        resolve_model(str(folder))


def test_a_folder_of_gguf_files_says_to_pass_one(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    _small_gguf(folder / "tiny-Q4_K_M.gguf")
    with pytest.raises(ModelNotFoundError, match=r"it holds GGUF files \('tiny-Q4_K_M.gguf'\): pass one of them"):
        resolve_model(str(folder))


@pytest.mark.parametrize("key", ["general.architecture", "tokenizer.chat_template"])
def test_gguf_metadata_text_that_is_not_utf8_is_named(key: str, tmp_path: Path) -> None:
    """gguf decodes a string when it is read, not when the file is opened: a bad architecture name was a
    UnicodeDecodeError's traceback, a bad chat template "a tokenizer that cannot be built"."""
    path = _small_gguf(tmp_path / "text.gguf", **{"tokenizer.chat_template": "{{ messages }}"})
    data = bytearray(path.read_bytes())
    at = data.index(key.encode()) + len(key) + 4 + 8  # past the key, its value's type and its length
    data[at] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=rf"'{path}': metadata {key} is not UTF-8 text"):
        GGUFWeights(path).tokenizer_config()


def test_a_gguf_array_of_arrays_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """gguf's reader makes objects for each item of each: a 12 MB file of a million empty arrays took 23 s and
    1.3 GB before anything could refuse it. llama.cpp refuses arrays of arrays."""
    key = b"general.nested"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    data += struct.pack("<IIQ", 9, 9, 100_000) + struct.pack("<IQ", 0, 0) * 100_000  # each an empty uint8 array
    path = tmp_path / "nested.gguf"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=r"metadata 'general.nested' is an array of arrays"):
        GGUFWeights(path)
