"""A host short of memory for KV caches ends the sequence that cannot grow, not the process; kept prefixes give
their memory first."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cake_py.cluster.pipeline import Pipeline, load_ends, local_pipeline
from cake_py.cluster.stage import LocalStage
from cake_py.engine.engine import Engine
from cake_py.errors import KVMemoryError
from cake_py.models import kv_pool
from cake_py.models.hub import ModelSource, resolve_model
from cake_py.models.kv_cache import KVStore
from cake_py.models.sampling import SamplingParams
from tests.unit.engine.test_engine_faults import InProcessWorker, run_together, tokens

# The tiny Llama's caches of 256 positions: 3 layers × keys and values × 2 kv heads × 16 wide, float32.
BLOCK = 3 * 2 * 2 * 256 * 16 * 4
# A prompt of 200 tokens and an answer of 150: its caches must grow past 256 positions, to 512 (2 blocks).
LONG = ([11 + i % 50 for i in range(200)], SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True))
# Within 256 positions.
SHORT = ([5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))


class HostMemory:
    """A host with `size` bytes for KV caches: the stage's caches take theirs out of it as they grow."""

    def __init__(self, size: int, store: KVStore) -> None:
        self.size, self.store = size, store

    def __call__(self) -> tuple[int, int]:
        return 1 << 40, self.size - self.store.nbytes  # (total, available), as host_memory() answers


@pytest.fixture(scope="module")
def source(tiny_model_factory) -> ModelSource:  # type: ignore[no-untyped-def]
    return resolve_model(str(tiny_model_factory("llama")))


def on_a_small_host(monkeypatch: pytest.MonkeyPatch, store: KVStore, size: int) -> None:
    """KV caches get `size` bytes of host memory, all of it (nothing kept free)."""
    monkeypatch.setattr(kv_pool, "host_memory", HostMemory(size, store))
    monkeypatch.setattr(kv_pool, "KEEP_FREE_BYTES", 0)
    monkeypatch.setattr(kv_pool, "KEEP_FREE_FRACTION", 0.0)


