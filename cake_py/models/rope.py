"""Rotary position embeddings: the inverse frequencies of a model's rope (plain, linear, Llama 3, YaRN, LongRoPE, as
transformers' modeling_rope_utils computes them), the cos/sin tables of positions, and the rotation of q and k.

YaRN and LongRoPE, the scalings of long-context configs, both change the inverse frequencies and multiply cos and
sin by an attention factor (`RopeConfig.attention_factor`, resolved when the config is parsed: it may depend on
max_position_embeddings). LongRoPE has two sets of
frequencies: the short factors for sequences within `original_max_position_embeddings`, the long ones past it.
transformers picks one set per forward pass, by the largest position it holds + 1; here each sequence's slice of a
batch is judged alone (transformers judges a padded batch by its longest sequence, which makes a sequence's
rotation depend on its neighbours), and `Transformer` keeps both tables (see `long_rows_offset`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from cake_py.models.kv_cache import Batch, batch_positions

if TYPE_CHECKING:
    from cake_py.models.config_rope import RopeConfig

Table = tuple[torch.Tensor, torch.Tensor]  # cos and sin, (n, 1, head_dim) each


def _frequency_exponents(dim: int) -> torch.Tensor:
    """(dim/2,) float32 i/dim for the even i below dim, as transformers builds them."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim


def yarn_inverse_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    """(dim/2,) float32: interpolated (divided by the factor) for the low frequencies, extrapolated (as is) for the
    high ones, blended by a linear ramp between the dimensions where the original context turns `beta_slow` and
    `beta_fast` times (transformers' `_compute_yarn_parameters`)."""
    base, context = rope.theta, rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        """The dimension whose wavelength fits `rotations` times in the original context."""
        return (dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** _frequency_exponents(dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    extrapolated = 1 - ramp  # the share of the unscaled frequency, per dimension
    return interpolation * (1 - extrapolated) + extrapolation * extrapolated


def longrope_inverse_frequencies(rope: RopeConfig, dim: int, long: bool) -> torch.Tensor:
    """(dim/2,) float32: the base frequencies divided per dimension by the short or the long factors."""
    factors = rope.long_factor if long else rope.short_factor
    if factors is None or len(factors) != dim // 2:
        raise ValueError(f"longrope needs {dim // 2} short and long factors for a rotary dim of {dim}")
    return 1.0 / (torch.tensor(factors, dtype=torch.float32, device="cpu") * rope.theta ** _frequency_exponents(dim))


def long_rows_offset(rope: RopeConfig, end: int, size: int) -> int:
    """Where, in a rope's table, the rows of a slice computed for a sequence of `end` tokens start past its
    position: `size` (the long rows, kept after the `size` merged ones) for a LongRoPE sequence past the original
    context, as transformers judges a forward pass by its largest position + 1 (a prompt prefilled in pieces is
    judged by its whole length: SequenceSlice.extent); else 0."""
    if rope.kind == "longrope" and end > rope.original_max_position_embeddings:
        return size
    return 0


def with_long_rows(rope: RopeConfig, short: Table, long: Table, positions: torch.Tensor) -> Table:
    """A LongRoPE table of 2n rows from its short and long tables of positions [0, n): first the rows of one-token
    steps (short before the original context, long from it), then the long ones."""
    is_long = (positions >= rope.original_max_position_embeddings)[:, None, None]
    (short_cos, short_sin), (long_cos, long_sin) = short, long
    cos = torch.cat((torch.where(is_long, long_cos, short_cos), long_cos))
    sin = torch.cat((torch.where(is_long, long_sin, short_sin), long_sin))
    return cos, sin


def slice_rows(rope: RopeConfig, table: Table, size: int, batch: Batch) -> Table:
    """The rows of a rope's table (`size` positions) for every token of the batch, in layout order: (T, 1,
    head_dim) each."""
    cos, sin = table
    if len(batch) == 1:
        piece = batch[0]
        first = piece.start_pos + long_rows_offset(rope, piece.extent, size)
        return cos[first : first + piece.n_tokens], sin[first : first + piece.n_tokens]
    rows = batch_positions(batch, cos.device)
    if rope.kind != "longrope":  # one table row per position: nothing to look up per sequence on each step
        return cos[rows], sin[rows]
    offsets = [long_rows_offset(rope, s.extent, size) for s in batch]
    if any(offsets):  # each token of a slice past LongRoPE's original context reads the long rows
        counts = torch.tensor([s.n_tokens for s in batch], device=cos.device)
        rows = rows + torch.tensor(offsets, device=cos.device).repeat_interleave(counts)
    return cos[rows], sin[rows]


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """(head_dim/2,) float32 inverse frequencies, with Llama 3, linear or YaRN scaling applied (LongRoPE's short
    factors: its long ones are `longrope_inverse_frequencies(rope, head_dim, long=True)`)."""
    if rope.kind == "yarn":
        return yarn_inverse_frequencies(rope, head_dim)
    if rope.kind == "longrope":
        return longrope_inverse_frequencies(rope, head_dim, long=False)
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if rope.freq_factors is not None:
        if len(rope.freq_factors) != len(inv_freq):
            raise ValueError(f"{len(rope.freq_factors)} rope frequency factors for a head_dim of {head_dim}")
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32, device="cpu")
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        old_context = rope.original_max_position_embeddings
        low_wavelen = old_context / rope.low_freq_factor
        high_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for each position, times `scale` (a rope's attention factor): (T, 1, head_dim), computed in
    float32 then cast."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, head_dim)
    if scale == 1.0:
        return angles.cos().to(dtype), angles.sin().to(dtype)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (T, heads, head_dim) by the tables (HF's rotate-half layout); tables narrower than the heads rotate
    their first dimensions and pass the others through (a partial rotary factor)."""
    if cos.shape[-1] < x.shape[-1]:
        rotary = cos.shape[-1]
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
