"""A Hugging Face model folder as a weight source: config.json plus model.safetensors, or the shards
model.safetensors.index.json lists. Headers are read (and checked against the file sizes) up front; tensors are read
only when a stage asks for them."""

from __future__ import annotations

import json
import math
import reprlib
import struct
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from cake_py.errors import ModelNotFoundError, WeightsError
from cake_py.models import multimodal
from cake_py.models.weights import FLOAT_TYPES, TensorInfo


class SafetensorsWeights:
    """A HF model folder: config.json plus model.safetensors or shards listed in model.safetensors.index.json."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ModelNotFoundError(f"no config.json in model folder {str(folder)!r}{_gguf_hint(folder)}")
        self.config_origin = str(config_path)
        self._config = read_json(config_path)
        self._files = self._shard_map(folder)
        self._infos = {info.name: info for file in sorted(set(self._files.values())) for info in _read_header(file)}
        missing = set(self._files) - set(self._infos)
        if missing:
            raise WeightsError(f"{str(folder)!r}: index lists tensors missing from the shards: {sorted(missing)[:3]}")
        # The name weights.py speaks → the stored one: a multimodal checkpoint's language model under its prefix,
        # its vision tower and projector left out (never loaded, streamed or counted in placement).
        self._stored = {name: name for name in self._files}
        if multimodal.architecture_of(self._config) is not None:
            try:
                self._stored = multimodal.text_tensor_names(list(self._files))
            except ValueError as error:
                raise WeightsError(f"{str(folder)!r}: {error}") from None
            self._files = {name: self._files[stored] for name, stored in self._stored.items()}
            self._infos = {name: replace(self._infos[stored], name=name) for name, stored in self._stored.items()}

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    @staticmethod
    def _shard_map(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = _weight_map(index)
            for file in set(files.values()):
                # Shards sit beside the index (an HF cache links them to its blobs, so this is checked by name).
                if Path(file).is_absolute() or ".." in Path(file).parts or "\0" in file:
                    raise WeightsError(f"shard index {str(index)!r} names a file outside the model folder: {file!r}")
                if not (folder / file).is_file():  # a FIFO or a device would block or never end
                    raise WeightsError(f"shard {file!r} named by {str(index)!r} is missing or not a regular file")
            return {name: folder / file for name, file in files.items()}
        single = folder / "model.safetensors"
        if not single.is_file():
            raise ModelNotFoundError(f"no model.safetensors or model.safetensors.index.json in {str(folder)!r}")
        return {info.name: single for info in _read_header(single)}

    def names(self) -> list[str]:
        return list(self._files)

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise WeightsError(f"tensor {name!r} is missing from {str(self.path)!r}")
        return self._infos[name]

    def check_readable(self, names: Iterable[str]) -> None:
        """WeightsError naming the first of `names` stored in a type `load` cannot read, from the header alone."""
        for name in names:
            stored = self.info(name).dtype
            if stored not in FLOAT_TYPES:  # F8 or integer codes are quantized: a plain cast would make garbage
                raise WeightsError(
                    f"tensor {name!r} in {str(self.path)!r} is stored as {stored}; only unquantized float weights "
                    f"({', '.join(sorted(FLOAT_TYPES))}) can be read from safetensors"
                )

    def load(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._files:
                raise WeightsError(f"tensor {name!r} is missing from {str(self.path)!r}")
            self.check_readable([name])
            by_file.setdefault(self._files[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(self._stored[name]).to(dtype)
            except (SafetensorError, OSError, RuntimeError) as error:
                raise WeightsError(f"cannot read {str(file)!r}: {error}") from error
        return tensors


# Bytes per element of the safetensors dtypes of whole bytes (F4 and F6 pack several elements in a byte).
ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
ITEM_BYTES |= {"I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
# The safetensors library refuses a larger header (its MAX_HEADER_SIZE), and so does every other reader of the format.
MAX_HEADER_BYTES = 100_000_000


def _gguf_hint(folder: Path) -> str:
    """A folder of GGUF files (where llama.cpp users keep them) is served by naming one: say which."""
    try:
        found = sorted(path.name for path in folder.glob("*.gguf"))
    except OSError:
        return ""
    if not found:
        return ""
    named = ", ".join(repr(name) for name in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return f"; it holds GGUF files ({named}): pass one of them (a split model's first part) as the model"


def _weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's tensor name → shard file, checked: Python's own words about a document of
    another shape ("'int' object has no attribute 'items'") were the message."""
    document = read_json(index)
    if not isinstance(document, dict) or "weight_map" not in document:
        raise WeightsError(f"shard index {str(index)!r} has no weight_map, got {reprlib.repr(document)}")
    weight_map = document["weight_map"]
    if not isinstance(weight_map, dict):
        raise WeightsError(
            f"shard index {str(index)!r}: weight_map must be an object mapping tensor names to shard files, "
            f"got {reprlib.repr(weight_map)}"
        )
    for name, file in weight_map.items():  # JSON's keys are strings already
        if not isinstance(file, str):
            raise WeightsError(
                f"shard index {str(index)!r}: weight_map gives tensor {name!r} the shard {reprlib.repr(file)}, "
                "not a file name"
            )
    return weight_map


