"""Prefix caching: which finished sequences are kept and matched, and an engine that copies their caches for a
later prompt with the same start gives the tokens it gives without them, computing fewer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cake_py.cluster.pipeline import local_pipeline
from cake_py.engine.engine import Engine
from cake_py.engine.prefix_cache import PrefixCache
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.hub import resolve_model
from cake_py.models.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_the_longest_shared_prefix_wins_and_leaves_the_last_prompt_token() -> None:
    cache = PrefixCache(1000, min_match=4, quantum=1)
    assert cache.add(1, list(range(10))) == []
    assert cache.add(2, [0, 1, 2, 3, 4, 99, 98, 97]) == []
    assert cache.match(list(range(20))) == (1, 10)
    assert cache.match([0, 1, 2, 3, 4, 99, 98, 97, 96]) == (2, 8)
    assert cache.match(list(range(10))) == (1, 9)  # the prompt's last token is computed: its logits are needed
    assert cache.match([0, 1, 2, 7, 7, 7]) is None  # 3 shared < min_match
    assert cache.match([5, 6, 7, 8, 9, 10]) is None


def test_entries_are_bounded_by_tokens_least_recently_used_first() -> None:
    cache = PrefixCache(25, min_match=4, quantum=1)
    assert cache.add(1, [1] * 10) == []
    assert cache.add(2, [2] * 10) == []
    cache.match([1] * 12)  # 1 is used: 2 is now the oldest
    assert cache.add(3, [3] * 10) == [2]
    assert (1 in cache, 2 in cache, 3 in cache, cache.tokens) == (True, False, True, 20)
    assert cache.add(4, [4] * 30) == [4]  # larger than the whole budget: not kept
    assert cache.add(5, [5, 5]) == [5]  # shorter than min_match
    assert sorted(cache.clear()) == [1, 3] and cache.tokens == 0


def test_the_budget_counts_positions_in_the_stages_whole_blocks() -> None:
    cache = PrefixCache(1024, min_match=4)  # blocks of 256 positions, as the stages hold caches
    assert cache.add(1, [1] * 17) == [] and cache.positions == 256 and cache.tokens == 17
    assert cache.add(2, [2] * 300) == [] and cache.positions == 768
    assert cache.add(3, [3] * 257) == [1]  # 512 more: the oldest goes
    assert (cache.positions, cache.tokens) == (1024, 557)
    assert cache.add(4, [4] * 1025) == [4]  # more than the whole budget


def test_a_continuation_replaces_the_entry_it_extends() -> None:
    cache = PrefixCache(1000, min_match=4, quantum=1)
    cache.add(1, list(range(10)))
    assert cache.add(2, list(range(15))) == [1]  # the second turn holds all the first held
    assert cache.add(3, list(range(12))) == [3]  # already held by 2
    assert len(cache) == 1 and cache.tokens == 15


def test_idle_entries_expire() -> None:
    cache = PrefixCache(1000, min_match=4, idle_seconds=0.0, quantum=1)
    cache.add(7, list(range(10)))
    assert cache.expired() == [7]
    assert cache.match(list(range(20))) is None


@pytest.fixture
def model_source(tiny_model_factory):  # type: ignore[no-untyped-def]
    return resolve_model(str(tiny_model_factory("llama")))


@pytest.fixture
def engines(model_source) -> Iterator[tuple[Engine, Engine]]:  # type: ignore[no-untyped-def]
    """(with prefix caching, without): the same model, prefill in chunks of 64 tokens."""
    pair = []
    for tokens in (4096, 0):
        engine = Engine(
            local_pipeline(model_source, torch.float32),
            model_source.tokenizer,
            max_batch_tokens=64,
            prefix_cache_tokens=tokens,
        )
        engine.start()
        pair.append(engine)
    yield pair[0], pair[1]
    for engine in pair:
        engine.stop()


def _tokens(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    out: list[int] = []
    for event in engine.generate(prompt, params):
        assert event.error is None, event.error
        out += [token.token_id for token in event.tokens]
    return out


def _wait_idle(engine: Engine) -> None:
    for _ in range(200):
        if engine.in_flight == 0:
            return
        threading.Event().wait(0.02)


def test_a_chat_turn_reuses_the_previous_turns_caches_and_answers_the_same(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    history = [5 + (i * 13) % 300 for i in range(150)]  # three prefill chunks
    first = _tokens(cached, history)
    assert first == _tokens(plain, history)
    _wait_idle(cached)
    computed_before = cached.stats.prompt_tokens
    second_turn = history + first + [7, 8, 9, 10]
    assert _tokens(cached, second_turn) == _tokens(plain, second_turn)
    reused = cached.stats.prefix_cached_tokens
    assert reused == len(history) + len(first) - 1  # the first turn's cached tokens (its last token was never fed)
    assert cached.stats.prompt_tokens - computed_before == len(second_turn) - reused
    assert plain.stats.prefix_cached_tokens == 0
    # A different conversation shares nothing and is computed whole.
    other = [380 - i for i in range(40)]
    assert _tokens(cached, other) == _tokens(plain, other)
    assert cached.stats.prefix_cached_tokens == reused


def test_a_kept_cache_a_stage_lost_is_dropped_and_the_prompt_computed_whole(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    prompt = [9 + (i * 7) % 250 for i in range(80)]
    _tokens(cached, prompt)
    _wait_idle(cached)
    (kept,) = list(cached.prefix_cache._entries)  # noqa: SLF001
    cached.pipeline.release([kept])  # the stage forgot it (a worker's idle timeout, or a restart)
    longer = prompt + [3, 4, 5, 6]
    assert _tokens(cached, longer) == _tokens(plain, longer)
    assert kept not in cached.prefix_cache
    assert cached.stats.prefix_cached_tokens == 0


def test_sampled_and_concurrent_requests_with_a_shared_system_prompt(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    system = [11 + (i * 5) % 200 for i in range(70)]
    _tokens(cached, system + [1, 2])
    _wait_idle(cached)
    questions = [system + [20 + q, 30 + q, 40 + q] for q in range(3)]
    seeded = SamplingParams(temperature=0.9, max_tokens=10, seed=3, ignore_eos=True)
    expected = [_tokens(plain, q, seeded) for q in questions]
    results: dict[int, list[int]] = {}

    def ask(index: int) -> None:
        results[index] = _tokens(cached, questions[index], seeded)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[index] for index in range(len(questions))] == expected
    assert cached.stats.prefix_cached_tokens >= 3 * len(system)


def test_the_serve_flag_sets_the_budget(tmp_path: Path) -> None:
    from cake_py.cli import _serve_settings as serve_settings
    from cake_py.cli import build_parser

    args = build_parser().parse_args(["serve", str(tmp_path), "--prefix-cache-tokens", "0"])
    assert serve_settings(args).prefix_cache_tokens == 0
    default = build_parser().parse_args(["serve", str(tmp_path)])
    assert serve_settings(default).prefix_cache_tokens == 8192


class _FailingCopies:
    """Wraps a pipeline: counts forward calls and fails those that copy a kept prefix, or every call of `poison`."""

    def __init__(self, engine: Engine, poison: int | None = None) -> None:
        self.calls = self.failures = 0
        self.poison = poison
        real = engine.pipeline.run

        def run(ids, batch, rows, hidden_rows=()):  # type: ignore[no-untyped-def]
            self.calls += 1
            copying = any(p.copy_from is not None for p in batch)
            if (self.poison is None and copying) or (self.poison is not None and int(ids[-1]) == self.poison):
                self.failures += 1
                raise RuntimeError("the stage lost its caches" if self.poison is None else "out of memory")
            return real(ids, batch, rows, hidden_rows)

        engine.pipeline.run = run  # type: ignore[method-assign]


def _kept_chats(engine: Engine, system: list[int], count: int) -> None:
    for index in range(count):
        _tokens(engine, system + [20 + index, 30 + index], SamplingParams(temperature=0.0, max_tokens=2))
        _wait_idle(engine)


def test_a_stage_that_lost_every_kept_cache_costs_one_failed_step(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    system = [11 + (i * 5) % 200 for i in range(40)]
    _kept_chats(cached, system, 6)
    assert len(cached.prefix_cache) == 6
    failing = _FailingCopies(cached)
    question = system + [99, 98]
    assert _tokens(cached, question) == _tokens(plain, question)
    assert failing.failures == 1  # not one per kept entry
    assert len(cached.prefix_cache) <= 1  # all dropped (the answer just given may be kept anew)


def test_an_unrelated_failure_in_a_copying_step_is_reported_after_one_retry(engines: tuple[Engine, Engine]) -> None:
    cached, _ = engines
    system = [13 + (i * 3) % 200 for i in range(40)]
    _kept_chats(cached, system, 6)
    failing = _FailingCopies(cached, poison=77)
    events = list(cached.generate(system + [76, 77], GREEDY))
    assert events[-1].error is not None and "out of memory" in events[-1].error
    assert failing.failures == 2  # the copying step, then the same step without copies: the real error


def test_kept_caches_are_exactly_those_the_stages_hold(model_source) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(
        local_pipeline(model_source, torch.float32),
        model_source.tokenizer,
        prefix_cache_tokens=512,
    )
    engine.start()
    try:
        stage = engine.pipeline.stages[0]
        for index in range(4):  # 256 positions each: a 512 budget keeps two
            _tokens(engine, [40 + index] * 30, SamplingParams(temperature=0.0, max_tokens=3))
            _wait_idle(engine)
            assert sorted(stage.kv.sequence_ids()) == sorted(engine.prefix_cache._entries)  # type: ignore[attr-defined]  # noqa: SLF001
        assert len(engine.prefix_cache) == 2
        cancelled = engine.generate([60] * 30, SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        next(cancelled)
        cancelled.close()  # a cancelled answer is not kept
        _wait_idle(engine)
        for _ in range(100):
            if sorted(stage.kv.sequence_ids()) == sorted(engine.prefix_cache._entries):  # type: ignore[attr-defined]  # noqa: SLF001
                break
            threading.Event().wait(0.02)
        assert len(engine.prefix_cache) == 2
        assert sorted(stage.kv.sequence_ids()) == sorted(engine.prefix_cache._entries)  # type: ignore[attr-defined]  # noqa: SLF001
    finally:
        engine.stop()
    assert stage.kv.sequence_ids() == []  # type: ignore[attr-defined]  # stopping releases what was kept


def test_choices_of_a_prompt_a_kept_cache_covers_copy_it_in_one_step(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    prompt = [17 + (i * 9) % 300 for i in range(60)]
    _tokens(cached, prompt)  # kept: the prompt and its answer
    _wait_idle(cached)
    failing = _FailingCopies(cached, poison=-1)  # counts forward calls; fails none
    seeded = [SamplingParams(temperature=0.9, max_tokens=6, seed=seed, ignore_eos=True) for seed in range(3)]

    def choices(engine: Engine) -> list[list[int]]:
        sinks: list[queue.SimpleQueue[GenerationEvent]] = [queue.SimpleQueue() for _ in seeded]
        leader = None
        with engine.submitting():
            for params, sink in zip(seeded, sinks, strict=True):
                seq_id = engine.submit(prompt, params, sink.put, share_prefill_with=leader)
                leader = leader or seq_id
        out = []
        for sink in sinks:
            events = [sink.get(timeout=60)]
            while not events[-1].finished:
                events.append(sink.get(timeout=60))
            assert events[-1].error is None, events[-1].error
            out.append([token.token_id for event in events for token in event.tokens])
        return out

    before = cached.stats.prefix_cached_tokens
    assert choices(cached) == choices(plain)
    assert failing.failures == 0
    # Each choice copies the kept cache itself: a worker checks every copy of a step before it makes any, so one
    # copying the leader, which holds nothing yet, would fail the step (and drop every kept cache).
    assert cached.stats.prefix_cached_tokens - before == len(seeded) * (len(prompt) - 1)


def test_the_budget_counts_what_the_stages_caches_really_take(tiny_llama_long_context: Path) -> None:
    """A cache grows by doubling: 600 tokens take 1,024 positions, and were charged 768 (a kept cache could take
    twice the budget). A cache copied from a kept one takes just enough."""
    source = resolve_model(str(tiny_llama_long_context))
    pipeline = local_pipeline(source, torch.float32)
    engine = Engine(pipeline, source.tokenizer, max_batch_tokens=64, prefix_cache_tokens=4096)
    engine.start()
    try:
        stage = engine.pipeline.stages[0]

        def held() -> int:  # positions the stage's caches of kept sequences take (each layer the same)
            return sum(stage.kv.caches_of(seq_id)[0].keys.shape[2] for seq_id in engine.prefix_cache._entries)  # type: ignore[attr-defined]  # noqa: SLF001

        prompt = [40 + index % 50 for index in range(300)]
        answer = _tokens(engine, prompt, SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True))
        _wait_idle(engine)
        assert held() == 1024 and engine.prefix_cache.positions == 1024
        _tokens(engine, [*prompt, *answer, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
        _wait_idle(engine)
        assert len(engine.prefix_cache) == 1 and held() == engine.prefix_cache.positions == 768  # copied: 599 + 9
    finally:
        engine.stop()
