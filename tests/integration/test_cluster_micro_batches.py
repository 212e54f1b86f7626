"""A step cut into pieces that a chain of real `cake worker` processes computes at once (pipeline parallelism within
a step) computes exactly what a single node computes, and falls back to the whole batch when it cannot be cut."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence

import pytest
import torch

from cake_py.api.server import build_pipeline
from cake_py.cluster.pipeline import MICRO_BATCH_TOKENS, Pipeline, local_pipeline
from cake_py.cluster.stage import LocalStage
from cake_py.config import ServeSettings
from cake_py.errors import StageError
from cake_py.models.hub import ModelSource, resolve_model
from cake_py.models.kv_cache import Batch, SequenceSlice
from cake_py.rpc import chain as chain_module
from cake_py.rpc.client import RemoteStage
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import LocalCluster, WorkerProcess, free_port, generate_tokens

pytestmark = pytest.mark.timeout(180)

# Steps of a run, each a varlen batch: a prefill, then decodes beside a copy of part of it, then a new prefill.
STEPS = [
    [SequenceSlice(1, 0, 30)],
    [SequenceSlice(1, 30, 1), SequenceSlice(2, 10, 20, copy_from=1)],
    [SequenceSlice(1, 31, 1), SequenceSlice(2, 30, 1), SequenceSlice(3, 0, 13)],
]
PIECES = [7, 5, 3]  # of 4 rows or more: 30, 21 and 15 rows


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    with LocalCluster(tmp_path_factory.mktemp("micro")) as cluster:
        yield cluster.start_workers(3)


@pytest.fixture(scope="module")
def llama(tiny_model_factory: TinyModelFactory) -> ModelSource:
    return resolve_model(str(tiny_model_factory("llama")))  # 3 layers


def cluster_pipeline(llama: ModelSource, workers: list[WorkerProcess], micro_batch_tokens: int) -> Pipeline:
    specs = [worker.spec((index, index + 1)) for index, worker in enumerate(workers)]
    settings = ServeSettings(model=llama.model_id, workers=specs, dtype="float32", device="cpu")
    settings.micro_batch_tokens = micro_batch_tokens
    return build_pipeline(settings, llama, "cpu")


def step_ids(batch: Sequence[SequenceSlice], vocab: int) -> torch.Tensor:
    """Token ids for a batch's rows, the same for every pipeline (a fixed seed per step)."""
    generator = torch.Generator().manual_seed(sum(s.start_pos * 31 + s.seq_id for s in batch))
    return torch.randint(0, vocab, (sum(s.n_tokens for s in batch),), generator=generator)


def run_steps(pipeline: Pipeline, steps: Sequence[Sequence[SequenceSlice]], vocab: int) -> list[torch.Tensor]:
    """The logits of every row of every step."""
    outputs = []
    for batch in steps:
        rows = list(range(sum(s.n_tokens for s in batch)))
        outputs.append(pipeline.run(step_ids(batch, vocab), batch, rows)[0])
    return outputs


def chained(pipeline: Pipeline) -> list[int]:
    return [stage.chained_calls for stage in pipeline.stages if isinstance(stage, RemoteStage)]


@pytest.fixture(scope="module")
def single_node(llama: ModelSource) -> list[torch.Tensor]:
    return run_steps(local_pipeline(llama, torch.float32), STEPS, llama.config.vocab_size)


def test_pieces_in_flight_equal_a_single_node(
    workers: list[WorkerProcess], llama: ModelSource, single_node: list[torch.Tensor]
) -> None:
    pipeline = cluster_pipeline(llama, workers, micro_batch_tokens=4)
    try:
        got = run_steps(pipeline, STEPS, llama.config.vocab_size)
        for want, have in zip(single_node, got, strict=True):
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
        # Every piece went through every worker of the chain as a call of its own.
        assert chained(pipeline) == [sum(PIECES)] * 3
    finally:
        pipeline.release([1, 2, 3, 99])
        pipeline.close()


def test_workers_sharing_this_host_cut_steps_only_where_their_threads_fit_its_cores(
    workers: list[WorkerProcess], llama: ModelSource
) -> None:
    specs = [worker.spec((index, index + 1)) for index, worker in enumerate(workers)]
    pipeline = build_pipeline(ServeSettings(model=llama.model_id, workers=specs, dtype="float32"), llama, "cpu")
    try:
        fits = len(workers) <= (os.cpu_count() or 1)  # one thread each
        assert pipeline.micro_batch_tokens == (MICRO_BATCH_TOKENS if fits else 0)
    finally:
        pipeline.close()


def test_off_and_short_steps_run_whole(
    workers: list[WorkerProcess], llama: ModelSource, single_node: list[torch.Tensor]
) -> None:
    for micro_batch_tokens, calls in ((0, len(STEPS)), (16, 1 + 1 + 1)):  # 30 rows cut in 1 piece of 30 is whole
        pipeline = cluster_pipeline(llama, workers, micro_batch_tokens)
        try:
            got = run_steps(pipeline, STEPS, llama.config.vocab_size)
            for want, have in zip(single_node, got, strict=True):
                torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
            assert chained(pipeline) == [calls] * 3
        finally:
            pipeline.release([1, 2, 3])
            pipeline.close()