def engine_on_a_small_host(source: ModelSource, monkeypatch: pytest.MonkeyPatch, prefix_cache_tokens: int) -> Engine:
    engine = Engine(
        local_pipeline(source, torch.float32),
        source.tokenizer,
        max_batch_tokens=64,
        prefix_cache_tokens=prefix_cache_tokens,
    )
    stage = engine.pipeline.stages[0]
    assert isinstance(stage, LocalStage)
    # Room for 2.9 blocks: two sequences under 256 positions, not one of them grown to 512 (2 blocks) beside the other
    # (the caches grow a layer at a time, each leaving its old row behind until the pool trims it).
    on_a_small_host(monkeypatch, stage.kv, 29 * BLOCK // 10)
    return engine


def test_a_sequence_that_cannot_grow_waits_for_another_to_finish_and_is_computed_again(
    source: ModelSource, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_on_a_small_host(source, monkeypatch, prefix_cache_tokens=0)
    engine.start()
    try:
        expected = [tokens(run_together(engine, [request])[1][0]) for request in (SHORT, LONG)]
        with caplog.at_level(logging.WARNING, logger="cake_py.engine.faults"):
            _, (short_events, long_events) = run_together(engine, [SHORT, LONG])
            # The long one, computed again, grows to 512 positions: 2 of the 2.9 blocks alone.
            assert [tokens(short_events), tokens(long_events)] == expected
        assert "waits for memory for its KV caches" in caplog.text and engine.stats.preemptions == 1
        assert long_events[-1].finish_reason == "length" and long_events[-1].error is None
    finally:
        engine.stop()


def test_a_sequence_alone_that_cannot_grow_ends_with_why(
    source: ModelSource, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_on_a_small_host(source, monkeypatch, prefix_cache_tokens=0)
    monkeypatch.setattr(kv_pool, "host_memory", HostMemory(3 * BLOCK // 2, engine.pipeline.stages[0].kv))  # type: ignore[attr-defined]
    engine.start()
    try:
        with caplog.at_level(logging.WARNING, logger="cake_py.engine.faults"):
            events = run_together(engine, [LONG])[1][0]
        assert f"1 sequence(s) end, no memory to wait for: {KVMemoryError.MARK}" in caplog.text
        last = events[-1]
        assert last.finish_reason == "error" and (last.error or "").startswith(KVMemoryError.MARK)
        # It ran until its caches had to grow: its 57th token was its last, the step writing position 256 failed.
        assert len(tokens(events)) == 57
        short = ([5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
        assert len(tokens(run_together(engine, [short])[1][0])) == 10  # the engine, and the host, are fine
    finally:
        engine.stop()


def test_kept_prefixes_give_their_memory_to_a_sequence_that_must_grow(
    source: ModelSource, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_on_a_small_host(source, monkeypatch, prefix_cache_tokens=8192)
    engine.start()
    try:
        kept = ([30 + i for i in range(30)], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        (kept_id,), _ = run_together(engine, [kept])
        assert kept_id in engine.prefix_cache
        with caplog.at_level(logging.WARNING, logger="cake_py.engine.faults"):
            events = run_together(engine, [LONG])[1][0]
        assert events[-1].finish_reason == "length" and len(tokens(events)) == 150
        assert kept_id not in engine.prefix_cache
        assert "the kept prefixes are dropped" in caplog.text
    finally:
        engine.stop()


def test_a_worker_short_of_memory_says_so_and_the_master_drops_kept_prefixes_on_every_stage(
    source: ModelSource, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's KVMemoryError reaches the master as text (a StageError naming the worker): the master still
    knows it for what it is, and the kept prefixes it drops free the worker's memory."""
    worker = InProcessWorker(tmp_path, source, (0, source.config.n_layers), lambda batch: False, after=False)
    assert worker.worker.kv is not None
    on_a_small_host(monkeypatch, worker.worker.kv, 29 * BLOCK // 10)
    pipeline = Pipeline(load_ends(source, torch.float32), [worker])  # type: ignore[list-item]
    engine = Engine(pipeline, source.tokenizer, max_batch_tokens=64, prefix_cache_tokens=8192)
    engine.start()
    try:
        kept = ([30 + i for i in range(30)], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        (kept_id,), _ = run_together(engine, [kept])
        with caplog.at_level(logging.WARNING, logger="cake_py.engine.faults"):
            events = run_together(engine, [LONG])[1][0]
        assert events[-1].finish_reason == "length" and len(tokens(events)) == 150
        assert kept_id not in engine.prefix_cache and kept_id not in worker.worker.kv.sequence_ids()
        assert "the kept prefixes are dropped" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cake_py.engine.faults"):
            _, (_, again) = run_together(engine, [SHORT, LONG])  # no room for the long one grown beside the short
        assert tokens(again) == tokens(events)  # it waited for the short one, and was computed again
        assert f"(w0: {KVMemoryError.MARK}: " in caplog.text and "waits for memory for its KV caches" in caplog.text
    finally:
        engine.stop()


def test_after_memory_ran_short_no_more_run_at_once_until_the_engine_is_idle(source: ModelSource) -> None:
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer)  # not started: admission by hand
    params = SamplingParams(temperature=0.0, max_tokens=5)
    engine.submit([5, 6, 7], params, lambda event: None)
    engine._drain_inbox()  # noqa: SLF001
    engine._admit()  # noqa: SLF001
    assert len(engine._running) == 1  # noqa: SLF001
    engine._admit_below = 2  # noqa: SLF001  # as `_preempt` leaves it: 2 ran when memory ran short
    for _ in range(3):
        engine.submit([5, 6, 7], params, lambda event: None)
    engine._drain_inbox()  # noqa: SLF001
    engine._admit()  # noqa: SLF001
    assert (len(engine._running), len(engine._waiting)) == (2, 2)  # noqa: SLF001
    engine._running.clear()  # noqa: SLF001  # both finished: the engine is idle, the limit goes
    engine._admit()  # noqa: SLF001
    assert (len(engine._running), len(engine._waiting), engine._admit_below) == (2, 0, None)  # noqa: SLF001
