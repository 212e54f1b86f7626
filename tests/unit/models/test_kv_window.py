"""Sliding-window layers keep only their window in the KV cache, and every path that reads or writes caches still
computes what the model computes with every position kept: the same model run over the whole text in one pass
(a fresh prefill drops nothing and masks the window), on tiny models with a 16-position window."""

from __future__ import annotations

import random

import pytest
import torch

from cake_py.models.hub import resolve_model
from cake_py.models.kv_cache import KVStore, LayerCache, SequenceSlice
from cake_py.models.kv_layout import first_read, kept_from, steady_capacity
from cake_py.models.llama import Transformer
from cake_py.models.weights import load_transformer
from tests.conftest import TinyModelFactory

WINDOW = 16  # the tiny models' (tests/fixtures/tiny_models.py); they drop 16 positions at a time
TEXT = [3 + (i * 37) % 200 for i in range(150)]
OTHER = [5 + (i * 11) % 190 for i in range(150)]


@pytest.fixture(params=["mistral", "qwen2", "gemma3"])  # every layer windowed; only some; Gemma 3's two ropes
def model(request: pytest.FixtureRequest, tiny_model_factory: TinyModelFactory) -> Transformer:
    source = resolve_model(str(tiny_model_factory(request.param)))
    config = source.config
    assert config.sliding_window == WINDOW
    return load_transformer(
        source.weights, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )


def run(model: Transformer, kv: KVStore, pieces: list[tuple[SequenceSlice, list[int]]]) -> list[torch.Tensor]:
    """One step over `pieces` (each a slice and the tokens it computes): each piece's logits, (t, vocab)."""
    ids = torch.tensor([token for _, tokens in pieces for token in tokens])
    logits = model.head(model.forward_layers(model.embed(ids), [piece for piece, _ in pieces], kv))
    return list(logits.split([len(tokens) for _, tokens in pieces]))


