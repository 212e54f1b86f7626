"""Soft-capped attention computes what transformers' eager attention (the reference for capping) computes, for every
shape our `Attention` gives it: a fresh prefill (causal), a chunk after cached positions or within a window (an
explicit mask), and one query reading its whole cache (no mask: the decode step on an accelerator)."""

from __future__ import annotations

import types

import pytest
import torch

from cake_py.models import softcapping
from cake_py.models.softcapping import capped_attention, soft_cap

transformers = pytest.importorskip("transformers")
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward  # noqa: E402

N_HEADS, N_KV_HEADS, HEAD_DIM, SCALE, CAP = 6, 2, 8, 0.3, 4.0


def reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """transformers' eager attention with an additive mask made of `visible` (t, L): (1, n_heads, t, head_dim)."""
    module = types.SimpleNamespace(num_key_value_groups=N_HEADS // N_KV_HEADS, training=False, head_dim=HEAD_DIM)
    additive = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[None, None]
    out, _ = eager_attention_forward(module, query, keys, values, additive, scaling=SCALE, softcap=CAP)  # type: ignore[arg-type]
    return out.transpose(1, 2)  # it returns (1, t, n_heads, head_dim)


@pytest.mark.parametrize(
    ("n_queries", "n_keys", "window", "explicit"),
    [(9, 9, None, False), (4, 13, None, True), (5, 11, 3, True), (1, 17, None, False)],
    ids=["prefill", "chunk-after-cache", "chunk-in-window", "one-query"],
)
def test_capped_attention_matches_transformers_eager(
    n_queries: int, n_keys: int, window: int | None, explicit: bool
) -> None:
    generator = torch.Generator().manual_seed(n_queries * 100 + n_keys)
    # (1, n_heads, t, head_dim) as `Attention` slices it from (t, n_heads, head_dim): not contiguous. Scores well past
    # the cap.
    query = 3 * torch.randn(1, n_queries, N_HEADS, HEAD_DIM, generator=generator).transpose(1, 2)
    keys, values = (torch.randn(1, N_KV_HEADS, n_keys, HEAD_DIM, generator=generator) for _ in range(2))
    query_pos = torch.arange(n_keys - n_queries, n_keys)[:, None]  # the queries are the last keys
    key_pos = torch.arange(n_keys)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    mask = visible if explicit else None
    causal = not explicit and n_queries > 1
    ours = capped_attention(query, keys, values, mask, causal, SCALE, CAP)
    expected = reference(query, keys, values, visible)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # The cap matters at these scores: uncapped attention is elsewhere.
    uncapped = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=visible, scale=SCALE, enable_gqa=True
    )
    assert (uncapped - expected).abs().max() > 0.05


@pytest.mark.parametrize("explicit", [False, True], ids=["causal", "mask"])
def test_queries_go_through_in_blocks_with_the_same_result(explicit: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long chunk's scores are computed a block of queries at a time (bounded memory), to the same attention."""
    generator = torch.Generator().manual_seed(3)
    n_queries, n_keys = 23, 30
    query = 3 * torch.randn(1, N_HEADS, n_queries, HEAD_DIM, generator=generator)
    keys, values = (torch.randn(1, N_KV_HEADS, n_keys, HEAD_DIM, generator=generator) for _ in range(2))
    causal = torch.ones(n_queries, n_keys, dtype=torch.bool).tril(n_keys - n_queries)
    windowed = causal & (torch.arange(n_keys) >= 4)  # an explicit mask that differs from the causal one
    mask = windowed if explicit else None
    expected = reference(query, keys, values, windowed if explicit else causal)
    whole = capped_attention(query, keys, values, mask, not explicit, SCALE, CAP)
    computed: list[int] = []
    block = softcapping._capped_block

    def counted(query: torch.Tensor, *args: object) -> torch.Tensor:
        computed.append(query.shape[2])
        return block(query, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(softcapping, "_capped_block", counted)
    monkeypatch.setattr(softcapping, "MAX_SCORES", 5 * N_HEADS * n_keys)  # blocks of 5 queries
    blocked = capped_attention(query, keys, values, mask, not explicit, SCALE, CAP)
    assert computed == [5, 5, 5, 5, 3]
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(blocked, expected, atol=1e-5, rtol=1e-5)


def test_soft_cap_bends_large_values_and_keeps_small_ones() -> None:
    x = torch.tensor([-1e4, -50.0, -0.01, 0.0, 0.01, 50.0, 1e4])
    capped = soft_cap(x, 30.0)
    assert capped.abs().max() <= 30.0 and torch.equal(capped.sign(), x.sign())
    torch.testing.assert_close(capped[2:5], x[2:5], atol=1e-8, rtol=1e-6)
    assert 25.0 < capped[5].item() < 30.0