def test_greedy_tokens_of_a_long_prompt_equal_a_single_node(workers: list[WorkerProcess], llama: ModelSource) -> None:
    prompt = llama.tokenizer.encode("The quick brown cake bakes over the river " * 6)
    assert len(prompt) >= 40
    want = generate_tokens(local_pipeline(llama, torch.float32), llama.tokenizer, prompt)
    pipeline = cluster_pipeline(llama, workers, micro_batch_tokens=8)
    try:
        assert generate_tokens(pipeline, llama.tokenizer, prompt) == want
        assert chained(pipeline)[0] > 32  # the prefill's pieces, then one call per decode step
    finally:
        pipeline.close()


def test_a_step_of_thousands_of_rows_in_small_pieces(workers: list[WorkerProcess], llama: ModelSource) -> None:
    """Megabytes in flight each way: the master reads answers while it is still sending (the last worker must never
    wait on an unread answer while the first waits to pass it a piece)."""
    steps = [[SequenceSlice(seq_id, 0, 500) for seq_id in range(10, 18)]]
    want = run_steps(local_pipeline(llama, torch.float32), steps, llama.config.vocab_size)
    pipeline = cluster_pipeline(llama, workers, micro_batch_tokens=16)
    try:
        torch.testing.assert_close(
            run_steps(pipeline, steps, llama.config.vocab_size)[0], want[0], atol=1e-4, rtol=1e-4
        )
        assert chained(pipeline) == [250] * 3
    finally:
        pipeline.release(list(range(10, 18)))
        pipeline.close()


def test_a_piece_a_worker_refuses_fails_the_step_and_the_next_step_is_answered(
    workers: list[WorkerProcess], llama: ModelSource, single_node: list[torch.Tensor]
) -> None:
    pipeline = cluster_pipeline(llama, workers, micro_batch_tokens=4)
    try:
        with pytest.raises(StageError, match="sequence 77 starts at 5"):
            pipeline.run(torch.zeros(20, dtype=torch.long), [SequenceSlice(77, 5, 20)], [19])
        # The refused pieces' answers still arrive after the error: the next steps skip them.
        got = run_steps(pipeline, STEPS, llama.config.vocab_size)
        for want, have in zip(single_node, got, strict=True):
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
        assert all(stage.healthy() for stage in pipeline.stages)
    finally:
        pipeline.release([1, 2, 3, 77])
        pipeline.close()


