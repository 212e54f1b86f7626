"""The engine: continuous batching gives each sequence the tokens it would get alone; limits, stops, cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch

from cake_py.cluster.pipeline import Pipeline, local_pipeline
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent, Sequence
from cake_py.errors import ClusterError, ContextLengthError, OverloadedError, RequestError
from cake_py.models.hub import resolve_model
from cake_py.models.sampling import SampledToken, Sampler, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_factory) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_batch_tokens=64)
    engine.start()
    yield engine
    engine.stop()


def run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], GenerationEvent]:
    tokens: list[int] = []
    last = None
    for event in engine.generate(prompt, params):
        tokens += [t.token_id for t in event.tokens]
        last = event
    assert last is not None
    return tokens, last


GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def test_concurrent_sequences_match_solo_runs(engine: Engine) -> None:
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 150, 9)]  # 150 > max_batch_tokens: chunked prefill
    solo = [run(engine, p, GREEDY)[0] for p in prompts]
    results: dict[int, list[int]] = {}

    def worker(index: int) -> None:
        results[index] = run(engine, prompts[index], GREEDY)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i] for i in range(len(prompts))] == solo
    assert engine.stats.running + engine.stats.waiting <= len(prompts)


def test_length_finish_and_usage(engine: Engine) -> None:
    tokens, last = run(engine, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert len(tokens) == 7
    assert last.finish_reason == "length"
    assert (last.prompt_tokens, last.completion_tokens) == (3, 7)


def test_stats_count_a_token_before_its_event_is_delivered(engine: Engine) -> None:
    """A client that received its last token and then reads the stats (/metrics, usage checks) must find it."""
    done = threading.Event()
    before = engine.stats.tokens_generated
    seen: list[tuple[int, int]] = []  # (tokens delivered so far, tokens the stats counted at that moment)

    def sink(event: GenerationEvent) -> None:  # runs on the engine thread, as each event is delivered
        delivered = (seen[-1][0] if seen else 0) + len(event.tokens)
        seen.append((delivered, engine.stats.tokens_generated - before))
        if event.finished:
            done.set()

    engine.submit([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), sink)
    assert done.wait(60)
    assert seen[-1][0] == 6
    assert all(counted >= delivered for delivered, counted in seen), seen


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=123, ignore_eos=True)
    assert run(engine, [9, 10, 11], params)[0] == run(engine, [9, 10, 11], params)[0]


def test_stop_string_ends_with_stop_and_is_not_emitted(engine: Engine) -> None:
    text_tokens, _ = run(engine, [5, 6, 7], GREEDY)
    full = engine.tokenizer.decode(text_tokens)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"degenerate generation {full!r}"
    events = list(engine.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=20, stop=(stop,))))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_prompt_longer_than_context_is_refused(engine: Engine) -> None:
    with pytest.raises(ContextLengthError, match="512"):
        engine.submit(list(range(600)), GREEDY, lambda e: None)


def test_a_prompt_that_fills_the_context_is_refused_for_want_of_room(engine: Engine) -> None:
    with pytest.raises(ContextLengthError, match="the prompt has 512 tokens, which fills the model's context of 512 "
                       "tokens: no room is left for the answer"):  # fmt: skip
        engine.check_prompt(512, SamplingParams(max_tokens=8))


def test_max_tokens_is_clipped_to_the_context(engine: Engine) -> None:
    params = engine.check_prompt(500, SamplingParams(max_tokens=2048))
    assert params.max_tokens == 12


def test_cancel_frees_kv_caches(engine: Engine) -> None:
    events = engine.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
    next(events)
    events.close()  # the consumer walks away: generate() cancels its sequence
    stage = engine.pipeline.stages[0]
    for _ in range(200):
        if not stage.kv.sequence_ids() and engine.in_flight == 0:  # type: ignore[attr-defined]
            break
        threading.Event().wait(0.02)
    assert stage.kv.sequence_ids() == []  # type: ignore[attr-defined]
    assert engine.in_flight == 0


# ---- one bad sequence, or a stop, never leaves another request without its answer ----


def test_a_sequence_whose_sampling_fails_ends_alone(
    tiny_model_factory,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    source = resolve_model(str(tiny_model_factory("llama")))
    real_sample = Sampler.sample

    def sample(self: Sampler, logits: torch.Tensor, history: list[int]) -> SampledToken:
        if self.params.seed == 666:
            raise RuntimeError("sampler broke")
        return real_sample(self, logits, history)

    monkeypatch.setattr(Sampler, "sample", sample)
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer)
    events: dict[str, list[GenerationEvent]] = {"good": [], "bad": []}
    done = {name: threading.Event() for name in events}

    def sink(name: str) -> Callable[[GenerationEvent], None]:
        def put(event: GenerationEvent) -> None:
            events[name].append(event)
            if event.finished:
                done[name].set()

        return put

    # Both queued before the engine starts: they share every step.
    engine.submit([5, 6, 7], GREEDY, sink("good"))
    engine.submit([5, 6, 7], SamplingParams(temperature=1.0, seed=666, max_tokens=20), sink("bad"))
    engine.start()
    try:
        assert done["good"].wait(60) and done["bad"].wait(60)
    finally:
        engine.stop()
    assert events["bad"][-1].finish_reason == "error" and "sampler broke" in (events["bad"][-1].error or "")
    good = [t.token_id for event in events["good"] for t in event.tokens]
    assert events["good"][-1].finish_reason == "length" and len(good) == GREEDY.max_tokens


def test_a_sequence_submitted_while_the_engine_stops_gets_an_answer(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    source = resolve_model(str(tiny_model_factory("llama")))
    pipeline = local_pipeline(source, torch.float32)
    in_step, release = threading.Event(), threading.Event()
    real_run = pipeline.run

    def gated_run(*args: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        in_step.set()
        release.wait(30)
        return real_run(*args)  # type: ignore[arg-type]

    pipeline.run = gated_run  # type: ignore[method-assign]
    engine = Engine(pipeline, source.tokenizer)
    engine.start()
    answers: list[GenerationEvent] = []
    engine.submit([5, 6, 7], GREEDY, lambda event: None)
    assert in_step.wait(30)
    engine.submit([8, 9], GREEDY, answers.append)  # queued while a step runs
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    while not engine._stopping:
        threading.Event().wait(0.01)
    release.set()
    stopper.join(timeout=30)
    assert answers and answers[-1].finish_reason == "error" and "engine stopped" in (answers[-1].error or "")
    with pytest.raises(ClusterError, match="engine stopped"):
        engine.submit([5], GREEDY, answers.append)


# ---- bookkeeping: prompt counts, text held back at the end, no cancel for a finished request ----


def test_prompt_tokens_are_counted_whole(engine: Engine) -> None:
    before = engine.stats.prompt_tokens
    run(engine, list(range(5, 15)), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert engine.stats.prompt_tokens - before == 10  # the prefill's last token is a prompt token too


def test_the_end_token_flushes_a_partial_character(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    source = resolve_model(str(tiny_model_factory("llama")))
    tokenizer = source.tokenizer
    partial = next(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd")  # one UTF-8 byte
    eos = min(tokenizer.eos_token_ids)
    seq = Sequence(1, [5, 6], SamplingParams(max_tokens=10), tokenizer, lambda event: None)
    held = seq.accept(SampledToken(partial))
    assert held.text == ""  # the decoder waits for the rest of the character
    end = seq.accept(SampledToken(eos))
    assert end.finish_reason == "stop" and end.text == "\ufffd"  # what it held is not lost at the end


def test_ignore_eos_still_stops_at_the_requests_own_stop_token_ids(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    tokenizer = resolve_model(str(tiny_model_factory("llama"))).tokenizer
    eos = min(tokenizer.eos_token_ids)
    params = SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=frozenset({42}))
    seq = Sequence(1, [5, 6], params, tokenizer, lambda event: None)
    assert seq.accept(SampledToken(eos)).finish_reason is None  # the model's end token is ignored
    assert seq.accept(SampledToken(42)).finish_reason == "stop"


# ---- limits and bookkeeping under load: a bounded queue, batched releases, a dead thread noticed ----


def _counting_releases(pipeline: Pipeline) -> list[list[int]]:
    calls: list[list[int]] = []
    real_release = pipeline.release

    def release(seq_ids: list[int]) -> None:
        calls.append(list(seq_ids))
        real_release(seq_ids)

    pipeline.release = release  # type: ignore[method-assign]
    return calls


def test_a_full_queue_refuses_and_queued_cancels_release_nothing(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    source = resolve_model(str(tiny_model_factory("llama")))
    pipeline = local_pipeline(source, torch.float32)
    releases = _counting_releases(pipeline)
    engine = Engine(pipeline, source.tokenizer, max_running=2, max_queued=500)
    finished: list[GenerationEvent] = []
    # Not started: 2 would take the free slots, 500 wait.
    ids = [engine.submit([5, 6, 7], GREEDY, finished.append) for _ in range(502)]
    with pytest.raises(OverloadedError, match="500 sequences are waiting"):
        engine.submit([5, 6, 7], GREEDY, finished.append)
    for seq_id in ids[2:]:
        engine.cancel(seq_id)
    engine.start()
    try:
        for _ in range(3000):
            # (the sink also gets the two running sequences' token events: count the ends)
            if sum(event.finished for event in finished) == 502 and engine.in_flight == 0:
                break
            threading.Event().wait(0.02)
    finally:
        engine.stop()
    reasons = [event.finish_reason for event in finished]
    assert reasons.count("cancelled") == 500 and reasons.count("length") == 2
    # Only the two that ran had caches anywhere; they are released together or one step apart, never per cancel.
    released = [seq_id for call in releases for seq_id in call]
    assert sorted(released) == sorted(ids[:2]) and len(releases) <= 2


def test_a_token_outside_the_vocabulary_is_refused_at_submit(engine: Engine) -> None:
    vocab = engine.pipeline.config.vocab_size
    with pytest.raises(RequestError, match=f"token id {vocab} is outside the model's vocabulary"):
        engine.submit([5, vocab], GREEDY, lambda event: None)
    with pytest.raises(RequestError, match="token id -1"):
        engine.submit([-1], GREEDY, lambda event: None)


class _ThreadKiller(BaseException):
    """Not an Exception: what no step handler catches (standing in for a bug in the loop itself)."""


def test_a_dead_engine_thread_is_reported_not_waited_for(tiny_model_factory, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer)

    def broken_drain() -> None:
        raise _ThreadKiller

    events: list[GenerationEvent] = []
    engine.submit([5, 6], GREEDY, events.append)  # queued before the thread starts, and dies
    monkeypatch.setattr(engine, "_drain_inbox", broken_drain)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's death is the point
    engine.start()
    assert engine.join(10)
    assert engine.died
    # The request it held still hears why, instead of waiting for ever.
    assert [event.finish_reason for event in events] == ["error"] and "engine thread died" in (events[0].error or "")
    with pytest.raises(ClusterError, match="engine thread died"):
        engine.submit([5, 6], GREEDY, lambda event: None)


def test_a_release_that_raises_loses_no_answer_and_stops_nothing(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    source = resolve_model(str(tiny_model_factory("llama")))
    pipeline = local_pipeline(source, torch.float32)

    def broken_release(seq_ids: list[int]) -> None:
        raise ValueError("Cannot invoke RPC on closed channel!")  # what gRPC raises, not a CakeError

    pipeline.release = broken_release  # type: ignore[method-assign]
    engine = Engine(pipeline, source.tokenizer)
    engine.start()
    try:
        for _ in range(2):  # the second request is served after the first one's release failed
            tokens, last = run(engine, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
            assert len(tokens) == 3 and last.finish_reason == "length"
        assert not engine.died
    finally:
        engine.stop()


def test_a_request_is_admitted_whole_or_refused_whole(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_running=2, max_queued=4)
    engine.check_room(6)  # an idle engine takes a request of 6 sequences: 2 start, 4 wait
    for _ in range(5):
        engine.submit([5], GREEDY, lambda event: None, queue_checked=True)
    engine.check_room(1)  # the 2 free slots take 2 of the 6: 4 wait
    with pytest.raises(OverloadedError, match="3 sequences are waiting"):
        engine.check_room(2)
    with pytest.raises(RequestError, match=r"needs 7 sequences \(prompts × n\) but at most 2 run and 4 wait"):
        engine.check_room(7)  # never fits: a 400, not "retry shortly"


def test_a_burst_that_free_slots_take_is_not_refused_for_the_queue(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """With --max-queue 4 an idle server refused 11 of 16 simultaneous requests, though its 16 slots would start
    every one in the next step: sequences not yet taken from the inbox counted as waiting."""
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_running=16, max_queued=4)
    for _ in range(20):  # not started: nothing leaves the inbox, as within one step of a running engine
        engine.check_room(1)
        engine.submit([5], GREEDY, lambda event: None, queue_checked=True)
    with pytest.raises(OverloadedError, match="4 sequences are waiting"):
        engine.check_room(1)


def test_close_waits_for_a_step_in_progress_before_closing_the_pipeline(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    source = resolve_model(str(tiny_model_factory("llama")))
    pipeline = local_pipeline(source, torch.float32)
    in_step, release = threading.Event(), threading.Event()
    real_run, closed = pipeline.run, threading.Event()

    def gated_run(*args: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        in_step.set()
        release.wait(30)
        return real_run(*args)  # type: ignore[arg-type]

    pipeline.run = gated_run  # type: ignore[method-assign]
    pipeline.close = closed.set  # type: ignore[method-assign]
    engine = Engine(pipeline, source.tokenizer)
    engine.start()
    engine.submit([5, 6, 7], GREEDY, lambda event: None)
    assert in_step.wait(30)
    engine.stop = lambda timeout=30.0: Engine.stop(engine, 0.2)  # type: ignore[method-assign]
    engine.close()
    assert not closed.is_set()  # the step still runs on this pipeline
    release.set()
    assert closed.wait(10) and engine.join(10)


def test_prompt_logprobs_survive_chunked_prefill_and_max_tokens_zero_only_scores(
    engine: Engine,
    tiny_model_factory,  # type: ignore[no-untyped-def]
) -> None:
    prompt = [5 + (i * 7) % 200 for i in range(150)]  # three prefill chunks in the fixture's engine (64 tokens)
    scoring = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=True, logprobs=True, top_logprobs=3)
    events = list(engine.generate(prompt, scoring))
    assert len(events) == 1 and events[0].finish_reason == "length" and events[0].tokens == []
    chunked = events[0].prompt_logprobs
    assert chunked is not None and [t.token_id for t in chunked] == prompt[1:]
    assert all(len(t.top_logprobs) == 3 for t in chunked)
    source = resolve_model(str(tiny_model_factory("llama")))
    whole = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_batch_tokens=512)
    whole.start()
    try:
        first, *rest = list(whole.generate(prompt, replace(scoring, max_tokens=2)))
    finally:
        whole.stop()
    assert first.prompt_logprobs is not None and all(event.prompt_logprobs is None for event in rest)
    assert [t.logprob for t in first.prompt_logprobs] == pytest.approx([t.logprob for t in chunked], abs=1e-5)
    assert sum(len(event.tokens) for event in [first, *rest]) == 2
    with pytest.raises(RequestError, match="max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)


def test_choices_sharing_a_prefill_sample_as_if_each_had_its_own(engine: Engine) -> None:
    prompt = [5 + (i * 11) % 300 for i in range(150)]  # three prefill chunks of the fixture's 64 tokens
    seeded = [SamplingParams(temperature=0.9, max_tokens=12, seed=seed, ignore_eos=True) for seed in range(4)]
    alone = [run(engine, prompt, params)[0] for params in seeded]
    before = engine.stats.prompt_tokens
    results: dict[int, list[int]] = {index: [] for index in range(4)}
    done = threading.Semaphore(0)
    leader = None
    for index, params in enumerate(seeded):

        def sink(event: GenerationEvent, index: int = index) -> None:
            results[index] += [t.token_id for t in event.tokens]
            if event.finished:
                done.release()

        seq_id = engine.submit(prompt, params, sink, share_prefill_with=leader)
        leader = leader or seq_id
    for _ in range(4):
        assert done.acquire(timeout=60)
    assert [results[index] for index in range(4)] == alone
    # One prefill of 150 tokens; each other choice computed only the prompt's last token.
    assert engine.stats.prompt_tokens - before == 150 + 3


def test_a_first_choice_that_ends_on_its_first_token_still_shares_its_prefill(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_batch_tokens=64)
    prompt = [5 + (i * 13) % 300 for i in range(150)]
    before = engine.stats.prompt_tokens
    done = threading.Semaphore(0)
    lengths: dict[int, int] = {}
    leader = None
    for index, max_tokens in enumerate((1, 8, 8)):
        params = SamplingParams(temperature=0.9, seed=index, max_tokens=max_tokens, ignore_eos=True)

        def sink(event: GenerationEvent, index: int = index) -> None:
            lengths[index] = lengths.get(index, 0) + len(event.tokens)
            if event.finished:
                done.release()

        seq_id = engine.submit(prompt, params, sink, share_prefill_with=leader)
        leader = leader or seq_id
    assert leader is not None and engine.copies.awaited(leader)  # known while the copies still sit in the inbox
    engine.start()
    try:
        for _ in range(3):
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert lengths == {0: 1, 1: 8, 2: 8}
    assert engine.stats.prompt_tokens - before == 150 + 2  # the finished first choice kept its caches to be copied
    assert engine.pipeline.stages[0].kv.sequence_ids() == []  # type: ignore[attr-defined]  # and then let go


def test_min_tokens_is_clipped_with_max_tokens_to_the_room_left(engine: Engine) -> None:
    room = engine.context_length - 100
    clipped = engine.check_prompt(100, SamplingParams(max_tokens=10**6, min_tokens=10**5))
    assert (clipped.max_tokens, clipped.min_tokens) == (room, room)


def _steps_wait_for(engine: Engine, monkeypatch: pytest.MonkeyPatch, ready: Callable[[], bool]) -> threading.Event:
    """Once `ready()` holds, `engine`'s next step waits for the returned event (60 s at most): what a test submits
    meanwhile is all waiting by then, however long a loaded machine keeps the test's thread from running (the tiny
    model's steps take milliseconds: a few hundred of them could pass meanwhile)."""
    step, go_on = engine.step, threading.Event()

    def held_step() -> None:
        if ready():
            go_on.wait(timeout=60)
        step()

    monkeypatch.setattr(engine, "step", held_step)
    return go_on


