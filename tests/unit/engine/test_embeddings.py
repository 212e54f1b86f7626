"""Embeddings through the engine: a prompt's final hidden states pooled (last token or mean), equal to transformers'
`last_hidden_state` pooled the same way, whatever the steps its prefill is cut into, batched with generations, and
never kept by the prefix cache."""

from __future__ import annotations

import queue
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cake_py.cluster.pipeline import local_pipeline
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.errors import ContextLengthError, RequestError
from cake_py.models.hub import resolve_model
from cake_py.models.pooling import Pooling, folder_pooling
from cake_py.models.sampling import SamplingParams
from tests.fixtures.tiny_models import KINDS

transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 9, 33, 8, 61, 2, 70, 11, 4, 19, 27, 3, 50, 6, 44, 12, 38, 7]


def embed_params(kind: str = "last", normalize: bool = True) -> SamplingParams:
    return SamplingParams(max_tokens=0, pooling=Pooling(kind, normalize))


def reference_embedding(folder: Path, ids: list[int], kind: str, normalize: bool = True) -> torch.Tensor:
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).last_hidden_state
    vector = hidden[0, -1] if kind == "last" else hidden[0].mean(0)
    return torch.nn.functional.normalize(vector, dim=0) if normalize else vector


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.tensor(struct.unpack(f"<{len(data) // 4}f", data))


@pytest.fixture
def engine_factory(tiny_model_factory) -> Iterator:  # type: ignore[no-untyped-def]
    engines: list[Engine] = []

    def make(kind: str = "llama", **options: int) -> Engine:
        source = resolve_model(str(tiny_model_factory(kind)))
        engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def run(engine: Engine, ids: list[int], params: SamplingParams) -> list[GenerationEvent]:
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    engine.submit(ids, params, events.put)
    out = [events.get(timeout=60)]
    while not out[-1].finished:
        out.append(events.get(timeout=60))
    return out


def embedding(engine: Engine, ids: list[int], params: SamplingParams) -> torch.Tensor:
    events = run(engine, ids, params)
    assert len(events) == 1 and events[0].finish_reason == "stop" and events[0].error is None
    assert events[0].embedding is not None and events[0].tokens == [] and events[0].completion_tokens == 0
    assert events[0].prompt_tokens == len(ids)
    return as_tensor(events[0].embedding)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_equal_transformers_last_hidden_state(engine_factory, tiny_model_factory, kind, pooling) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory(kind)
    ours = embedding(engine, PROMPT, embed_params(pooling))
    expected = reference_embedding(tiny_model_factory(kind), PROMPT, pooling)
    torch.testing.assert_close(ours, expected, rtol=0.0, atol=1e-5)
    assert abs(ours.norm().item() - 1.0) < 1e-5