def read_json(path: Path) -> Any:
    """A model folder's JSON file (config, index, tokenizer settings); WeightsError naming it if it cannot be read
    or is not JSON (bad UTF-8, nesting past Python's stack, integers past 4300 digits included)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise WeightsError(f"cannot read {str(path)!r}: {type(error).__name__}: {error}") from error


def _read_header(file: Path) -> list[TensorInfo]:
    """Parse a safetensors header and check that the file is long enough for every tensor it declares."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > MAX_HEADER_BYTES:  # the format's own limit; parsed, such a header held gigabytes
                raise WeightsError(
                    f"safetensors file {str(file)!r} declares a header of {header_len} bytes, past the format's "
                    f"limit of {MAX_HEADER_BYTES}"
                )
            if header_len > size - 8:
                raise WeightsError(f"safetensors file {str(file)!r} is truncated (header of {header_len} bytes)")
            header = json.loads(handle.read(header_len))
    # ValueError: not JSON or UTF-8, an integer past 4300 digits; RecursionError: nested past Python's stack
    except (OSError, struct.error, ValueError, RecursionError) as error:
        raise WeightsError(f"cannot read safetensors file {str(file)!r}: {type(error).__name__}: {error}") from error
    infos, spans = [], []
    data_len = size - 8 - header_len
    if not isinstance(header, dict):
        raise WeightsError(f"safetensors file {str(file)!r} has a malformed header (not a JSON object)")
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(offset) for offset in meta["data_offsets"])
            info = TensorInfo(name, str(meta["dtype"]), tuple(int(dim) for dim in meta["shape"]), end - begin)
        except (KeyError, TypeError, ValueError) as error:
            raise WeightsError(
                f"safetensors file {str(file)!r}: tensor {name!r} has a malformed entry ({error!r})"
            ) from None
        if end > data_len:
            raise WeightsError(f"safetensors file {str(file)!r} is truncated: tensor {name!r} ends past the file")
        if any(dim < 0 for dim in info.shape):  # two of them made a size that fit its offsets
            raise WeightsError(f"safetensors file {str(file)!r}: tensor {name!r} has shape {list(info.shape)}")
        itemsize = ITEM_BYTES.get(info.dtype)
        if itemsize is not None and (begin > end or math.prod(info.shape) * itemsize != end - begin):
            # The library refuses it at load, naming no tensor, after /models/load has dropped the served model.
            raise WeightsError(
                f"safetensors file {str(file)!r}: tensor {name!r} of shape {list(info.shape)} in {info.dtype} "
                f"takes {math.prod(info.shape) * itemsize} bytes, but its offsets {[begin, end]} give it {end - begin}"
            )
        infos.append(info)
        spans.append((begin, end, name))
    _check_layout(file, spans, data_len)
    return infos


def _check_layout(file: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors' bytes one after the other, from the data's start to the file's end, as the format requires: the
    library refuses overlaps and gaps when a tensor is read (naming no file), after /models/load has dropped the
    served model."""
    reached, last = 0, None
    for begin, end, name in sorted(spans):
        if begin != reached:
            where = f"where {last!r} ends" if last is not None else "the start of the data"
            how = "overlaps" if begin < reached else "leaves a gap after"
            raise WeightsError(
                f"safetensors file {str(file)!r}: tensor {name!r} begins at byte {begin}, and {how} {where} ({reached})"
            )
        reached, last = end, name
    if reached != data_len:
        raise WeightsError(
            f"safetensors file {str(file)!r}: its tensors end at byte {reached} of its {data_len} bytes of data"
        )
