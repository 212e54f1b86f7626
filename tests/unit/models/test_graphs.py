"""The fixed-shape decode step that CUDA graphs record computes what the eager decode step computes.

The recording and replaying itself needs a GPU (tests/gpu); the step's math runs anywhere, so it is checked here
against the eager path for every architecture, through and past a sliding window.
"""

from __future__ import annotations

import pytest
import torch

from cake_py.models import graphs
from cake_py.models.hub import resolve_model
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.weights import load_transformer
from tests.conftest import TinyModelFactory
from tests.fixtures.tiny_models import KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_the_static_decode_step_computes_what_the_eager_one_does(
    kind: str, tiny_model_factory: TinyModelFactory
) -> None:
    source = resolve_model(str(tiny_model_factory(kind)))
    config = source.config
    layers = load_transformer(
        source.weights, config, 0, config.n_layers, with_embedding=False, with_head=False, dtype=torch.float32
    )
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(12, config.hidden_size, generator=generator)
    eager_kv, static_kv = layers.new_kv_store(), layers.new_kv_store()
    for kv in (eager_kv, static_kv):
        layers.forward_layers(prompt, [SequenceSlice(1, 0, 12)], kv)
    eager_steps = 0
    for position in range(12, 100):  # past the tiny Mistral's and Qwen's 16-token windows, several times
        x = torch.randn(1, config.hidden_size, generator=generator)
        eager = layers.forward_layers(x, [SequenceSlice(1, position, 1)], eager_kv)
        caches = static_kv.caches_of(1)
        assert caches is not None
        if any(graphs._full(cache, position) for cache in caches):  # as DecodeGraphs.run: it grows, or drops, eagerly
            static = layers.forward_layers(x, [SequenceSlice(1, position, 1)], static_kv)
            eager_steps += 1
        else:
            layers._rope_tables(max(cache.start + cache.keys.shape[2] for cache in caches), x)
            static = layers.decode_static(x, torch.tensor([position]), caches)
            for cache in caches:
                cache.length = position + 1
        torch.testing.assert_close(static, eager, atol=1e-4, rtol=1e-4)
    caches = static_kv.caches_of(1)
    assert caches is not None
    windows = [config.window_of(layer) for layer in range(config.n_layers)]
    # A window's buffer stays at the window and a quantum to drop, replayed steps or not; dropping takes a few eager
    # steps (each graph then recorded again), and the static step read positions from a start past 0.
    if any(windows):
        assert max(cache.keys.shape[2] for cache in caches if cache.window is not None) == 32
        assert 0 < eager_steps <= 6 and max(cache.start for cache in caches) > 0
    # The caches past the written positions are zeros: the static step reads them (masked), and NaN would leak.
    for cache in caches:
        assert not cache.keys[:, :, 100 - cache.start :].any()


def test_a_failed_recording_runs_eagerly_for_a_while_then_tries_again(
    tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory for a moment must not cost graphs for the process's lifetime; three failures do."""
    import contextlib

    source = resolve_model(str(tiny_model_factory("llama")))
    layers = load_transformer(
        source.weights, source.config, 0, source.config.n_layers, with_embedding=False, with_head=False,
        dtype=torch.float32,
    )  # fmt: skip
    kv = layers.new_kv_store()
    layers.forward_layers(torch.zeros(4, source.config.hidden_size), [SequenceSlice(1, 0, 4)], kv)
    recordings: list[int] = []

    def failing(self: graphs.DecodeGraphs, *args: object) -> None:
        recordings.append(self.steps)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(graphs.DecodeGraphs, "_record", failing)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # the CPU stands in
    decode = graphs.DecodeGraphs(layers)
    hidden = torch.zeros(1, source.config.hidden_size)
    for _ in range(3 * graphs.RETRY_AFTER_STEPS + 10):
        assert decode.run(hidden, SequenceSlice(1, 4, 1), kv) is None  # eager every time: the caller computes
    assert recordings == [1, 1 + graphs.RETRY_AFTER_STEPS, 1 + 2 * graphs.RETRY_AFTER_STEPS]
    assert decode.disabled and kv.graphs == {}


def test_one_token_of_a_long_prompt_cut_into_micro_batches_is_not_replayed(
    tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --micro-batch-tokens 1, each token of a LongRoPE prompt past the original context (16 positions here)
    reaches a worker as a one-token slice of its own, rotated by the whole prompt's length (rope_end): the long
    factors at every position. A replayed step reads its row by position alone, short factors before position 16, so
    such a slice runs eagerly: it is never recorded."""
    import contextlib

    source = resolve_model(str(tiny_model_factory("phi3-longrope")))
    config = source.config
    layers = load_transformer(
        source.weights, config, 0, config.n_layers, with_embedding=False, with_head=False, dtype=torch.float32
    )
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(6, config.hidden_size, generator=generator)
    kv = layers.new_kv_store()
    for position in range(5):  # the prompt's first pieces, each computed for the 24-token prompt
        layers.forward_layers(prompt[position : position + 1], [SequenceSlice(1, position, 1, None, 24)], kv)
    recordings: list[int] = []

    def recording(self: graphs.DecodeGraphs, *args: object) -> None:
        recordings.append(self.steps)
        raise torch.OutOfMemoryError("no CUDA here: the step would be recorded now")

    monkeypatch.setattr(graphs.DecodeGraphs, "_record", recording)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # the CPU stands in
    piece = SequenceSlice(1, 5, 1, None, 24)
    assert graphs.DecodeGraphs(layers).run(prompt[5:], piece, kv) is None
    assert recordings == []
    # Why: the fixed-shape step at position 5 computes what the short factors give, not this slice's long ones.
    caches = kv.caches_of(1)
    assert caches is not None
    layers._rope_tables(max(cache.start + cache.keys.shape[2] for cache in caches), prompt)
    static = layers.decode_static(prompt[5:], torch.tensor([5]), caches)
    eager = layers.forward_layers(prompt[5:], [piece], kv)
    assert not torch.allclose(static, eager, atol=1e-3)