@pytest.mark.parametrize(("slots", "latest"), [(2, 3), (1, 2)])
def test_waiting_sequences_start_fairly_between_requests(  # type: ignore[no-untyped-def]
    tiny_model_factory, monkeypatch: pytest.MonkeyPatch, slots: int, latest: int
) -> None:
    """Room goes to the request with the fewest running sequences, and among equals to the one served longest ago:
    a request sent after a big one starts in the next free slot instead of behind all of the big one's sequences
    (with one slot both had none running, and the big one, older, went first every time)."""
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_running=slots)
    order: list[str] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def sink(name: str) -> Callable[[GenerationEvent], None]:
        def receive(event: GenerationEvent) -> None:
            if event.finished:
                with lock:
                    order.append(name)
                done.release()

        return receive

    long = replace(GREEDY, max_tokens=8)
    chat_sent = _steps_wait_for(engine, monkeypatch, lambda: True)  # the big ones do not all finish before the chat
    engine.start()
    try:
        with engine.submitting():  # one request of six sequences
            for index in range(6):
                engine.submit([5, 6, 7 + index], long, sink(f"big-{index}"))
        engine.submit([9, 9, 9], replace(GREEDY, max_tokens=2), sink("chat"))
        chat_sent.set()
        for _ in range(7):
            assert done.acquire(timeout=60)
    finally:
        chat_sent.set()
        engine.stop()
    assert order.index("chat") <= latest, order  # the big ones in the slots, at most one more, then the chat
    assert sorted(order) == sorted([*(f"big-{index}" for index in range(6)), "chat"])