def test_a_chain_broken_during_pieces_runs_the_batch_whole(
    workers: list[WorkerProcess], llama: ModelSource, single_node: list[torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    pipeline = cluster_pipeline(llama, workers, micro_batch_tokens=4)
    try:
        pipeline.run(torch.zeros(2, dtype=torch.long), [SequenceSlice(99, 0, 2)], [1])  # opens the fast paths
        stages = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        fast = stages[2]._fast
        assert fast is not None
        fast.port = free_port()  # what the chain tells the middle worker: it cannot pass its pieces on
        got = run_steps(pipeline, STEPS, llama.config.vocab_size)
        for want, have in zip(single_node, got, strict=True):
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
        assert f"cannot pass its output to {stages[2].name!r}" in caplog.text
        assert not any(stage.chainable() for stage in stages)
        assert all(stage.healthy() for stage in stages)
    finally:
        pipeline.release([1, 2, 3, 99])
        pipeline.close()


def master_and_workers(
    llama: ModelSource, workers: list[WorkerProcess], layers: Sequence[tuple[int, int]], micro_batch_tokens: int | None
) -> Pipeline:
    """Workers on `layers` (in order), the master on every layer none of them holds."""
    specs = [worker.spec(held) for worker, held in zip(workers, layers, strict=False)]
    settings = ServeSettings(model=llama.model_id, workers=specs, dtype="float32", device="cpu")
    settings.micro_batch_tokens = micro_batch_tokens
    return build_pipeline(settings, llama, "cpu")


def local_calls(pipeline: Pipeline) -> list[int]:
    return [stage.stats.calls for stage in pipeline.stages if isinstance(stage, LocalStage)]


@pytest.mark.parametrize(
    "layers",
    [
        pytest.param([(1, 2), (2, 3)], id="master-first"),
        pytest.param([(0, 1), (1, 2)], id="master-last"),
        pytest.param([(1, 2)], id="master-around-one-worker"),
    ],
)
def test_a_master_holding_layers_computes_its_pieces_beside_the_workers(
    layers: list[tuple[int, int]], workers: list[WorkerProcess], llama: ModelSource, single_node: list[torch.Tensor]
) -> None:
    """The master runs its layers before the chain on each piece as it sends it, and its layers after the chain on
    each answer as it comes: logits as a single node's, every piece a call of every stage."""
    pipeline = master_and_workers(llama, workers, layers, micro_batch_tokens=4)
    try:
        assert len(pipeline.stages) == 3
        got = run_steps(pipeline, STEPS, llama.config.vocab_size)
        for want, have in zip(single_node, got, strict=True):
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
        assert chained(pipeline) == [sum(PIECES)] * len(layers)
        assert local_calls(pipeline) == [sum(PIECES)] * (3 - len(layers))
        # Thousands of rows in small pieces: the master computes on both threads while megabytes are in flight.
        steps = [[SequenceSlice(seq_id, 0, 300) for seq_id in range(10, 14)]]
        want_rows = run_steps(local_pipeline(llama, torch.float32), steps, llama.config.vocab_size)[0]
        torch.testing.assert_close(
            run_steps(pipeline, steps, llama.config.vocab_size)[0], want_rows, atol=1e-4, rtol=1e-4
        )
    finally:
        pipeline.release([1, 2, 3, *range(10, 14)])
        pipeline.close()


def test_a_master_layer_between_workers_runs_steps_whole(
    workers: list[WorkerProcess], llama: ModelSource, single_node: list[torch.Tensor]
) -> None:
    pipeline = master_and_workers(llama, [workers[0], workers[2]], [(0, 1), (2, 3)], micro_batch_tokens=4)
    try:
        got = run_steps(pipeline, STEPS, llama.config.vocab_size)
        for want, have in zip(single_node, got, strict=True):
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
        assert [stage.stats.calls for stage in pipeline.stages] == [len(STEPS)] * 3
    finally:
        pipeline.release([1, 2, 3])
        pipeline.close()


def test_the_master_counts_among_what_computes_when_it_holds_layers(
    workers: list[WorkerProcess], llama: ModelSource
) -> None:
    pipeline = master_and_workers(llama, workers, [(1, 2), (2, 3)], micro_batch_tokens=None)
    try:
        fits = 2 + torch.get_num_threads() <= (os.cpu_count() or 1)  # the workers' one thread each, and ours
        assert pipeline.micro_batch_tokens == (MICRO_BATCH_TOKENS if fits else 0)
    finally:
        pipeline.close()


def test_a_step_the_master_refuses_or_a_broken_chain_loses_nothing(
    workers: list[WorkerProcess], llama: ModelSource, single_node: list[torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    """The master's own layer refusing a piece (on the thread sending them) fails the step with its error and sends
    nothing more; a chain that breaks mid-pieces runs the step again whole, the master rewriting its positions."""
    caplog.set_level(logging.WARNING)
    pipeline = master_and_workers(llama, workers, [(1, 2), (2, 3)], micro_batch_tokens=4)
    try:
        with pytest.raises(ValueError, match="cannot write at position 5"):
            pipeline.run(torch.zeros(20, dtype=torch.long), [SequenceSlice(77, 5, 20)], [19])
        assert chained(pipeline) == [0, 0]
        stages = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        pipeline.run(torch.zeros(2, dtype=torch.long), [SequenceSlice(99, 0, 2)], [1])  # opens the fast paths
        fast = stages[1]._fast
        assert fast is not None
        fast.port = free_port()  # the first worker cannot pass its pieces on
        got = run_steps(pipeline, STEPS, llama.config.vocab_size)
        for want, have in zip(single_node, got, strict=True):
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
        assert f"cannot pass its output to {stages[1].name!r}" in caplog.text
        assert all(stage.healthy() for stage in stages)
    finally:
        pipeline.release([1, 2, 3, 77, 99])
        pipeline.close()


def test_a_master_computing_its_layers_longer_than_a_stall_is_no_lost_chain(
    workers: list[WorkerProcess], llama: ModelSource, single_node: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers wait idle while the master computes its layers of the first piece (a slow master, a large share
    of the model): that is no chained forward lost on the way, whose limit is CHAIN_STALL_S."""
    monkeypatch.setattr(chain_module, "CHAIN_STALL_S", 1.0)
    pipeline = master_and_workers(llama, workers, [(1, 2), (2, 3)], micro_batch_tokens=4)
    own = pipeline.stages[0]
    assert isinstance(own, LocalStage)
    forward, slowed = own.forward, []

    def slow_first_piece(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not slowed:
            slowed.append(batch)
            time.sleep(2.5)  # a slow computation (not a synchronisation): the workers' pings go on meanwhile
        return forward(hidden, batch)

    monkeypatch.setattr(own, "forward", slow_first_piece)
    try:
        got = run_steps(pipeline, STEPS, llama.config.vocab_size)
        for want, have in zip(single_node, got, strict=True):
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
        assert slowed and chained(pipeline) == [sum(PIECES)] * 2
    finally:
        pipeline.release([1, 2, 3])
        pipeline.close()