def test_unnormalized_embeddings_keep_their_length(engine_factory, tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    ours = embedding(engine, PROMPT, embed_params("mean", normalize=False))
    expected = reference_embedding(tiny_model_factory("llama"), PROMPT, "mean", normalize=False)
    torch.testing.assert_close(ours, expected, rtol=0.0, atol=1e-5)
    assert abs(ours.norm().item() - 1.0) > 1e-3


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_prompt_prefilled_over_several_steps_pools_the_same(engine_factory, pooling) -> None:  # type: ignore[no-untyped-def]
    whole = embedding(engine_factory(), PROMPT, embed_params(pooling))
    chunked = embedding(engine_factory(max_batch_tokens=6), PROMPT, embed_params(pooling))  # 20 tokens: 4 steps
    torch.testing.assert_close(chunked, whole, rtol=0.0, atol=1e-5)


def test_embeddings_batch_with_generations_without_changing_them(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    alone = [t.token_id for event in run(engine, PROMPT[:7], greedy) for t in event.tokens]
    expected = {pooling: embedding(engine, PROMPT, embed_params(pooling)) for pooling in ("last", "mean")}
    events: dict[str, queue.SimpleQueue[GenerationEvent]] = {name: queue.SimpleQueue() for name in ("gen", *expected)}
    with engine.submitting():  # one step holds all three
        engine.submit(PROMPT[:7], greedy, events["gen"].put)
        for pooling in expected:
            engine.submit(PROMPT, embed_params(pooling), events[pooling].put)
    for pooling, vector in expected.items():
        event = events[pooling].get(timeout=60)
        assert event.embedding is not None
        torch.testing.assert_close(as_tensor(event.embedding), vector, rtol=0.0, atol=1e-5)
    together: list[int] = []
    while True:
        event = events["gen"].get(timeout=60)
        together += [t.token_id for t in event.tokens]
        if event.finished:
            break
    assert together == alone


def test_embeddings_are_not_kept_but_a_kept_chat_prefix_serves_last_pooling(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory(prefix_cache_tokens=4096)
    plain = embedding(engine_factory(), PROMPT, embed_params("last"))
    embedding(engine, PROMPT, embed_params("mean"))
    assert len(engine.prefix_cache) == 0  # an embedding is not kept
    run(engine, PROMPT[:18], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert len(engine.prefix_cache) == 1
    copied = engine.stats.prefix_cached_tokens
    torch.testing.assert_close(embedding(engine, PROMPT, embed_params("last")), plain, rtol=0.0, atol=1e-5)
    assert engine.stats.prefix_cached_tokens - copied == 18  # the kept chat's prompt: its answer differs from PROMPT
    before = engine.stats.prefix_cached_tokens
    embedding(engine, PROMPT, embed_params("mean"))  # mean reads every row: it never copies
    assert engine.stats.prefix_cached_tokens == before


def test_an_embedding_may_fill_the_whole_context(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory(context_length=20)
    assert len(embedding(engine, PROMPT, embed_params())) == engine.pipeline.config.hidden_size
    with pytest.raises(ContextLengthError):
        engine.submit(PROMPT, SamplingParams(max_tokens=1), lambda event: None)
    with pytest.raises(ContextLengthError):
        engine.submit([*PROMPT, 1], embed_params(), lambda event: None)


def test_bad_pooling_settings_are_named() -> None:
    with pytest.raises(RequestError, match="'cls'"):
        Pooling("cls")
    with pytest.raises(RequestError, match="max_tokens must be 0"):
        SamplingParams(max_tokens=3, pooling=Pooling())


def test_a_sentence_transformers_folder_says_how_it_pools(tmp_path: Path) -> None:
    assert folder_pooling(tmp_path) is None
    (tmp_path / "1_Pooling").mkdir()
    config = tmp_path / "1_Pooling" / "config.json"
    config.write_text('{"word_embedding_dimension": 64, "pooling_mode_lasttoken": true}')
    assert folder_pooling(tmp_path) == "last"
    config.write_text('{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}')
    assert folder_pooling(tmp_path) == "mean"
    config.write_text('{"pooling_mode_cls_token": true}')
    assert folder_pooling(tmp_path) is None  # not run here: --pooling decides, with a warning
    config.write_text("not json")
    assert folder_pooling(tmp_path) is None


def test_a_failing_embedding_ends_alone(engine_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A pooling failure (a bug, a device the vector cannot leave) ends that embedding with an error; the generation
    sharing its step goes on as if alone."""
    engine = engine_factory()
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone = [t.token_id for event in run(engine, PROMPT[:7], greedy) for t in event.tokens]

    def broken(self: object) -> bytes:
        raise TypeError("can't convert cuda:0 device type tensor to numpy")

    monkeypatch.setattr("cake_py.models.pooling.PoolingState.result", broken)
    events: dict[str, queue.SimpleQueue[GenerationEvent]] = {"gen": queue.SimpleQueue(), "emb": queue.SimpleQueue()}
    with engine.submitting():
        engine.submit(PROMPT[:7], greedy, events["gen"].put)
        engine.submit(PROMPT, embed_params(), events["emb"].put)
    failed = events["emb"].get(timeout=60)
    assert failed.finish_reason == "error" and failed.error is not None and "pooling" in failed.error
    tokens: list[int] = []
    while True:
        event = events["gen"].get(timeout=60)
        assert event.error is None
        tokens += [t.token_id for t in event.tokens]
        if event.finished:
            break
    assert tokens == alone
