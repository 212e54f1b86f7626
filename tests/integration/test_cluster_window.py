"""Sliding-window layers on real `cake worker` processes: each worker's windowed layers keep only their window, and
long turns, a kept prefix copied on every worker, a prefix the workers' windows dropped (never offered), choices
sharing a prefill and speculative drafts give what a single node gives."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest
import torch

from cake_py.api.server import build_pipeline
from cake_py.cluster.pipeline import local_pipeline
from cake_py.config import ServeSettings
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.hub import resolve_model
from cake_py.models.sampling import SamplingParams
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import LocalCluster, WorkerProcess, wait_until

pytestmark = pytest.mark.timeout(180)

GREEDY = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, logprobs=True)
HISTORY = [5 + (i * 13) % 300 for i in range(40)]  # with 50 tokens more, past the 16-position window many times
Answer = list[tuple[int, float]]


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running.start_workers(2)


def _answers(engine: Engine, prompts: list[list[int]], share: bool = False) -> list[tuple[Answer, GenerationEvent]]:
    """Each prompt's tokens with their logprobs, and its last event; with `share`, one request's choices (the later
    ones copy the first one's prefill)."""
    sinks: list[queue.SimpleQueue[GenerationEvent]] = [queue.SimpleQueue() for _ in prompts]
    leader = None
    with engine.submitting():
        for prompt, sink in zip(prompts, sinks, strict=True):
            seq_id = engine.submit(prompt, GREEDY, sink.put, share_prefill_with=leader if share else None)
            leader = leader or seq_id
    results = []
    for sink in sinks:
        out: Answer = []
        while True:
            event = sink.get(timeout=60)
            assert event.error is None, event.error
            out += [(token.token_id, token.logprob or 0.0) for token in event.tokens]
            if event.finished:
                results.append((out, event))
                break
    return results


def _same(got: Answer, expected: Answer) -> None:
    assert [token for token, _ in got] == [token for token, _ in expected]
    assert [logprob for _, logprob in got] == pytest.approx([logprob for _, logprob in expected], abs=1e-4)


def test_windowed_layers_on_workers_equal_a_single_node(
    workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory
) -> None:
    source = resolve_model(str(tiny_model_factory("gemma3")))  # windowed, full, windowed
    specs = [workers[0].spec((0, 2)), workers[1].spec((2, 3))]
    settings = ServeSettings(model=source.model_id, workers=specs, dtype="float32", device="cpu")
    options = {"prefix_cache_tokens": 4096, "speculative_tokens": 4, "max_batch_tokens": 16}
    engine = Engine(build_pipeline(settings, source, "cpu"), source.tokenizer, **options)
    single = Engine(local_pipeline(source, torch.float32), source.tokenizer, **options)
    engine.start()
    single.start()
    try:
        ((first, _),) = _answers(engine, [HISTORY])
        _same(first, _answers(single, [HISTORY])[0][0])
        wait_until(lambda: engine.in_flight == 0, 5.0, "the first turn to finish")
        (kept,) = list(engine.prefix_cache._entries)  # noqa: SLF001
        # The next turn copies the kept windows on both workers.
        second = HISTORY + [token for token, _ in first] + [7, 8, 9]
        ((got, last),) = _answers(engine, [second])
        _same(got, _answers(single, [second])[0][0])
        assert last.cached_tokens == len(HISTORY) + len(first) - 1
        wait_until(lambda: engine.in_flight == 0, 5.0, "the second turn to finish")
        # A prompt sharing only what the workers' windows dropped is computed whole: no copy is tried (a refused one
        # would fail the step and drop every kept cache).
        kept_now = set(engine.prefix_cache._entries)  # noqa: SLF001
        assert kept in kept_now  # the second turn dropped what the first still serves from: both are kept
        early = HISTORY[:30] + [1, 2, 3]
        ((got, last),) = _answers(engine, [early])
        _same(got, _answers(single, [early])[0][0])
        assert last.cached_tokens == 0 and kept_now <= set(engine.prefix_cache._entries)  # noqa: SLF001
        # Choices of a prompt longer than the window copy the first one's prefill on both workers.
        prompt = [9 + (i * 7) % 250 for i in range(45)]
        computed = engine.stats.prompt_tokens
        choices = _answers(engine, [prompt] * 3, share=True)
        alone = _answers(single, [prompt])[0][0]
        for got, _ in choices:
            _same(got, alone)
        assert engine.stats.prompt_tokens - computed == len(prompt) + 2
    finally:
        engine.stop()
        single.stop()
        engine.pipeline.close()


@pytest.mark.parametrize(
    "layers",
    [
        pytest.param([(0, 2), (2, 3)], id="workers"),
        pytest.param([(1, 2), (2, 3)], id="master-first"),  # the master's windowed layer 0 computes pieces too
        pytest.param([(0, 1), (1, 2)], id="master-last"),
    ],
)
def test_pieces_of_steps_past_the_window_then_rewritten_equal_a_single_node(
    layers: list[tuple[int, int]], workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory
) -> None:
    """Steps cut in pieces in flight on both workers (and the master, where it holds a layer), through the window's
    drops; then drafts rewritten, and a step run again whole at the same positions (as after a chain that could not
    take its pieces)."""
    from cake_py.models.kv_cache import SequenceSlice
    from cake_py.rpc.client import RemoteStage

    source = resolve_model(str(tiny_model_factory("gemma3")))
    specs = [worker.spec(held) for worker, held in zip(workers, layers, strict=True)]
    settings = ServeSettings(model=source.model_id, workers=specs, dtype="float32", device="cpu")
    settings.micro_batch_tokens = 4
    steps = [
        [SequenceSlice(1, 0, 30)],  # cut anywhere: nothing dropped yet
        [SequenceSlice(1, 30, 30)],
        [SequenceSlice(1, 60, 5), SequenceSlice(2, 0, 20)],  # drafts whose later part would drop more
        [SequenceSlice(1, 61, 4), SequenceSlice(2, 20, 1)],  # one kept, the rest rewritten
        [SequenceSlice(1, 61, 4), SequenceSlice(2, 20, 1)],  # the same step again
    ]
    generator = torch.Generator().manual_seed(3)
    ids = [
        torch.randint(0, source.config.vocab_size, (sum(s.n_tokens for s in b),), generator=generator) for b in steps
    ]
    single = local_pipeline(source, torch.float32)
    pipeline = build_pipeline(settings, source, "cpu")
    try:
        for batch, step_ids in zip(steps, ids, strict=True):
            rows = list(range(len(step_ids)))
            expected = single.run(step_ids, batch, rows)[0]
            torch.testing.assert_close(pipeline.run(step_ids, batch, rows)[0], expected, atol=1e-4, rtol=1e-4)
        remote = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        assert len(remote) == 2 and all(stage.chained_calls > len(steps) for stage in remote)  # some steps in pieces
    finally:
        pipeline.close()
