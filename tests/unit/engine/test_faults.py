"""With `hold_s` (failover), a step failing because a stage is down does not end its sequences: they wait, and go on
(computed again from their first token, nothing sampled twice) once the stage is back or on the engine that replaces
this one (`hand_over`, `adopt`); cancels follow them there, and waiting has a bound."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence as Ids
from itertools import count

import pytest
import torch

from cake_py.cluster.pipeline import Pipeline, local_pipeline
from cake_py.cluster.stage import LocalStage
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent, Sequence
from cake_py.errors import StageError
from cake_py.models.hub import ModelSource, resolve_model
from cake_py.models.kv_cache import Batch
from cake_py.models.sampling import SamplingParams

PROMPT = [5, 6, 7, 8, 9, 10]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


class DyingStage(LocalStage):
    """A local stage that goes down on its `die_at`-th forward, losing every cache (as a killed worker does), until
    `come_back()`. With `between_steps`, that forward still answers: the stage is seen down only by the engine's next
    look (as a worker whose health check fails while the master samples)."""

    def __init__(self, stage: LocalStage, die_at: int, between_steps: bool = False) -> None:
        super().__init__(stage.model, "worker")
        self.calls, self.die_at, self.between_steps, self.down = 0, die_at, between_steps, False
        self.went_down = threading.Event()

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        self.calls += 1
        if self.down or self.calls == self.die_at:
            out = super().forward(hidden, batch) if self.between_steps and not self.down else None
            self.down = True
            self.kv.release(self.kv.sequence_ids())
            self.went_down.set()
            if out is not None:
                return out
            raise StageError("worker: the forward connection broke (simulated)")
        return super().forward(hidden, batch)

    def release(self, seq_ids: Ids[int]) -> None:
        if not self.down:
            super().release(seq_ids)

    def healthy(self) -> bool:
        return not self.down

    def answers(self) -> bool:
        return not self.down

    def come_back(self) -> None:
        self.down = False


@pytest.fixture(scope="module")
def source(tiny_model_factory) -> ModelSource:  # type: ignore[no-untyped-def]
    return resolve_model(str(tiny_model_factory("llama")))


@pytest.fixture(scope="module")
def expected(source: ModelSource) -> list[int]:
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer)
    engine.start()
    try:
        return tokens(list(engine.generate(PROMPT, GREEDY)))
    finally:
        engine.stop()


def tokens(events: list[GenerationEvent]) -> list[int]:
    return [token.token_id for event in events for token in event.tokens]


def dying_engine(
    source: ModelSource, die_at: int, hold_s: float, ids: count[int] | None = None, between_steps: bool = False
) -> Engine:
    pipeline = local_pipeline(source, torch.float32)
    stage = pipeline.stages[0]
    assert isinstance(stage, LocalStage)
    dying = DyingStage(stage, die_at, between_steps)
    engine = Engine(Pipeline(pipeline.ends, [dying]), source.tokenizer, seq_ids=ids)
    engine.hold_s = hold_s
    return engine


def stage_of(engine: Engine) -> DyingStage:
    stage = engine.pipeline.stages[0]
    assert isinstance(stage, DyingStage)
    return stage


def collect(events: queue.SimpleQueue[GenerationEvent], timeout: float = 30.0) -> list[GenerationEvent]:
    out: list[GenerationEvent] = []
    deadline = time.monotonic() + timeout
    while not out or not out[-1].finished:
        out.append(events.get(timeout=max(deadline - time.monotonic(), 0.01)))
    return out


def through_a_fall(engine: Engine) -> list[GenerationEvent]:
    """A greedy generation whose stage goes down under it and comes back (without its caches) 0.3 s later; the
    request is held meanwhile, not ended."""
    engine.start()
    try:
        events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        engine.submit(PROMPT, GREEDY, events.put)
        assert stage_of(engine).went_down.wait(30)
        deadline = time.monotonic() + 10  # the engine thread holds it once it has seen the failure: a loaded machine
        while not engine.held and time.monotonic() < deadline:  # may take longer than a fixed sleep for that
            time.sleep(0.01)
        time.sleep(0.3)  # down a while
        assert engine.in_flight == engine.held == 1  # held, not ended
        stage_of(engine).come_back()
        result = collect(events)
        assert engine.held == 0
        return result
    finally:
        engine.stop()


def test_a_sequence_waits_for_its_stage_and_goes_on_as_if_nothing_happened(
    source: ModelSource, expected: list[int]
) -> None:
    result = through_a_fall(dying_engine(source, die_at=8, hold_s=30.0))  # the prefill, then a few decode steps
    assert result[-1].finish_reason == "length", result[-1].error
    assert tokens(result) == expected  # computed again from its first token: the same greedy answer


def test_a_stage_seen_down_between_steps_loses_no_request(source: ModelSource, expected: list[int]) -> None:
    """No step failed on it, but its caches are gone all the same: the sequence is computed again."""
    result = through_a_fall(dying_engine(source, die_at=8, hold_s=30.0, between_steps=True))
    assert result[-1].finish_reason == "length", result[-1].error
    assert tokens(result) == expected


def test_a_stage_that_keeps_going_down_ends_the_request(source: ModelSource) -> None:
    """A worker that crashes on every forward (this request may be what kills it) must not hold it for ever."""
    engine = dying_engine(source, die_at=3, hold_s=60.0)
    stage = stage_of(engine)
    engine.start()
    back = threading.Event()

    def revive() -> None:
        while not back.wait(0.2):
            stage.die_at = stage.calls + 1  # back, and down again at its next forward
            stage.come_back()

    threading.Thread(target=revive, daemon=True).start()
    try:
        events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        engine.submit(PROMPT, GREEDY, events.put)
        last = collect(events, timeout=20)[-1]
    finally:
        back.set()
        engine.stop()
    assert last.finish_reason == "error" and "simulated" in (last.error or "")


def test_a_restarted_sequence_claims_no_cached_prompt(source: ModelSource) -> None:
    seq = Sequence(1, PROMPT, GREEDY, source.tokenizer, lambda event: None)
    seq.n_cached, seq.cached_tokens, seq.capacity = 5, 4, 2048  # as after copying a kept prefix
    seq.restart()
    # Its new caches grow from nothing: the old capacity would charge the prefix cache what they no longer take.
    assert (seq.n_cached, seq.cached_tokens, seq.capacity, seq.restarts) == (0, 0, 0, 1)


def test_waiting_has_a_bound(source: ModelSource) -> None:
    engine = dying_engine(source, die_at=3, hold_s=0.5)
    engine.start()
    try:
        events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        began = time.monotonic()
        engine.submit(PROMPT, GREEDY, events.put)
        last = collect(events)[-1]
    finally:
        engine.stop()
    assert last.finish_reason == "error" and "down for over 0 s: worker" in (last.error or "")
    assert time.monotonic() - began < 10


def test_a_held_sequence_can_be_cancelled(source: ModelSource) -> None:
    engine = dying_engine(source, die_at=3, hold_s=60.0)
    engine.start()
    try:
        events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        seq_id = engine.submit(PROMPT, GREEDY, events.put)
        assert stage_of(engine).went_down.wait(30)
        engine.cancel(seq_id)
        assert collect(events, timeout=5)[-1].finish_reason == "cancelled"
        assert engine.in_flight == 0
    finally:
        engine.stop()


def test_without_hold_a_stage_down_ends_the_request(source: ModelSource) -> None:
    engine = dying_engine(source, die_at=3, hold_s=0.0)
    engine.start()
    try:
        events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        engine.submit(PROMPT, GREEDY, events.put)
        last = collect(events, timeout=10)[-1]
    finally:
        engine.stop()
    assert last.finish_reason == "error" and "simulated" in (last.error or "")


def test_sequences_handed_over_go_on_on_the_next_engine_and_cancels_follow_them(
    source: ModelSource, expected: list[int]
) -> None:
    ids = count(1)  # one numbering, as the server's engines share
    old = dying_engine(source, die_at=8, hold_s=60.0, ids=ids)
    old.start()
    kept: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    dropped: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    old.submit(PROMPT, GREEDY, kept.put)
    cancelled = old.submit(PROMPT, GREEDY, dropped.put)
    assert stage_of(old).went_down.wait(30)
    handed = old.hand_over()
    old.close()
    assert sorted(seq.seq_id for seq in handed) == [cancelled - 1, cancelled]
    old.cancel(cancelled)  # a client leaves between the engines: the cancel is kept for the next one
    new = Engine(local_pipeline(source, torch.float32), source.tokenizer, seq_ids=ids)
    new.start()
    try:
        own: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        assert new.submit(PROMPT, GREEDY, own.put) == cancelled + 1  # no id the handed sequences hold
        new.adopt(handed, old)
        assert collect(dropped)[-1].finish_reason == "cancelled"
        result = collect(kept)
        assert result[-1].finish_reason == "length", result[-1].error
        assert tokens(result) == expected
        assert tokens(collect(own)) == expected
        assert old.stats.requests_total + new.stats.requests_total == 3  # each request counted once
    finally:
        new.stop()


def test_an_engine_with_nothing_in_flight_hands_over_nothing(source: ModelSource) -> None:
    engine = dying_engine(source, die_at=1000, hold_s=5.0)
    engine.start()
    assert engine.hand_over() == []
    engine.close()
