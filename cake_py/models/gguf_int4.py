"""GGUF 4-bit blocks as groups of 32 for torch's int4 kernel: (q - 8) * scale + zero (see cake_py.models.quant).

- Q4_0 (18 bytes per 32 values): `d * (q - 8)`, so scale = d, zero = 0.
- Q4_1 (20 bytes per 32 values): `d * q + m`, so scale = d, zero = m + 8d.
- Q4_K (144 bytes per 256 values: 8 groups of 32): `d * sc * q - dmin * mn` with a 6-bit scale `sc` and min `mn`
  per group, so scale = d * sc, zero = 8 * d * sc - dmin * mn. The f16 `d`, `dmin` times a 6-bit integer are exact
  in float32, as Q4_1's `d` and `m` are.

Values are 0..15 in every type; only where each nibble sits differs (ggml's block layouts, which gguf-py's
`gguf.quants` dequantizes the same way).
"""

from __future__ import annotations

import gguf
import numpy as np

INT4_TYPES = {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_K}
_SUPER_BLOCK = 256  # Q4_K values per block
_K_SCALES = 12  # Q4_K bytes of packed 6-bit scales and mins


def _f16(raw: np.ndarray) -> np.ndarray:
    """(…, 2) bytes → (…) float32 of their little-endian f16."""
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


def q4_k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(…, 12) packed bytes → (…, 8) 6-bit scales and (…, 8) 6-bit mins, as ggml's `get_scale_min_k4`: groups 0-3
    take the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); groups 4-7 take a nibble of bytes 8-11 plus the top
    2 bits of bytes 0-3 (scales) or 4-7 (mins)."""
    low, high, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low & 0x3F, (extra & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([high & 0x3F, (extra >> 4) | ((high >> 2) & 0x30)], axis=-1)
    return scales, mins


def int4_groups(
    data: np.ndarray, kind: gguf.GGMLQuantizationType, n_rows: int, n_cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """A tensor's raw blocks → (uint8 (N, K) values 0..15, float32 (N, K/32, 2) scale and zero per group)."""
    if kind == gguf.GGMLQuantizationType.Q4_K:
        blocks = np.asarray(data).reshape(n_rows, n_cols // _SUPER_BLOCK, -1)
        d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]  # (N, K/256, 1)
        sc, mn = q4_k_scales_and_mins(blocks[..., 4 : 4 + _K_SCALES])
        scale = d * sc.astype(np.float32)
        zero = 8 * scale - dmin * mn.astype(np.float32)
        # Each 32 bytes hold two groups: the first in their low nibbles, the next in their high ones.
        packed = blocks[..., 4 + _K_SCALES :].reshape(n_rows, n_cols // _SUPER_BLOCK, 4, 1, 32)
        values = np.concatenate([packed & 0x0F, packed >> 4], axis=-2).reshape(n_rows, n_cols)
        return values, np.stack([scale, zero], axis=-1).reshape(n_rows, n_cols // 32, 2)
    blocks = np.asarray(data).reshape(n_rows, n_cols // 32, -1)
    d = _f16(blocks[..., 0:2])  # (N, K/32)
    if kind == gguf.GGMLQuantizationType.Q4_1:
        packed, zero = blocks[..., 4:20], _f16(blocks[..., 2:4]) + 8 * d
    else:
        packed, zero = blocks[..., 2:18], np.zeros_like(d)
    # A block stores element j in the low nibble of byte j and element j + 16 in its high nibble.
    values = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(n_rows, n_cols)
    return values, np.stack([d, zero], axis=-1)
