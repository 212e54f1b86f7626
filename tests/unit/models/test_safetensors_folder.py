"""The safetensors folder reader: config.json, single or sharded safetensors, and what it refuses (damaged,
malformed or hostile files) before anything is loaded."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cake_py.errors import ModelNotFoundError, WeightsError
from cake_py.models.safetensors_folder import SafetensorsWeights
from tests.fixtures.tiny_models import copy_model


def test_missing_folder_is_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        SafetensorsWeights(missing)


def test_folder_without_weights_is_model_not_found(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        SafetensorsWeights(folder)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_truncated_safetensors_is_weights_error(tiny_model_factory, tmp_path: Path, sharded: bool) -> None:
    folder = copy_model(tiny_model_factory("llama", sharded=sharded), tmp_path)
    damaged = max(folder.glob("*.safetensors"), key=lambda file: file.stat().st_size)
    with damaged.open("r+b") as handle:
        handle.truncate(damaged.stat().st_size // 2)
    with pytest.raises(WeightsError, match=damaged.name) as raised:
        SafetensorsWeights(folder)
    assert "truncated" in str(raised.value)


@pytest.mark.parametrize(
    "header",
    [b"[1, 2]", b'{"w": {"dtype": "F32", "shape": [1]}}', b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": 7}}'],
    ids=["a-list", "no-offsets", "bad-offsets"],
)
def test_a_malformed_safetensors_header_is_a_weights_error(tiny_llama: Path, tmp_path: Path, header: bytes) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(WeightsError, match="model.safetensors"):
        SafetensorsWeights(folder)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("config-deep", "RecursionError"),
        ("config-not-utf8", "UnicodeDecodeError"),
        ("config-long-integer", "ValueError: Exceeds the limit (4300 digits)"),
        ("header-deep", "RecursionError"),
        ("index-nul", "names a file outside the model folder"),
        ("index-fifo", "is missing or not a regular file"),
    ],
)
def test_json_files_python_cannot_read_are_weights_errors(
    tiny_model_factory,
    tmp_path: Path,
    damage: str,
    needle: str,  # type: ignore[no-untyped-def]
) -> None:
    """Each of these was a traceback (RecursionError, UnicodeDecodeError, ValueError) or, for a FIFO shard, a hang."""
    folder = copy_model(tiny_model_factory("llama", sharded=damage.startswith("index")), tmp_path)
    if damage == "config-deep":
        (folder / "config.json").write_text("[" * 100_000)
    elif damage == "config-not-utf8":
        (folder / "config.json").write_bytes(b"\xff")
    elif damage == "config-long-integer":
        (folder / "config.json").write_text('{"hidden_size": ' + "9" * 5000 + "}")
    elif damage == "header-deep":
        header = b"[" * 100_000
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    else:
        index = folder / "model.safetensors.index.json"
        document = json.loads(index.read_text())
        shard = next(iter(document["weight_map"].values()))
        if damage == "index-nul":
            document["weight_map"] = {name: "a\u0000b" for name in document["weight_map"]}
        else:
            (folder / shard).unlink()
            os.mkfifo(folder / shard)
        index.write_text(json.dumps(document))
    with pytest.raises(WeightsError, match=re.escape(needle)):
        SafetensorsWeights(folder)


@pytest.mark.parametrize(
    ("document", "said"),
    [
        ('{"weight_map": 5}', ": weight_map must be an object mapping tensor names to shard files, got 5"),
        ('{"weight_map": [1, 2]}', ": weight_map must be an object mapping tensor names to shard files, got [1, 2]"),
        ('{"weight_map": {"w": 7}}', ": weight_map gives tensor 'w' the shard 7, not a file name"),
        ('{"metadata": {}}', " has no weight_map, got {'metadata': {}}"),
        ("[1]", " has no weight_map, got [1]"),
    ],
    ids=["number", "list", "shard-number", "no-map", "not-an-object"],
)
def test_a_shard_index_that_is_not_a_map_is_said_in_our_words(  # type: ignore[no-untyped-def]
    tiny_model_factory, tmp_path: Path, document: str, said: str
) -> None:
    """{"weight_map": 5} was "cannot read shard index '…': AttributeError("'int' object has no attribute 'items'")"."""
    folder = copy_model(tiny_model_factory("llama", sharded=True), tmp_path)
    index = folder / "model.safetensors.index.json"
    index.write_text(document)
    with pytest.raises(WeightsError) as raised:
        SafetensorsWeights(folder)
    assert str(raised.value) == f"shard index {str(index)!r}{said}"


def test_quantized_or_missing_tensors_are_weights_errors(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    embedding = tensors.pop("model.embed_tokens.weight")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].to(
        torch.float8_e4m3fn
    )
    save_file(tensors, folder / "model.safetensors")
    source = SafetensorsWeights(folder)
    with pytest.raises(WeightsError, match=r"'model\.embed_tokens\.weight' is missing"):
        source.info("model.embed_tokens.weight")
    with pytest.raises(WeightsError, match=r"q_proj\.weight.* is stored as F8_E4M3"):
        source.load(["model.layers.0.self_attn.q_proj.weight"], torch.float32)
    assert embedding.numel()


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/passwd"])
def test_a_shard_index_naming_files_outside_the_folder_is_refused(
    tiny_model_factory,
    tmp_path: Path,
    shard: str,  # type: ignore[no-untyped-def]
) -> None:
    folder = copy_model(tiny_model_factory("llama", sharded=True), tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="outside the model folder"):
        SafetensorsWeights(folder)
