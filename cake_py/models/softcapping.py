"""Logit soft-capping (Gemma 2, and Gemma 3 configs that set it): x → cap · tanh(x / cap).

A capped model caps its attention scores before the mask (`attn_logit_softcapping`) and its head's logits
(`final_logit_softcapping`). torch's scaled_dot_product_attention has no hook between the scores and the softmax, so a
capped layer attends through `capped_attention` instead: transformers' `eager_attention_forward` (the reference for
capping: its SDPA and flash paths do not cap) computed in float32. Models without a cap never come here and keep the
fused kernels.

Its scores are float32 (heads, queries, keys), with temporaries of that size through the cap and the softmax: a
prompt's chunk of 512 queries over a cache of 8k positions with 16 heads held 268 MB per temporary. Queries go
through in blocks of at most `MAX_SCORES` scores, so a capped layer takes tens of MB whatever the context.
"""

from __future__ import annotations

import torch

MAX_SCORES = 1 << 22  # float32 scores per block of queries: 16 MB


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap): close to x where |x| ≪ cap, never past ±cap."""
    return torch.tanh(x / cap) * cap


def capped_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor | None,
    causal: bool,
    scale: float,
    cap: float,
) -> torch.Tensor:
    """Attention whose scaled scores are soft-capped before masking, as `F.scaled_dot_product_attention(query, keys,
    values, attn_mask=visible, is_causal=causal, scale=scale, enable_gqa=True)` computes it without the cap.

    query: (B, n_heads, t, head_dim); keys, values: (B, n_kv_heads, L, head_dim); visible: a boolean mask broadcastable
    to (t, L), True where a query reads a key, or None (with `causal`, a query reads the keys up to its own index, the
    queries being the last t keys) → (B, n_heads, t, head_dim) in values' dtype.
    """
    batch, n_heads, n_queries, _ = query.shape
    n_keys = keys.shape[2]
    rows = max(1, MAX_SCORES // (batch * n_heads * n_keys))
    if n_queries <= rows:
        return _capped_block(query, keys, values, visible, causal, scale, cap)
    if visible is None and causal:
        visible = _causal(n_queries, n_keys, query.device)
    per_row = visible is not None and visible.dim() >= 2 and visible.shape[-2] == n_queries
    blocks = [
        _capped_block(
            query[:, :, first : first + rows],
            keys,
            values,
            visible[..., first : first + rows, :] if per_row and visible is not None else visible,
            False,
            scale,
            cap,
        )
        for first in range(0, n_queries, rows)
    ]
    return torch.cat(blocks, dim=2)


def _causal(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """(t, L) True where a query reads a key, the queries being the last t keys."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)


def _capped_block(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor | None,
    causal: bool,
    scale: float,
    cap: float,
) -> torch.Tensor:
    """`capped_attention` of queries whose scores are computed at once."""
    batch, n_heads, n_queries, head_dim = query.shape
    n_kv_heads, n_keys = keys.shape[1], keys.shape[2]
    group = n_heads // n_kv_heads
    # The query heads reading one kv head side by side: one matmul per kv head, without repeating the keys.
    queries = query.float().reshape(batch, n_kv_heads, group * n_queries, head_dim)
    scores = soft_cap(torch.matmul(queries, keys.float().transpose(-1, -2)) * scale, cap)  # (B, kv, group * t, L)
    if visible is None and causal:
        visible = _causal(n_queries, n_keys, query.device)
    if visible is not None:
        per_query = scores.view(batch, n_kv_heads, group, n_queries, n_keys)
        scores = per_query.masked_fill(~visible, float("-inf")).view(batch, n_kv_heads, group * n_queries, n_keys)
    out = torch.matmul(torch.softmax(scores, dim=-1), values.float())  # (B, n_kv_heads, group * t, head_dim)
    return out.to(values.dtype).view(batch, n_heads, n_queries, head_dim)