def test_a_lower_priority_number_starts_first(tiny_model_factory, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """vLLM's `priority`: of the sequences waiting for a slot, the lowest number starts first, whatever the order
    they came in (a Batch API request, at 1, waits while an interactive one, at 0, waits)."""
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_running=1)
    started: list[str] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def sink(name: str) -> Callable[[GenerationEvent], None]:
        def receive(event: GenerationEvent) -> None:
            with lock:
                if name not in started:
                    started.append(name)
            if event.finished:
                done.release()

        return receive

    all_sent = _steps_wait_for(engine, monkeypatch, lambda: bool(started))  # "first" runs on once all are waiting
    engine.start()
    try:
        # The one slot is busy while the others come, each its own request.
        engine.submit([9, 9, 9], replace(GREEDY, max_tokens=300, ignore_eos=True), sink("first"))
        deadline = time.monotonic() + 60
        while not started and time.monotonic() < deadline:
            time.sleep(0.001)
        for index, priority in enumerate((1, 1, 0, 5, -2)):
            params = replace(GREEDY, max_tokens=2, priority=priority)
            engine.submit([5, 6, 7 + index], params, sink(f"p{priority}-{index}"))
        all_sent.set()
        for _ in range(6):
            assert done.acquire(timeout=60)
    finally:
        all_sent.set()
        engine.stop()
    assert started == ["first", "p-2-4", "p0-2", "p1-0", "p1-1", "p5-3"]


