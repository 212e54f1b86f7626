"""The model's own helpers: rope tables served from the grown cache equal tables computed for the positions alone."""

from __future__ import annotations

import pytest
import torch

from cake_py.models.config import ModelConfig, RopeConfig
from cake_py.models.kv_cache import SequenceSlice, batch_positions
from cake_py.models.llama import Transformer
from cake_py.models.rope import rope_tables

CONFIG = ModelConfig(
    family="llama", vocab_size=32, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=16, rope=RopeConfig(theta=500000.0, kind="llama3", factor=8.0),
)  # fmt: skip


def direct(model: Transformer, batch: list[SequenceSlice], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables(model.inv_freqs[0], batch_positions(batch), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_rope_equals_direct_computation(dtype: torch.dtype) -> None:
    model = Transformer(CONFIG, 0, 2, with_embedding=False, with_head=False)
    like = torch.empty(0, dtype=dtype)
    batches = [
        [SequenceSlice(1, 0, 7)],  # prefill from the start
        [SequenceSlice(1, 7, 1)],  # decode
        [SequenceSlice(1, 300, 1)],  # past the first table: it grows
        [SequenceSlice(1, 8, 1), SequenceSlice(2, 0, 5), SequenceSlice(3, 1000, 2)],  # mixed batch, grows again
    ]
    for batch in batches:
        ((cos, sin),) = model.rope(batch, like)  # one rope: every Llama layer shares it
        expected_cos, expected_sin = direct(model, batch, dtype)
        assert cos.dtype == dtype and cos.shape == expected_cos.shape == (sum(s.n_tokens for s in batch), 1, 16)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


def test_rope_tables_follow_the_dtype() -> None:
    model = Transformer(CONFIG, 0, 2, with_embedding=False, with_head=False)
    batch = [SequenceSlice(1, 3, 2)]
    assert model.rope(batch, torch.empty(0, dtype=torch.bfloat16))[0][0].dtype == torch.bfloat16
    ((cos, sin),) = model.rope(batch, torch.empty(0))
    assert cos.dtype == torch.float32 and torch.equal(sin, direct(model, batch, torch.float32)[1])
