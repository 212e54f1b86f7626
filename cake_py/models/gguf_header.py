"""A GGUF file's header counts, checked before gguf's reader parses them: its reader builds Python objects for every
metadata item and tensor descriptor a header declares, so a header that lies (billions of tensors, millions of
empty tokens, arrays of arrays) costs minutes and gigabytes, or ends in a traceback, before anything can refuse it.
"""

from __future__ import annotations

import importlib.metadata
import math
import mmap
import os
import struct
from pathlib import Path

import gguf

from cake_py.errors import WeightsError

MAX_METADATA_KEYS = 65_536
# The largest published models hold a few thousand tensors (llama.cpp merges a MoE layer's experts into one); a
# descriptor takes at least 24 bytes (name length, dimension count, type, offset), so a file holds no more than that.
MAX_TENSORS = 1 << 20
MIN_DESCRIPTOR_BYTES = 24
MAX_ARRAY_ITEMS = 1 << 20  # the largest vocabularies (262k tokens) and merge lists (~500k) are well under
MAX_TOTAL_ITEMS = 4 << 20  # over every array: many arrays under the limit each would cost as much


def check_header(path: Path) -> None:
    """Refuse a header gguf's reader would take minutes and gigabytes to parse (it builds an array per string: 3M
    empty tokens in a 23 MB file took 87 s and 4.9 GB), by reading the counts first, and a file that ends before its
    header or its tensor data does (the reader's numpy views came up short, and numpy's words about them were the
    message); a malformed header is left to the reader, which names it."""
    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:  # mmap takes no empty file
                raise WeightsError(f"{_unreadable(path)}: the file is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if data[:4] != b"GGUF":
                    if len(data) < 4 and b"GGUF".startswith(data[:]):
                        raise WeightsError(f"{_unreadable(path)}: {_past_the_end(data)}")
                    return
                try:
                    _check_counts(path, data)
                # struct.error: a field past the last byte; OverflowError: an offset past what struct can index,
                # where a length field lies (a descriptor read from the data)
                except (struct.error, OverflowError):
                    raise WeightsError(f"{_unreadable(path)}: {_past_the_end(data)}") from None
    except (OSError, ValueError):
        return  # unreadable: the reader says so, naming the path


def _unreadable(path: Path) -> str:
    return f"cannot read GGUF file {str(path)!r} (corrupt or truncated)"


def _past_the_end(data: mmap.mmap) -> str:
    return f"its header runs past the end of the file ({len(data)} bytes)"


def _check_counts(path: Path, data: mmap.mmap) -> None:
    """check_header's walk over the metadata and tensor descriptors of a file that starts with GGUF's magic."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types of fixed size
    # A big-endian file's version reads as n << 16 in little-endian (gguf's reader tells them apart so too).
    order = ">" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF == 0 else "<"
    n_kv = struct.unpack_from(f"{order}Q", data, 16)[0]
    if n_kv > MAX_METADATA_KEYS:
        raise WeightsError(f"GGUF file {str(path)!r} declares {n_kv} metadata keys, past {MAX_METADATA_KEYS}")
    offset, total, alignment = 24, 0, gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key_length = struct.unpack_from(f"{order}Q", data, offset)[0]
        key = bytes(data[offset + 8 : offset + 8 + min(key_length, 200)]).decode("utf-8", "replace")
        offset += 8 + key_length
        kind = struct.unpack_from(f"{order}I", data, offset)[0]
        offset += 4
        count = 1
        if kind == 9:  # an array: its items' type and count
            kind, count = struct.unpack_from(f"{order}IQ", data, offset)
            offset += 12
            if kind == 9:  # gguf's reader makes objects per item of each: a 12 MB file took 23 s and 1.3 GB
                raise WeightsError(
                    f"GGUF file {str(path)!r}: metadata {key!r} is an array of arrays, which GGUF models do "
                    "not hold (llama.cpp refuses them)"
                )
            total += count
            if count > MAX_ARRAY_ITEMS:
                raise WeightsError(
                    f"GGUF file {str(path)!r}: metadata {key!r} holds {count} items, past {MAX_ARRAY_ITEMS}"
                )
            if total > MAX_TOTAL_ITEMS:
                raise WeightsError(
                    f"GGUF file {str(path)!r}: its metadata arrays hold {total} items by {key!r}, past "
                    f"{MAX_TOTAL_ITEMS} in all"
                )
        elif key == "general.alignment" and kind == 4:  # where the tensor data starts
            alignment = struct.unpack_from(f"{order}I", data, offset)[0]
        if kind == 8:  # strings: each its length, then its bytes
            for _ in range(count):
                offset += 8 + struct.unpack_from(f"{order}Q", data, offset)[0]
        elif kind in sizes:
            offset += sizes[kind] * count
        else:
            return  # nested arrays, unknown types: the reader decides
    if offset > len(data):  # the last value's bytes are cut
        raise WeightsError(f"{_unreadable(path)}: {_past_the_end(data)}")
    # Then the tensors' descriptors: a type gguf does not know (a newer llama.cpp's) is named with its tensor.
    n_tensors = struct.unpack_from(f"{order}Q", data, 8)[0]
    if n_tensors > min(MAX_TENSORS, (len(data) - offset) // MIN_DESCRIPTOR_BYTES):
        raise WeightsError(
            f"GGUF file {str(path)!r} declares {n_tensors} tensors, more than its {len(data)} bytes can "
            "describe (corrupt header)"
            if n_tensors <= MAX_TENSORS
            else f"GGUF file {str(path)!r} declares {n_tensors} tensors, past {MAX_TENSORS}"
        )
    data_bytes = 0  # how far into the data section the tensors reach
    for _ in range(n_tensors):
        name_length = struct.unpack_from(f"{order}Q", data, offset)[0]
        name = bytes(data[offset + 8 : offset + 8 + min(name_length, 200)]).decode("utf-8", "replace")
        offset += 8 + name_length
        n_dims = struct.unpack_from(f"{order}I", data, offset)[0]
        if n_dims > 4:  # GGML_MAX_DIMS: not a descriptor llama.cpp wrote, the reader names it
            return
        dims = struct.unpack_from(f"{order}{n_dims}Q", data, offset + 4)
        kind, tensor_offset = struct.unpack_from(f"{order}IQ", data, offset + 4 + 8 * n_dims)
        offset += 4 + 8 * n_dims + 12
        if kind not in _KNOWN_TYPES:
            raise WeightsError(
                f"tensor {name!r} in {str(path)!r} has GGML type {kind}, which gguf "
                f"{importlib.metadata.version('gguf')} does not know (a newer llama.cpp's type?)"
            )
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        data_bytes = max(data_bytes, tensor_offset + math.prod(dims) * type_size // block_size)
    if alignment == 0 or alignment & (alignment - 1):
        return  # the reader refuses it, naming it
    data_start = -(-offset // alignment) * alignment
    if n_tensors and data_start + data_bytes > len(data):
        raise WeightsError(
            f"{_unreadable(path)}: the file ends before its tensor data does: {len(data)} bytes, "
            f"{data_start + data_bytes} expected"
        )


_KNOWN_TYPES = {int(kind) for kind in gguf.GGMLQuantizationType}