def test_priority_is_a_32_bit_integer() -> None:
    assert SamplingParams(priority=-(2**31) + 1).priority == -(2**31) + 1
    with pytest.raises(RequestError, match="priority must be between"):
        SamplingParams(priority=2**31)


def test_the_last_event_names_the_stop_string_or_token_that_ended_it(engine: Engine) -> None:
    """vLLM's stop_reason: the stop string reached, or the stop_token_ids token drawn; None for a length finish."""
    prompt = [5, 6, 7]
    events = list(engine.generate(prompt, GREEDY))
    assert events[-1].finish_reason == "length" and events[-1].stop_reason is None
    ids = [token.token_id for event in events for token in event.tokens]
    stop_id = ids[3]
    by_token = list(engine.generate(prompt, replace(GREEDY, stop_token_ids=frozenset({stop_id}))))
    assert (by_token[-1].finish_reason, by_token[-1].stop_reason) == ("stop", stop_id)
    text = "".join(event.text for event in events)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    by_string = list(engine.generate(prompt, replace(GREEDY, stop=("NEVER-THERE", stop))))
    assert (by_string[-1].finish_reason, by_string[-1].stop_reason) == ("stop", stop)


def test_a_short_prompt_is_not_prefilled_behind_long_ones(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """Prefills share each step's token budget shortest first: a 5-token prompt admitted after four 450-token ones
    gets its first token before any of them (first come, first served held it until every long prefill was done)."""
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_batch_tokens=64)
    first_token_step: dict[str, int] = {}
    done = threading.Semaphore(0)

    def sink(name: str) -> Callable[[GenerationEvent], None]:
        def receive(event: GenerationEvent) -> None:
            if event.tokens and name not in first_token_step:
                first_token_step[name] = engine.stats.steps  # the engine thread counts its step before the events
            if event.finished:
                done.release()

        return receive

    engine.start()
    try:
        for index in range(4):
            prompt = [5 + (index * 7 + position) % 300 for position in range(450)]
            engine.submit(prompt, replace(GREEDY, max_tokens=2), sink(f"long-{index}"))
        engine.submit([7, 8, 9, 10, 11], replace(GREEDY, max_tokens=2), sink("short"))
        for _ in range(5):
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    longs = [step for name, step in first_token_step.items() if name != "short"]
    assert first_token_step["short"] < min(longs), first_token_step


