"""4-bit weights run as stored: GGUF Q4_0/Q4_1/Q4_K blocks as torch's int4 weight-only matmul (CPU).

A GGUF Q4_1 block of 32 weights is `d * q + m` with q in 0..15; torch's int4 kernel computes
`(q - 8) * scale + zero` per group of 32, so scale = d and zero = m + 8d represent it exactly (Q4_0: zero = 0;
Q4_K's groups of 32 likewise, from their 6-bit scales and mins: cake_py.models.gguf_int4 reads each layout).
Decode is memory-bound, and 4-bit weights move a quarter of the bytes of bf16 ones.

On the wire and in state dicts a 4-bit linear is two plain tensors: `<prefix>.q4_weight` (uint8 (N, K), one
4-bit value per byte) and `<prefix>.q4_scales` (float32 (K/group, N, 2): scale and zero per group and row).
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZE = 32
Q4_WEIGHT = "q4_weight"
Q4_SCALES = "q4_scales"


def int4_supported(device: str | torch.device, dtype: torch.dtype) -> bool:
    """The int4 kernel used here is torch's CPU one; float32 stays exact (dequantized) on purpose."""
    return torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values and (K/group, N, 2) scale/zero → (N, K) float32 weights."""
    n, k = q.shape
    scale = scales[..., 0].t().reshape(n, k // GROUP_SIZE, 1)
    zero = scales[..., 1].t().reshape(n, k // GROUP_SIZE, 1)
    grouped = q.reshape(n, k // GROUP_SIZE, GROUP_SIZE).float()
    return ((grouped - 8) * scale + zero).reshape(n, k)


class Int4Linear(nn.Module):
    """y = x Wᵀ (+ b) with W in groups of 32 4-bit values, packed once for torch's CPU kernel."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2))
        self.register_buffer("scales", scales.to(dtype).contiguous())
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)
        self.packed: torch.Tensor
        self.scales: torch.Tensor
        self.bias: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP_SIZE, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class SplitLinear(nn.Module):
    """A fused projection whose parts are stored in different types (a Q4_K_M file's Q4_K q/k beside a Q6_K v): its
    4-bit rows on the int4 kernel, the others dense, each piece's outputs side by side in the fused order."""

    def __init__(self, pieces: list[nn.Module]) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([piece(x) for piece in self.pieces], dim=-1)


# ---- 8-bit rows: the embedding and lm_head of a quantized GGUF (Q8_0 and friends) ----
Q8_WEIGHT = "q8_weight"
Q8_SCALES = "q8_scales"


def quantize_rows_int8(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → int8 (N, K) and float32 (N,) scales, symmetric per row."""
    scales = weights.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weights.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_rows_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:, None]


class Int8Linear(nn.Module):
    """y = x Wᵀ with int8 rows and one scale per output row (torch's CPU int8 weight-only kernel)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scales", scales.to(dtype))
        self.q: torch.Tensor
        self.scales: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch._weight_int8pack_mm(rows, self.q, self.scales)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Token lookup from int8 rows: only the looked-up rows are dequantized."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scales", scales.to(dtype))
        self.q: torch.Tensor
        self.scales: torch.Tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].to(self.scales.dtype) * self.scales[ids, None]