def whole(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """The logits of every position, computed in one pass with nothing dropped: (len(tokens), vocab)."""
    (logits,) = run(model, model.new_kv_store(), [(SequenceSlice(0, 0, len(tokens)), tokens)])
    return logits


def windowed(kv: KVStore, seq_id: int) -> list[LayerCache]:
    caches = kv.caches_of(seq_id)
    assert caches is not None
    return [cache for cache in caches if cache.window is not None]


def test_a_long_prefill_in_chunks_keeps_only_the_window(model: Transformer) -> None:
    reference, kv = whole(model, TEXT), model.new_kv_store()
    for start in range(0, len(TEXT), 7):  # a chunk's first query reads keys from before the chunk
        chunk = TEXT[start : start + 7]
        (logits,) = run(model, kv, [(SequenceSlice(1, start, len(chunk)), chunk)])
        torch.testing.assert_close(logits, reference[start : start + len(chunk)], atol=1e-4, rtol=1e-4)
    caches = kv.caches_of(1)
    assert caches is not None and all(cache.length == len(TEXT) for cache in caches)
    for cache in caches:
        if cache.window is None:  # a full layer keeps every position
            assert cache.start == 0
        else:  # the window before the last chunk, a quantum to drop, and the chunk
            assert len(TEXT) - cache.start <= WINDOW + 16 + 7 and cache.keys.shape[2] <= 48
    assert windowed(kv, 1)


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
@torch.inference_mode()
def test_chunks_then_decoding_past_several_windows_match_transformers(
    kind: str, tiny_model_factory: TinyModelFactory
) -> None:
    """The reference nobody here wrote: transformers' own sliding-window attention over the whole text."""
    transformers = pytest.importorskip("transformers")
    folder = tiny_model_factory(kind)
    source = resolve_model(str(folder))
    ours = load_transformer(
        source.weights, source.config, 0, source.config.n_layers, with_embedding=True, with_head=True,
        dtype=torch.float32,
    )  # fmt: skip
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(TEXT)
    expected = reference(ids[None], attention_mask=torch.ones(1, len(TEXT), dtype=torch.long)).logits[0].float()
    kv = ours.new_kv_store()
    steps = [(start, start + 10) for start in range(0, 60, 10)] + [(p, p + 1) for p in range(60, len(TEXT))]
    for start, end in steps:
        (logits,) = run(ours, kv, [(SequenceSlice(1, start, end - start), TEXT[start:end])])
        torch.testing.assert_close(
            logits, expected[start:end], atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=0
        )
    assert all(cache.start >= len(TEXT) - steady_capacity(WINDOW) for cache in windowed(kv, 1))


def test_decoding_past_several_windows(model: Transformer) -> None:
    reference, kv = whole(model, TEXT), model.new_kv_store()
    run(model, kv, [(SequenceSlice(1, 0, 10), TEXT[:10])])
    for position in range(10, len(TEXT)):
        (logits,) = run(model, kv, [(SequenceSlice(1, position, 1), [TEXT[position]])])
        torch.testing.assert_close(logits[0], reference[position], atol=1e-4, rtol=1e-4)
        assert all(cache.keys.shape[2] <= steady_capacity(WINDOW) for cache in windowed(kv, 1))
    assert all(cache.start >= len(TEXT) - steady_capacity(WINDOW) for cache in windowed(kv, 1))


def test_a_varlen_batch_of_sequences_at_different_positions(model: Transformer) -> None:
    """Prefills and decodes of several sequences in one step, some past the window, some not."""
    texts = {1: TEXT, 2: OTHER, 3: TEXT[5:], 4: OTHER[9:]}
    references = {seq_id: whole(model, tokens) for seq_id, tokens in texts.items()}
    kv = model.new_kv_store()
    held = {1: 100, 2: 40, 3: 0, 4: 5}
    for seq_id, n in held.items():
        for start in range(0, n, 16):
            end = min(start + 16, n)
            run(model, kv, [(SequenceSlice(seq_id, start, end - start), texts[seq_id][start:end])])
    for step in range(30):
        sizes = {1: 1, 2: 20 if step == 0 else 1, 3: 20 if step == 0 else 1, 4: 1}
        pieces = [(SequenceSlice(s, held[s], sizes[s]), texts[s][held[s] : held[s] + sizes[s]]) for s in texts]
        for (piece, _), logits in zip(pieces, run(model, kv, pieces), strict=True):
            expected = references[piece.seq_id][piece.start_pos : piece.start_pos + piece.n_tokens]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        held = {s: held[s] + sizes[s] for s in held}
    assert all(min(cache.start for cache in windowed(kv, seq_id)) > 0 for seq_id in texts)


@pytest.mark.parametrize("padded", [True, False])
def test_sequences_decoding_together_through_the_window(
    model: Transformer, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode-only steps: padded into one pass while under the window (on a CPU, while short), one by one past it."""
    from cake_py.models import llama

    monkeypatch.setattr(llama, "BATCHED_DECODE_MAX_KEYS", 1024 if padded else 0)
    texts = {1: TEXT, 2: OTHER[3:]}
    references = {seq_id: whole(model, tokens) for seq_id, tokens in texts.items()}
    kv = model.new_kv_store()
    held = {1: 2, 2: 7}
    for seq_id, n in held.items():
        run(model, kv, [(SequenceSlice(seq_id, 0, n), texts[seq_id][:n])])
    for _ in range(60):
        pieces = [(SequenceSlice(s, held[s], 1), texts[s][held[s] : held[s] + 1]) for s in texts]
        for (piece, _), logits in zip(pieces, run(model, kv, pieces), strict=True):
            torch.testing.assert_close(logits[0], references[piece.seq_id][piece.start_pos], atol=1e-4, rtol=1e-4)
        held = {s: held[s] + 1 for s in held}
    assert all(min(cache.start for cache in windowed(kv, seq_id)) > 0 for seq_id in texts)


def test_a_copy_of_a_prompt_longer_than_the_window(model: Transformer) -> None:
    """Choices of an n > 1 request copy their leader's prefill; a windowed layer's copy needs the window before it,
    and a copy its source can no longer serve is refused, never made wrong."""
    reference, kv = whole(model, TEXT), model.new_kv_store()
    run(model, kv, [(SequenceSlice(1, 0, 60), TEXT[:60])])
    (logits,) = run(model, kv, [(SequenceSlice(2, 59, 1, copy_from=1), TEXT[59:60])])
    torch.testing.assert_close(logits[0], reference[59], atol=1e-4, rtol=1e-4)
    assert all(cache.keys.shape[2] <= steady_capacity(WINDOW) for cache in windowed(kv, 2))
    for position in range(60, 100):  # both go on, past more windows
        pieces = [(SequenceSlice(seq_id, position, 1), [TEXT[position]]) for seq_id in (1, 2)]
        for logits in run(model, kv, pieces):
            torch.testing.assert_close(logits[0], reference[position], atol=1e-4, rtol=1e-4)
    late = SequenceSlice(3, 59, 1, copy_from=1)  # the source's windowed layers dropped positions 43-58
    with pytest.raises(ValueError, match="copy of 59 positions of sequence 1, which holds 100"):
        kv.check_copy(late)
    with pytest.raises(ValueError, match="cannot copy 59 positions of sequence 1"):
        run(model, kv, [(late, TEXT[59:60])])
    recent = SequenceSlice(4, 99, 1, copy_from=1)
    kv.check_copy(recent)
    (logits,) = run(model, kv, [(recent, TEXT[99:100])])
    torch.testing.assert_close(logits[0], reference[99], atol=1e-4, rtol=1e-4)


def test_speculative_rollback_across_a_drop(model: Transformer) -> None:
    """Drafts written past a drop and rejected are rewritten from one past the last write's start: that never
    reads a dropped position. A write further back is refused; a write at 0 starts the sequence over."""
    kv = model.new_kv_store()
    run(model, kv, [(SequenceSlice(1, 0, 45), TEXT[:45])])
    drafts = TEXT[45:46] + OTHER[:4]  # the last token and four guesses, crossing a drop quantum
    start_before = min(cache.start for cache in windowed(kv, 1))
    run(model, kv, [(SequenceSlice(1, 45, 5), drafts)])
    assert min(cache.start for cache in windowed(kv, 1)) > start_before  # this very write dropped positions
    final = TEXT[:46] + OTHER[:1] + OTHER[50:60]  # one guess kept, then a different token: rewritten from 47
    reference = whole(model, final)
    (logits,) = run(model, kv, [(SequenceSlice(1, 47, len(final) - 47), final[47:])])
    torch.testing.assert_close(logits, reference[47:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="reads from 15"):  # positions 15-31 are gone
        run(model, kv, [(SequenceSlice(1, 30, 1), [7])])
    (logits,) = run(model, kv, [(SequenceSlice(1, 0, 40), OTHER[:40])])  # computed again from its first token
    torch.testing.assert_close(logits, whole(model, OTHER[:40]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [16, 1024])
def test_a_windowed_cache_stays_bounded_over_thousands_of_steps(window: int) -> None:
    cache = LayerCache(1, 1, torch.float32, torch.device("cpu"), window)
    steady = steady_capacity(window)
    for start in range(0, 4096, 512):  # a long prefill in chunks first
        cache.update(torch.zeros(1, 1, 512, 1), torch.zeros(1, 1, 512, 1), start)
    capacities = set()
    for position in range(4096, 4096 + 3000):
        cache.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), position)
        capacities.add(cache.keys.shape[2])
    assert max(capacities) == steady == window + (15 if window == 16 else 255) + 1
    assert cache.length - cache.start <= steady


def test_the_positions_held_are_the_ones_written_whatever_the_order_of_writes() -> None:
    """Random chunks, decodes, rewinds (drafts rejected, a step run again), restarts and copies: every write reads
    exactly the window before it, and whatever is refused is a write or copy that would need dropped positions."""
    rng = random.Random(5)
    store = KVStore(2, 1, 1, torch.float32, torch.device("cpu"), windows=[8, None])
    value = {1: list[float]()}  # per sequence, the value written at each position (keys hold it)
    last_start = {1: 0}
    for _ in range(3000):
        seq_id = rng.choice(list(value))
        length = len(value[seq_id])
        roll = rng.random()
        if roll < 0.05 and length > 1:  # a copy of a prefix, into a new sequence
            n, new = rng.randrange(1, length + 1), max(value) + 1
            can = kept_from(8, last_start[seq_id]) <= kept_from(8, n)
            piece = SequenceSlice(new, n, 1, copy_from=seq_id)
            if not can:
                with pytest.raises(ValueError):
                    store.check_copy(piece)
                continue
            store.check_copy(piece)
            store.for_batch([piece])
            value[new], last_start[new] = value[seq_id][:n], n
            continue
        start = 0 if roll < 0.07 else max(last_start[seq_id], length - rng.randrange(0, 5))  # a rewind at most
        t = rng.choice([1, 1, 1, 3, 5, 12])
        new_values = [rng.random() for _ in range(t)]
        caches = store.for_batch([SequenceSlice(seq_id, start, t)])[0]
        written = torch.tensor(new_values).view(1, 1, t, 1)
        value[seq_id] = value[seq_id][:start] + new_values
        last_start[seq_id] = start
        for cache in caches:
            keys, _ = cache.update(written, written, start)
            first = first_read(cache.window, start)
            assert keys.flatten().tolist() == pytest.approx(value[seq_id][first:])
            if cache.window is not None:  # the window, a quantum to drop and the longest write (12), in quanta
                assert cache.keys.shape[2] <= 32
        with pytest.raises(ValueError, match="reads from"):
            earlier = kept_from(8, start) - 1
            if earlier < 1:
                raise ValueError("reads from: nothing dropped yet")
            caches[0].update(written[:, :, :1], written[:, :, :1], earlier + 7)