def test_a_sequence_still_in_the_inbox_counts_as_in_flight(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """A sequence submitted while the engine is inside a step waits in its inbox until the step ends: it is queued,
    and so in flight (/metrics showed cake_queue_depth 15 beside cake_sequences_in_flight 9 during a long prefill)."""
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer)  # not started: nothing leaves the inbox
    engine.submit([5, 6, 7], GREEDY, lambda event: None)
    assert (engine.queue_depth, engine.in_flight) == (1, 1)


def test_a_follow_up_turn_is_ordered_by_what_it_computes_not_by_its_history(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """Prefills were ordered by their prompt before the prefix cache had matched them: a turn whose 400-token
    history is kept, computing 3 new tokens, waited behind every 300-token prompt."""
    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(
        local_pipeline(source, torch.float32), source.tokenizer, max_batch_tokens=64, prefix_cache_tokens=4096
    )
    history = [5 + (position * 11) % 300 for position in range(400)]
    first_token_step: dict[str, int] = {}
    done = threading.Semaphore(0)

    def sink(name: str) -> Callable[[GenerationEvent], None]:
        def receive(event: GenerationEvent) -> None:
            if event.tokens and name not in first_token_step:
                first_token_step[name] = engine.stats.steps
            if event.finished:
                done.release()

        return receive

    engine.start()
    try:
        engine.submit(history, replace(GREEDY, max_tokens=1), sink("first turn"))
        assert done.acquire(timeout=60)
        for index in range(3):
            prompt = [7 + (index * 13 + position) % 290 for position in range(300)]
            engine.submit(prompt, replace(GREEDY, max_tokens=2), sink(f"long-{index}"))
        engine.submit([*history, 9, 10, 11], replace(GREEDY, max_tokens=2), sink("follow-up"))
        for _ in range(4):
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    longs = [step for name, step in first_token_step.items() if name.startswith("long")]
    assert first_token_step["follow-up"] < min(longs), first_token_step
