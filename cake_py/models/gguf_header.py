"""A GGUF file's header counts, checked before gguf's reader parses them: its reader builds Python objects for every
metadata item and tensor descriptor a header declares, so a header that lies (billions of tensors, millions of
empty tokens, arrays of arrays) costs minutes and gigabytes, or ends in a traceback, before anything can refuse it.
"""

from __future__ import annotations

import importlib.metadata
import mmap
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
    empty tokens in a 23 MB file took 87 s and 4.9 GB), by reading the counts first; a cut or malformed header
    is left to the reader, which names it."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types of fixed size
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                return
            # A big-endian file's version reads as n << 16 in little-endian (gguf's reader tells them apart so too).
            order = ">" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF == 0 else "<"
            n_kv = struct.unpack_from(f"{order}Q", data, 16)[0]
            if n_kv > MAX_METADATA_KEYS:
                raise WeightsError(f"GGUF file {str(path)!r} declares {n_kv} metadata keys, past {MAX_METADATA_KEYS}")
            offset, total = 24, 0
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
                if kind == 8:  # strings: each its length, then its bytes
                    for _ in range(count):
                        offset += 8 + struct.unpack_from(f"{order}Q", data, offset)[0]
                elif kind in sizes:
                    offset += sizes[kind] * count
                else:
                    return  # nested arrays, unknown types: the reader decides
            # Then the tensors' descriptors: a type gguf does not know (a newer llama.cpp's) is named with its tensor.
            n_tensors = struct.unpack_from(f"{order}Q", data, 8)[0]
            if n_tensors > min(MAX_TENSORS, (len(data) - offset) // MIN_DESCRIPTOR_BYTES):
                raise WeightsError(
                    f"GGUF file {str(path)!r} declares {n_tensors} tensors, more than its {len(data)} bytes can "
                    "describe (corrupt header)"
                    if n_tensors <= MAX_TENSORS
                    else f"GGUF file {str(path)!r} declares {n_tensors} tensors, past {MAX_TENSORS}"
                )
            for _ in range(n_tensors):
                name_length = struct.unpack_from(f"{order}Q", data, offset)[0]
                name = bytes(data[offset + 8 : offset + 8 + min(name_length, 200)]).decode("utf-8", "replace")
                offset += 8 + name_length
                n_dims = struct.unpack_from(f"{order}I", data, offset)[0]
                if n_dims > 4:  # GGML_MAX_DIMS: not a descriptor llama.cpp wrote, the reader names it
                    return
                offset += 4 + 8 * n_dims
                kind, offset = struct.unpack_from(f"{order}I", data, offset)[0], offset + 12
                if kind not in _KNOWN_TYPES:
                    raise WeightsError(
                        f"tensor {name!r} in {str(path)!r} has GGML type {kind}, which gguf "
                        f"{importlib.metadata.version('gguf')} does not know (a newer llama.cpp's type?)"
                    )
    # OverflowError: an offset past what struct can index, where a length field lies (a descriptor read from the data)
    except (struct.error, OSError, ValueError, OverflowError):
        return  # cut short or unreadable: the reader says so, naming the path


_KNOWN_TYPES = {int(kind) for kind in gguf.GGMLQuantizationType}
