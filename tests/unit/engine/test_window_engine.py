"""The engine on a model whose sliding-window layers keep only their window: kept prefixes, choices sharing a
prefill and speculative drafts give what the same engine gives without them (tokens, and their logprobs to float
precision), a copy the caches can no longer serve is never offered, and kept caches count what they take."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pytest
import torch

from cake_py.cluster.pipeline import local_pipeline
from cake_py.cluster.stage import LocalStage
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.hub import resolve_model
from cake_py.models.sampling import SamplingParams
from tests.conftest import TinyModelFactory

WINDOW = 16  # the tiny models' window (tests/fixtures/tiny_models.py), dropped 16 positions at a time
GREEDY = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, logprobs=True)
HISTORY = [5 + (i * 13) % 300 for i in range(40)]


@pytest.fixture(params=["mistral", "gemma3"])  # every layer windowed; a full layer between windowed ones
def make(request: pytest.FixtureRequest, tiny_model_factory: TinyModelFactory) -> Iterator:  # type: ignore[type-arg]
    source = resolve_model(str(tiny_model_factory(request.param)))
    made: list[Engine] = []

    def factory(**options: int) -> Engine:
        engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_batch_tokens=16, **options)
        engine.start()
        made.append(engine)
        return engine

    yield factory
    for engine in made:
        engine.close()


Answer = list[tuple[int, float]]


def answer(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> tuple[Answer, GenerationEvent]:
    """The tokens and their logprobs, and the last event."""
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    engine.submit(prompt, params, events.put)
    return collect(events)


def collect(events: queue.SimpleQueue[GenerationEvent]) -> tuple[Answer, GenerationEvent]:
    out: Answer = []
    while True:
        event = events.get(timeout=120)
        assert event.error is None, event.error
        out += [(token.token_id, token.logprob or 0.0) for token in event.tokens]
        if event.finished:
            return out, event


def same(got: Answer, expected: Answer) -> None:
    assert [token for token, _ in got] == [token for token, _ in expected]
    assert [logprob for _, logprob in got] == pytest.approx([logprob for _, logprob in expected], abs=1e-4)


def wait_idle(engine: Engine) -> None:
    for _ in range(500):
        if engine.in_flight == 0:
            return
        threading.Event().wait(0.02)


def stage_caches(engine: Engine, seq_id: int) -> list:  # type: ignore[type-arg]
    stage = engine.pipeline.stages[0]
    assert isinstance(stage, LocalStage)
    caches = stage.kv.caches_of(seq_id)
    assert caches is not None
    return caches


def test_a_chat_turn_past_the_window_copies_the_kept_window_exactly(make) -> None:  # type: ignore[no-untyped-def]
    cached, plain = make(prefix_cache_tokens=4096), make()
    first, _ = answer(cached, HISTORY)
    same(first, answer(plain, HISTORY)[0])
    wait_idle(cached)
    (kept,) = list(cached.prefix_cache._entries)  # noqa: SLF001
    assert max(cache.start for cache in stage_caches(cached, kept)) > WINDOW  # it dropped positions
    second = HISTORY + [token for token, _ in first] + [7, 8, 9]
    got, last = answer(cached, second)
    same(got, answer(plain, second)[0])
    assert last.cached_tokens == len(HISTORY) + len(first) - 1  # all it held (its last token was never fed)


def test_a_prefix_the_kept_caches_dropped_is_never_offered(make) -> None:  # type: ignore[no-untyped-def]
    """A prompt sharing only the start of a kept conversation: its windowed layers no longer hold the window before
    that prefix, so it is computed whole, and no step fails on a copy the stage refuses (that would drop every kept
    cache)."""
    cached, plain = make(prefix_cache_tokens=4096), make()
    answer(cached, HISTORY)
    wait_idle(cached)
    (kept,) = list(cached.prefix_cache._entries)  # noqa: SLF001
    prompt = HISTORY[:30] + [1, 2, 3]
    assert cached.prefix_cache.match(prompt) is None
    got, last = answer(cached, prompt)
    same(got, answer(plain, prompt)[0])
    assert last.cached_tokens == 0 and kept in cached.prefix_cache  # nothing was copied, nothing failed


def test_kept_caches_count_what_the_stages_take(make) -> None:  # type: ignore[no-untyped-def]
    cached = make(prefix_cache_tokens=4096)
    answer(cached, HISTORY)
    wait_idle(cached)
    (kept,) = list(cached.prefix_cache._entries)  # noqa: SLF001
    caches = stage_caches(cached, kept)
    taken = -(-sum(cache.keys.shape[2] for cache in caches) // len(caches))  # per layer, as the budget counts
    assert cached.prefix_cache.positions == taken
    assert taken < 256  # what the same conversation's caches took when every layer kept every position


def test_choices_share_a_prefill_longer_than_the_window(make) -> None:  # type: ignore[no-untyped-def]
    engine, plain = make(), make()
    expected, _ = answer(plain, HISTORY)
    streams = [queue.SimpleQueue[GenerationEvent]() for _ in range(3)]
    leader = engine.submit(HISTORY, GREEDY, streams[0].put)
    for stream in streams[1:]:
        engine.submit(HISTORY, GREEDY, stream.put, share_prefill_with=leader)
    for stream in streams:
        same(collect(stream)[0], expected)
    assert engine.stats.prompt_tokens == len(HISTORY) + 2  # each choice computed only the prompt's last token


def test_a_choice_whose_leader_went_past_the_window_prefills_alone(make) -> None:  # type: ignore[no-untyped-def]
    """A choice that starts after its leader decoded on (its windowed layers dropped the window before the prompt's
    end) cannot copy the prefill: it computes it, and gives the same answer."""
    engine, plain = make(), make()
    expected, _ = answer(plain, HISTORY)
    leader_events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    choice_events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    ids: list[int] = []
    generated = [0]

    def leader_sink(event: GenerationEvent) -> None:  # runs on the engine thread, between steps
        generated[0] += len(event.tokens)
        if generated[0] >= 2 * WINDOW and not ids[1:]:
            ids.append(engine.submit(HISTORY, GREEDY, choice_events.put, share_prefill_with=ids[0]))
        leader_events.put(event)

    ids.append(engine.submit(HISTORY, GREEDY, leader_sink))
    same(collect(leader_events)[0], expected)
    same(collect(choice_events)[0], expected)
    assert engine.stats.prompt_tokens == 2 * len(HISTORY)


def test_speculation_across_drops_gives_the_tokens_of_one_at_a_time(make) -> None:  # type: ignore[no-untyped-def]
    """Drafts rejected and rewritten while the windows drop positions (sampled: 77 mostly, not always)."""
    params = SamplingParams(
        max_tokens=150, ignore_eos=True, temperature=0.9, seed=7, logit_bias=((77, 8.0),), logprobs=True
    )
    plain, speculative = make(), make(speculative_tokens=4)
    prompt = [77, 12, 77, 77, 13] * 8
    expected, _ = answer(plain, prompt, params)
    got, _ = answer(speculative, prompt, params)
    same(got, expected)
    stats = speculative.stats
    assert 0 < stats.accepted_draft_tokens < stats.draft_tokens and stats.steps < plain.stats.steps


def test_a_kept_entry_serves_only_prefixes_whose_window_it_still_holds() -> None:
    from cake_py.engine.prefix_cache import PrefixCache

    cache = PrefixCache(10_000, min_match=4, quantum=1, window=WINDOW)
    assert cache.add(1, list(range(100)), kept_from=80) == []
    assert cache.match([*range(100), 500]) == (1, 100)  # a copy of 100 positions needs those from 80 on
    assert cache.match([*range(90), 500]) is None  # one of 90 needs those from 64 on: dropped
    # A shorter conversation that dropped less is kept beside it (it serves what the longer one cannot) ...
    assert cache.add(2, list(range(50)), kept_from=32) == []
    assert cache.match([*range(50), 500]) == (2, 50)
    # ... and a continuation that dropped more replaces neither; one that holds all and dropped no more does.
    assert cache.add(3, list(range(120)), kept_from=96) == [] and len(cache) == 3
    assert cache.add(4, list(range(60)), kept_from=32) == [2]
    assert cache.add(5, list(range(40)), kept_from=16) == []  # 4 holds its tokens, not the window before them
    without = PrefixCache(10_000, min_match=4, quantum=1)  # no window: as before, whatever kept_from says
    assert without.add(1, list(range(100))) == [] and without.match([*range(30), 500]) == (1, 30)
