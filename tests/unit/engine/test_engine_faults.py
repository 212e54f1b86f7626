"""A step that fails ends only the sequences at fault: the others of its batch run again alone and go on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from cake_py.cluster.pipeline import Pipeline, load_ends, local_pipeline
from cake_py.cluster.stage import LocalStage, StageStats
from cake_py.config import WorkerSettings
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.errors import StageError
from cake_py.models.hub import ModelSource, resolve_model
from cake_py.models.kv_cache import Batch
from cake_py.models.sampling import SamplingParams
from cake_py.rpc.codec import decode_tensor, encode_tensor
from cake_py.rpc.pb import worker_pb2 as pb
from cake_py.rpc.server import WorkerServicer
from tests.unit.rpc.test_server import Context, assign_messages

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


class FaultyStage(LocalStage):
    """A local stage that raises before (or after) computing when `fault(batch)` says so."""

    def __init__(self, stage: LocalStage, fault: Callable[[Batch], bool], after: bool = False) -> None:
        super().__init__(stage.model, stage.name)
        self.fault, self.after, self.failures = fault, after, 0

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        for piece in batch:
            if piece.copy_from is not None:
                self.kv.check_copy(piece)  # as a worker does: a copy must start from nothing
        if not self.after and self.fault(batch):
            self.failures += 1
            raise RuntimeError("out of memory (simulated)")
        out = super().forward(hidden, batch)
        if self.after and self.fault(batch):  # the caches were extended (or copied) before the failure
            self.failures += 1
            raise RuntimeError("out of memory (simulated)")
        return out


@pytest.fixture(scope="module")
def source(tiny_model_factory) -> ModelSource:  # type: ignore[no-untyped-def]
    return resolve_model(str(tiny_model_factory("llama")))


def faulty_engine(source: ModelSource, fault: Callable[[Batch], bool], after: bool = False) -> Engine:
    pipeline = local_pipeline(source, torch.float32)
    stage = pipeline.stages[0]
    assert isinstance(stage, LocalStage)
    return Engine(Pipeline(pipeline.ends, [FaultyStage(stage, fault, after)]), source.tokenizer, max_batch_tokens=64)


def run_together(
    engine: Engine, requests: list[tuple[list[int], SamplingParams]], share_prefill: bool = False
) -> tuple[list[int], list[list[GenerationEvent]]]:
    """Submit the requests as one (the later ones copying the first one's prefill if `share_prefill`); their ids
    and each one's events, once all have finished."""
    results: list[list[GenerationEvent]] = [[] for _ in requests]
    done = threading.Semaphore(0)
    ids: list[int] = []
    with engine.submitting():
        for index, (prompt, params) in enumerate(requests):

            def sink(event: GenerationEvent, index: int = index) -> None:
                results[index].append(event)
                if event.finished:
                    done.release()

            leader = ids[0] if share_prefill and ids else None
            ids.append(engine.submit(prompt, params, sink, share_prefill_with=leader))
    for _ in requests:
        assert done.acquire(timeout=60), "a generation did not finish"
    return ids, results


def tokens(events: list[GenerationEvent]) -> list[int]:
    return [token.token_id for event in events for token in event.tokens]


def alone(source: ModelSource, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, max_batch_tokens=64)
    engine.start()
    try:
        return [tokens(run_together(engine, [request])[1][0]) for request in requests]
    finally:
        engine.stop()


def test_one_faulty_sequence_ends_alone_and_the_others_of_its_batch_go_on(source: ModelSource) -> None:
    poisoned: set[int] = set()
    engine = faulty_engine(source, lambda batch: any(piece.seq_id in poisoned for piece in batch))
    requests = [(prompt, GREEDY) for prompt in PROMPTS]
    expected = alone(source, requests)
    poisoned.add(2)  # the engine's second sequence: the middle request
    engine.start()
    try:
        ids, results = run_together(engine, requests)
        assert ids[1] == 2
        last = [events[-1] for events in results]
        assert last[1].finish_reason == "error" and "out of memory (simulated)" in (last[1].error or "")
        assert [last[0].finish_reason, last[2].finish_reason] == ["length", "length"]
        assert [tokens(results[0]), tokens(results[2])] == [expected[0], expected[2]]
        # The engine serves on, and the failed sequence's caches are gone.
        assert tokens(run_together(engine, [requests[0]])[1][0]) == expected[0]
        assert engine.pipeline.stages[0].kv.sequence_ids() == []  # type: ignore[attr-defined]
    finally:
        engine.stop()


def test_a_batch_too_big_for_its_step_still_finishes_every_sequence(source: ModelSource) -> None:
    """Memory for one sequence at a time, as a GPU can be for long prompts: every step of several fails, and each
    sequence still gets the tokens it gets alone."""
    engine = faulty_engine(source, lambda batch: len(batch) > 1, after=True)
    requests = [(prompt, GREEDY) for prompt in PROMPTS]
    engine.start()
    try:
        _, results = run_together(engine, requests)
    finally:
        engine.stop()
    assert [tokens(events) for events in results] == alone(source, requests)
    assert engine.pipeline.stages[0].failures > 0  # type: ignore[attr-defined]


class FailOnceOnACopy:
    """Fails the first step that holds a choice starting as a copy of another's prefill."""

    def __init__(self) -> None:
        self.failed = False

    def __call__(self, batch: Batch) -> bool:
        if self.failed or not any(piece.copy_from for piece in batch):
            return False
        self.failed = True
        return True


def check_choices_survive(engine: Engine, fault: FailOnceOnACopy, source: ModelSource) -> None:
    """Three seeded choices sharing one prefill, through `engine` whose stage fails with `fault`: each samples what
    it samples alone."""
    prompt = [5 + (i * 7) % 200 for i in range(40)]
    seeded = [(prompt, SamplingParams(temperature=0.9, seed=seed, max_tokens=6, ignore_eos=True)) for seed in range(3)]
    expected = alone(source, seeded)
    engine.start()
    try:
        _, results = run_together(engine, seeded, share_prefill=True)
    finally:
        engine.stop()
    assert fault.failed
    assert [tokens(events) for events in results] == expected
    assert all(events[-1].error is None for events in results)


@pytest.mark.parametrize("after", [False, True], ids=["before-the-copy", "after-the-copy"])
def test_choices_in_a_failed_step_copy_the_prefill_again(after: bool, source: ModelSource) -> None:
    """The step failed before the stage copied the first choice's prefill, or after: the retry copies afresh."""
    fault = FailOnceOnACopy()
    check_choices_survive(faulty_engine(source, fault, after=after), fault, source)


def test_a_sequence_failing_alone_ends_with_the_error(source: ModelSource) -> None:
    engine = faulty_engine(source, lambda batch: True)
    engine.start()
    try:
        _, results = run_together(engine, [(PROMPTS[0], GREEDY)])
    finally:
        engine.stop()
    assert results[0][-1].finish_reason == "error"
    assert "internal error in the forward pass: RuntimeError: out of memory (simulated)" in (results[0][-1].error or "")
    assert engine.pipeline.stages[0].failures == 1  # type: ignore[attr-defined]  # no retry of a lone sequence


class InProcessWorker:
    """A stage that is a real worker's forward handler (its checks of each slice against its caches included),
    failing like a worker out of memory when `fault(batch)` says so: before computing, or after."""

    def __init__(
        self, root: Path, source: ModelSource, layers: tuple[int, int], fault: Callable[[Batch], bool], after: bool
    ) -> None:
        self.start, self.end = layers
        self.name, self.stats, self.fault, self.after = f"w{self.start}", StageStats(), fault, after
        self.worker = WorkerServicer(WorkerSettings(name=self.name, cache_dir=root / self.name), "cpu", 1.0)
        self.worker.Assign(iter(assign_messages(source, *layers)), Context())  # type: ignore[arg-type]

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self.after and self.fault(batch):
            raise StageError(f"{self.name}: CUDA out of memory (simulated)")
        slices = [pb.SequenceSlice(seq_id=s.seq_id, start_pos=s.start_pos, n_tokens=s.n_tokens) for s in batch]
        for wire, piece in zip(slices, batch, strict=True):
            wire.copy_from = piece.copy_from or 0
        request = pb.ForwardRequest(request_id=1, sequences=slices)
        encode_tensor(hidden, out=request.hidden)
        reply = self.worker._forward_one(request)
        if reply.error:
            raise StageError(f"{self.name}: {reply.error}")
        if self.after and self.fault(batch):
            raise StageError(f"{self.name}: CUDA out of memory (simulated)")
        return decode_tensor(reply.hidden)

    def release(self, seq_ids: Sequence[int]) -> None:
        assert self.worker.kv is not None
        self.worker.kv.release(seq_ids)

    def healthy(self) -> bool:
        return True

    def answers(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def close(self) -> None:
        pass


@pytest.mark.parametrize("where", ["second-worker", "one-worker-after-its-layers"])
def test_a_worker_failing_after_caches_grew_ends_only_the_request_at_fault(
    where: str, source: ModelSource, tmp_path: Path
) -> None:
    """The first worker (or the failing one's own layers) extended every sequence's caches before the step failed:
    each run alone rewrites those positions, and only the poisoned request ends."""
    poisoned = {2}

    def fault(batch: Batch) -> bool:
        return any(piece.seq_id in poisoned for piece in batch)

    n = source.config.n_layers
    if where == "second-worker":
        stages = [
            InProcessWorker(tmp_path, source, (0, 1), lambda batch: False, after=False),
            InProcessWorker(tmp_path, source, (1, n), fault, after=False),
        ]
    else:
        stages = [InProcessWorker(tmp_path, source, (0, n), fault, after=True)]
    engine = Engine(Pipeline(load_ends(source, torch.float32), stages), source.tokenizer, max_batch_tokens=64)
    requests = [(prompt, GREEDY) for prompt in PROMPTS]
    expected = alone(source, requests)
    engine.start()
    try:
        _, results = run_together(engine, requests)
    finally:
        engine.stop()
    last = [events[-1] for events in results]
    assert [event.finish_reason for event in last] == ["length", "error", "length"], [e.error for e in last]
    assert "CUDA out of memory (simulated)" in (last[1].error or "")
    assert [tokens(results[0]), tokens(results[2])] == [expected[0], expected[2]]


def test_choices_copied_on_a_worker_before_its_step_failed_copy_again_there(
    source: ModelSource, tmp_path: Path
) -> None:
    fault = FailOnceOnACopy()
    stages = [InProcessWorker(tmp_path, source, (0, source.config.n_layers), fault, after=True)]
    engine = Engine(Pipeline(load_ends(source, torch.float32), stages), source.tokenizer, max_batch_tokens=64)
    check_choices_survive(engine, fault, source)
