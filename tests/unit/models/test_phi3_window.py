"""Phi-3-mini-4k's config gives a sliding window, which transformers applies to every layer: so do we (tokens past
the window change the logits, and ours follow transformers' through a prefill and the KV cache)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.models.test_parity import assert_logits_close, load_ours, load_reference, reference_logits, run

transformers = pytest.importorskip("transformers")


@torch.inference_mode()
def test_phi3_windows_every_layer_as_transformers_does(tiny_model_factory: Any) -> None:
    folder = tiny_model_factory("phi3-window")
    ours, reference = load_ours(folder), load_reference(folder)
    assert [ours.config.window_of(layer) for layer in range(ours.config.n_layers)] == [8, 8]
    ids = torch.randint(3, 384, (30,), generator=torch.Generator().manual_seed(5))
    expected = reference_logits(reference, ids)
    kv = ours.new_kv_store()
    (prefill,) = run(ours, kv, [(0, 0, ids[:20])])
    assert_logits_close(prefill, expected[:20])
    for position in range(20, 30):
        (step,) = run(ours, kv, [(0, position, ids[position : position + 1])])
        assert_logits_close(step, expected[position : position + 1])
    # The window matters at these lengths: attending to everything gives other logits.
    whole = load_ours(folder)
    whole.layers[0].attention.sliding_window = whole.layers[1].attention.sliding_window = None
    assert not torch.allclose(run(whole, whole.new_kv_store(), [(0, 0, ids)])[0][-1], expected[-1], atol=1e-3)


def test_a_phi3_config_without_a_window_attends_to_everything() -> None:
    """transformers' Phi3Config defaults sliding_window to none (Mistral's and Qwen's to 4096)."""
    from cake_py.models.config import ModelConfig

    raw = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2).to_dict()
    raw.pop("sliding_window")
    reference = transformers.Phi3Config(**{k: v for k, v in raw.items() if k != "model_type"})
    assert reference.sliding_window is None and ModelConfig.from_hf(raw).sliding_window is None
