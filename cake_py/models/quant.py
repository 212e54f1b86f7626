"""4-bit weights run as stored: GGUF Q4_0/Q4_1/Q4_K blocks as torch's int4 weight-only matmul (CPU).

A GGUF Q4_1 block of 32 weights is `d * q + m` with q in 0..15; torch's int4 kernel computes
`(q - 8) * scale + zero` per group of 32, so scale = d and zero = m + 8d represent it exactly (Q4_0: zero = 0;
Q4_K's groups of 32 likewise, from their 6-bit scales and mins: cake_py.models.gguf_int4 reads each layout).
Decode is memory-bound, and 4-bit weights move a quarter of the bytes of bf16 ones. The kernel is a matrix-vector
one, though: its cost grows with every row, at about 2.5× a dense bf16 matmul's per row. So a prefill chunk of many
rows unpacks the layer's weights into a bf16 scratch tensor, freed after the matmul, and runs the dense matmul.

On the wire and in state dicts a 4-bit linear is two plain tensors: `<prefix>.q4_weight` (uint8 (N, K), one
4-bit value per byte) and `<prefix>.q4_scales` (float32 (K/group, N, 2): scale and zero per group and row).

Weights a GGUF stores in other quantized types (Q8_0, Q5_K, Q6_K, …: no exact int4 form) run as int8 rows with one
scale per row, torch's int8 weight-only kernel (`<prefix>.q8_weight`, `<prefix>.q8_scales`): half the bytes of bf16,
at an error of at most half a step of 1/127 of the row's largest weight on top of the file's own.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZE = 32
# Rows from which a 4-bit linear unpacks its weights and runs a dense matmul. Unpacking costs about as much as
# 60 (1 thread) to 80 (2 threads) rows of the kernel over the dense matmul: SmolLM2's four layer linears ran
# 0.88× as fast unpacked as on the kernel at 64 rows, 1.01× at 80, 1.15× at 96 with 2 threads, and 1.07×, 1.23×,
# 1.33× with 1 (2026-11-23, interleaved, median of 15). Decode steps, a row or a few per sequence, stay below it.
DENSE_ROWS = 80
# torch's CPU int4 pack stores columns in blocks of 64: byte [block, k, j] holds column 64·block + j in its low
# nibble and column 64·block + 32 + j in its high one. Other widths are laid out otherwise and keep the kernel.
PACK_BLOCK = 64
# A value q moved to the high nibble of its byte, with that byte's top bit flipped, reads as the int8 16·(q - 8).
HIGH_NIBBLES, TOP_BITS = -0x0F0F0F0F0F0F0F10, -0x7F7F7F7F7F7F7F80  # 0xF0F0…F0 and 0x8080…80 as int64
# Rows from which int8 rows run as dense bf16 matmuls instead of the int8 kernel (also a matrix-vector one). Casting
# int8 to bf16 is cheap, so this comes early: on 1-2 threads the kernel cost 1.3-2.2× the cast and matmul at 16 rows
# (SmolLM2's 49152-row lm_head, a 3072×576 and a 14336×4096 weight; 2026-11-24), 2.3-4.5× at 128; 0.5-0.8× at 8.
INT8_DENSE_ROWS = 16
# Weight elements cast per piece: a 4 MiB bf16 scratch stays under glibc's mmap threshold, so it is not page-faulted
# in on every call as SmolLM2's whole lm_head cast at once (56 MiB) was (6× as long). 1-8 M elements measured alike
# within noise for weights from 576×576 to 14336×4096; 0.5 M was slower.
INT8_PIECE_ELEMENTS = 1 << 21
Q4_WEIGHT = "q4_weight"
Q4_SCALES = "q4_scales"


def int4_supported(device: str | torch.device, dtype: torch.dtype) -> bool:
    """The int4 kernel used here is torch's CPU one; float32 stays exact (dequantized) on purpose."""
    return torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(…, N, K) uint8 values and (…, K/group, N, 2) scale/zero → (…, N, K) float32 weights (a MoE layer's experts:
    one leading dimension)."""
    *lead, n, k = q.shape
    scale = scales[..., 0].transpose(-1, -2).reshape(*lead, n, k // GROUP_SIZE, 1)
    zero = scales[..., 1].transpose(-1, -2).reshape(*lead, n, k // GROUP_SIZE, 1)
    grouped = q.reshape(*lead, n, k // GROUP_SIZE, GROUP_SIZE).float()
    return ((grouped - 8) * scale + zero).reshape(*lead, n, k)


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
        self.affine_factors = torch.tensor([1 / 16, 1.0], dtype=dtype).view(2, 1, 1, 1)  # scale / 16, zero
        # bf16 only: a CPU float16 matmul is as slow as the kernel, and scale / 16 could lose bits to subnormals.
        # Checked against the values packed, in case a torch release lays its pack out otherwise.
        self.unpacks = (
            dtype == torch.bfloat16
            and self.out_features % PACK_BLOCK == 0
            and torch.equal(self.nibbles().permute(0, 2, 1).reshape(q.shape), (q.to(torch.int8) - 8) * 16)
        )

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def nibbles(self) -> torch.Tensor:
        """The packed values as 16·(q - 8): int8 (N/64, K, 64), [block, k, j] that of column 64·block + j."""
        blocks = self.out_features // PACK_BLOCK
        # 8 packed bytes a lane (per-byte ops writing half rows ran 3× slower): the low nibbles shifted up beside
        # the high ones, then both masked and flipped in place
        packed = self.packed.view(torch.int64).view(blocks, self.in_features, PACK_BLOCK // 16)
        lanes = torch.empty(blocks, self.in_features, 2, PACK_BLOCK // 16, dtype=torch.int64)
        torch.bitwise_left_shift(packed, 4, out=lanes[:, :, 0])
        lanes[:, :, 1].copy_(packed)
        lanes.bitwise_and_(HIGH_NIBBLES).bitwise_xor_(TOP_BITS)
        return lanes.view(torch.int8).view(blocks, self.in_features, PACK_BLOCK)

    def dense_weight(self) -> torch.Tensor:
        """Wᵀ (K, N) in the scales' dtype: each weight `(q - 8) * scale + zero`, rounded once as a dense copy is."""
        n, k = self.out_features, self.in_features
        blocks, groups = n // PACK_BLOCK, k // GROUP_SIZE
        weight = torch.empty(k, n, dtype=self.scales.dtype)
        # (blocks, groups, 32, 64): a group's 32 k by a block's 64 columns
        blocked = weight.view(groups, GROUP_SIZE, blocks, PACK_BLOCK).permute(2, 0, 1, 3)
        blocked.copy_(self.nibbles().view(blocks, groups, GROUP_SIZE, PACK_BLOCK))
        # each group's scale / 16 and zero, (2, K/group, 1, N): contiguous, so that the broadcast below runs
        # vectorised (from the interleaved scales it cost 4× as much). Exact: 16 is a power of 2.
        affine = torch.empty(2, groups, 1, n, dtype=self.scales.dtype)
        torch.mul(self.scales.permute(2, 0, 1).unsqueeze(2), self.affine_factors, out=affine)
        grouped = weight.view(groups, GROUP_SIZE, n)
        torch.addcmul(affine[1], grouped, affine[0], out=grouped)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.unpacks and rows.shape[0] >= DENSE_ROWS:
            weight = self.dense_weight()
            out = torch.mm(rows, weight) if self.bias is None else torch.addmm(self.bias, rows, weight)
        else:
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


# ---- 8-bit rows: a GGUF's weights stored in another quantized type than 4-bit ones (Q8_0, Q6_K, Q5_K, …) ----
Q8_WEIGHT = "q8_weight"
Q8_SCALES = "q8_scales"


def quantize_rows_int8(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, N, K) float → int8 (…, N, K) and float32 (…, N) scales, symmetric per row (a MoE layer's experts: one
    (N, K) matrix each)."""
    scales = weights.float().abs().amax(dim=-1).clamp(min=1e-12) / 127
    q = torch.round(weights.float() / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_rows_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[..., None]


def int8_rows_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) times the int8 rows q (N, K) with one scale per row, transposed, as dense matmuls in x's dtype: the
    rows cast in pieces into a small scratch (exactly: |q| ≤ 127 fits bf16's 8 bits), each piece's product written
    into its columns, then every column scaled, in the kernel's own order (the scale after the dot product)."""
    n, k = q.shape
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    step = max(1, INT8_PIECE_ELEMENTS // k)
    scratch = torch.empty(min(step, n), k, dtype=x.dtype, device=x.device)
    for start in range(0, n, step):
        end = min(n, start + step)
        piece = scratch[: end - start]
        piece.copy_(q[start:end])
        torch.mm(x, piece.t(), out=out if end - start == n else out[:, start:end])
    return out.mul_(scales)


class Int8Linear(nn.Module):
    """y = x Wᵀ (+ b) with int8 rows and one scale per output row (torch's CPU int8 weight-only kernel). Like the
    4-bit kernel it is a matrix-vector one, dearer per row than a dense matmul: from INT8_DENSE_ROWS rows (bf16:
    batched decode of many sequences, prefill chunks) the rows are cast for dense matmuls (`int8_rows_mm`)."""

    def __init__(
        self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)
        self.q: torch.Tensor
        self.scales: torch.Tensor
        self.bias: torch.Tensor | None
        self.unpacks = dtype == torch.bfloat16  # a CPU float16 matmul is as slow as the kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.unpacks and rows.shape[0] >= INT8_DENSE_ROWS:
            out = int8_rows_mm(rows, self.q, self.scales)
        else:
            out = torch._weight_int8pack_mm(rows, self.q, self.scales)
        if self.bias is not None:
            out.add_(self.bias)  # either way a fresh tensor
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
