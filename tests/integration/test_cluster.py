"""A master and real `cake worker` processes on 127.0.0.1 compute exactly what a single node computes.

Three workers are started once for the module and re-assigned layers by each test (an Assign replaces whatever a
worker held, KV caches included). Everything runs in float32 on one torch thread per worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from cake_py.api.server import build_pipeline
from cake_py.cluster.pipeline import Pipeline, local_pipeline
from cake_py.cluster.stage import LocalStage
from cake_py.config import ServeSettings, WorkerSpec, load_cluster_file
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.errors import ClusterError, KVMemoryError, StageError, WeightsError
from cake_py.models.grammar import compiler_for, regex_grammar
from cake_py.models.hub import ModelSource, resolve_model
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.pooling import Pooling
from cake_py.models.sampling import SamplingParams
from cake_py.models.weights import load_transformer
from cake_py.rpc import client as client_module
from cake_py.rpc.client import Assignment, RemoteStage, WorkerConnection
from cake_py.rpc.codec import decode_tensor, encode_tensor
from cake_py.rpc.dataplane_client import DataPlaneClient
from cake_py.rpc.pb import worker_pb2 as pb
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import (
    LocalCluster,
    WorkerProcess,
    collect,
    free_port,
    generate_tokens,
    greedy,
    token_ids,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

PROMPT = "The quick brown cake bakes over the river"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def workers(cluster: LocalCluster) -> list[WorkerProcess]:
    return cluster.start_workers(3)


@pytest.fixture(scope="module")
def llama(tiny_model_factory: TinyModelFactory) -> ModelSource:
    return resolve_model(str(tiny_model_factory("llama")))  # 3 layers


@pytest.fixture(scope="module")
def single_node_tokens(llama: ModelSource) -> list[int]:
    return generate_tokens(local_pipeline(llama, torch.float32), llama.tokenizer, llama.tokenizer.encode(PROMPT))


def settings_for(source: ModelSource, workers: list[WorkerSpec]) -> ServeSettings:
    return ServeSettings(model=source.model_id, workers=workers, dtype="float32", device="cpu")


def layout(pipeline: Pipeline) -> list[tuple[str, int, int]]:
    return [(stage.name, stage.start, stage.end) for stage in pipeline.stages]


def live_sequences(pipeline: Pipeline) -> dict[str, int]:
    return {
        stage.name: stage.connection.info().live_sequences
        for stage in pipeline.stages
        if isinstance(stage, RemoteStage)
    }


# ---- 1. greedy tokens over 1, 2 and 3 workers equal a single node ----

PLACEMENTS: dict[str, list[tuple[int, int] | None]] = {
    "1-worker-automatic": [None],
    "2-workers-automatic": [None, None],
    "2-workers-manual": [(0, 2), (2, 3)],
    "3-workers-manual": [(0, 1), (1, 2), (2, 3)],
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_greedy_tokens_equal_single_node(
    placement: str, workers: list[WorkerProcess], llama: ModelSource, single_node_tokens: list[int]
) -> None:
    ranges = PLACEMENTS[placement]
    specs = [worker.spec(layers) for worker, layers in zip(workers, ranges, strict=False)]
    pipeline = build_pipeline(settings_for(llama, specs), llama, "cpu")
    try:
        stages = layout(pipeline)
        # Every layer runs on a worker (automatic placement leaves nothing on the master); manual ranges are kept.
        assert all(name in {spec.name for spec in specs} for name, _, _ in stages), stages
        if ranges[0] is not None:
            assert stages == [(spec.name, *layers) for spec, layers in zip(specs, ranges, strict=True) if layers]
        tokens = generate_tokens(pipeline, llama.tokenizer, llama.tokenizer.encode(PROMPT))
        assert tokens == single_node_tokens
        assert all(stage.stats.calls > 0 and stage.stats.bytes_sent > 0 for stage in pipeline.stages)
        # 10. The finished sequence's KV caches are gone from every worker.
        assert set(live_sequences(pipeline).values()) == {0}
    finally:
        pipeline.close()


@pytest.mark.parametrize(
    ("kind", "ranges"),
    [
        ("qwen2", [(0, 1), (1, 2)]),  # 2 layers, attention biases
        # 3 layers: a sliding one with the local rope on each worker, the full one on the first; the master scales
        # the embedding and applies the (1 + weight) final norm.
        ("gemma3", [(0, 2), (2, 3)]),
    ],
    ids=["qwen2", "gemma3"],
)
def test_other_architectures_over_two_workers(
    kind: str, ranges: list[tuple[int, int]], workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory
) -> None:
    source = resolve_model(str(tiny_model_factory(kind)))
    prompt = source.tokenizer.encode(PROMPT)
    expected = generate_tokens(local_pipeline(source, torch.float32), source.tokenizer, prompt)
    specs = [worker.spec(layers) for worker, layers in zip(workers, ranges, strict=False)]
    pipeline = build_pipeline(settings_for(source, specs), source, "cpu")
    try:
        assert layout(pipeline) == [(spec.name, *layers) for spec, layers in zip(specs, ranges, strict=True)]
        assert generate_tokens(pipeline, source.tokenizer, prompt) == expected
    finally:
        pipeline.close()


# ---- 2. a remote stage computes what the same layers compute locally ----


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_remote_stage_output_equals_local_stage(
    dtype: torch.dtype, tolerance: float, workers: list[WorkerProcess], llama: ModelSource
) -> None:
    assignment = Assignment(llama.model_id, json.dumps(llama.weights.config), llama.weights, 1, 3, dtype)
    connection = WorkerConnection(workers[0].spec(), None, None)
    connection.handshake()
    connection.assign(assignment)
    remote = RemoteStage(connection, assignment)
    layers = load_transformer(
        llama.weights, llama.config, 1, 3, with_embedding=False, with_head=False, dtype=dtype, device="cpu"
    )
    local = LocalStage(layers)
    generator = torch.Generator().manual_seed(0)
    hidden_size = llama.config.hidden_size
    steps = [
        # Two sequences of different lengths prefilling together,
        [SequenceSlice(7, 0, 5), SequenceSlice(9, 0, 3)],
        # then both decoding one token (attending to their own caches only),
        [SequenceSlice(7, 5, 1), SequenceSlice(9, 3, 1)],
        # then one prefilling a chunk while the other decodes, in the other order.
        [SequenceSlice(9, 4, 4), SequenceSlice(7, 6, 1)],
    ]
    try:
        for batch in steps:
            hidden = torch.randn(sum(s.n_tokens for s in batch), hidden_size, generator=generator).to(dtype)
            expected = local.forward(hidden, batch)
            got = remote.forward(hidden, batch)
            assert got.dtype == dtype and got.shape == hidden.shape
            assert not torch.allclose(expected, hidden, atol=0.1)  # the layers did change the hidden states
            torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
        assert connection.info().live_sequences == 2
        remote.release([7, 9])
        assert connection.info().live_sequences == 0
    finally:
        remote.close()


# ---- 3. manual placement from cluster.yaml, the master keeping the middle layer ----


def test_cluster_yaml_with_master_keeping_the_middle_layer(
    tmp_path: Path, workers: list[WorkerProcess], llama: ModelSource, single_node_tokens: list[int]
) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        "workers:\n"
        f'  - name: first\n    address: {workers[0].address}\n    layers: "model.layers.0"\n'
        f'  - name: last\n    address: {workers[1].address}\n    layers: "2-2"\n'
    )
    cluster_file = load_cluster_file(config)
    assert [(w.name, w.layers) for w in cluster_file.workers] == [("first", (0, 1)), ("last", (2, 3))]
    pipeline = build_pipeline(settings_for(llama, cluster_file.workers), llama, "cpu")
    try:
        assert layout(pipeline) == [("first", 0, 1), ("master", 1, 2), ("last", 2, 3)]
        assert isinstance(pipeline.stages[1], LocalStage)
        assert generate_tokens(pipeline, llama.tokenizer, llama.tokenizer.encode(PROMPT)) == single_node_tokens
        assert live_sequences(pipeline) == {"first": 0, "last": 0}
    finally:
        pipeline.close()


# ---- a worker re-assigned behind the master's back (another master) is not used with the wrong layers ----


def test_worker_reassigned_by_someone_else_turns_down_and_is_restored(
    workers: list[WorkerProcess], llama: ModelSource, single_node_tokens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "TAKEOVER_IDLE_S", 1.0)  # taken back once the other party leaves it idle
    pipeline = build_pipeline(settings_for(llama, [workers[0].spec((0, 3))]), llama, "cpu")
    try:
        intruder = WorkerConnection(workers[0].spec(), None, None)
        try:
            intruder.assign(
                Assignment(llama.model_id, json.dumps(llama.weights.config), llama.weights, 1, 3, torch.float32)
            )
        finally:
            intruder.close()
        wait_until(lambda: not pipeline.healthy(), 3.0, "the master noticing its worker holds other layers")
        wait_until(pipeline.healthy, 15.0, "the master re-assigning its layers")
        assert generate_tokens(pipeline, llama.tokenizer, llama.tokenizer.encode(PROMPT)) == single_node_tokens
    finally:
        pipeline.close()


def test_closing_a_pipeline_frees_its_layers_on_the_workers(workers: list[WorkerProcess], llama: ModelSource) -> None:
    """/models/unload and a master's shutdown: the worker drops the weights (they stay in its disk cache)."""
    pipeline = build_pipeline(settings_for(llama, [workers[0].spec((0, 3))]), llama, "cpu")
    observer = WorkerConnection(workers[0].spec(), None, None)
    try:
        held = observer.info()
        assert held.status == pb.WORKER_STATUS_READY and held.weights_bytes > 0
        stale = WorkerConnection(workers[0].spec(), None, None)
        stale.assignment = 12345  # not the worker's: ignored
        stale.unassign()
        stale.close()
        assert observer.info().status == pb.WORKER_STATUS_READY
        pipeline.close()
        freed = observer.info()
        assert (freed.status, freed.weights_bytes, freed.HasField("layers")) == (pb.WORKER_STATUS_IDLE, 0, False)
    finally:
        observer.close()
        pipeline.close()


def test_with_no_model_loaded_the_workers_are_still_described(workers: list[WorkerProcess], llama: ModelSource) -> None:
    """/system/info without a model (after /models/unload) listed no workers, though they ran: it asks them."""
    from cake_py.cluster.master import probe_workers

    gone = WorkerSpec("gone", f"127.0.0.1:{free_port()}")
    settings = settings_for(llama, [workers[0].spec(), gone])
    pipeline = build_pipeline(settings_for(llama, [workers[0].spec((0, 3))]), llama, "cpu")
    try:
        held, down = probe_workers(settings, 2.0)
        assert (held["status"], held["layers"], held["model_id"]) == ("assigned", [0, 3], llama.model_id)
    finally:
        pipeline.close()
    idle, down = probe_workers(settings, 2.0)
    assert (idle["name"], idle["host"], idle["status"], idle["layers"], idle["healthy"]) == (
        workers[0].name,
        workers[0].address,
        "idle",
        None,
        True,
    )
    assert idle["device"] == "cpu" and idle["ram_total_bytes"] > 0 and idle["cake_version"]
    assert (down["name"], down["status"], down["healthy"]) == ("gone", "down", False)
    assert gone.address in down["error"]


# ---- 10. sequences are released on every worker, also when several ran in one batch ----


def test_concurrent_sequences_are_released_on_every_worker(
    workers: list[WorkerProcess], llama: ModelSource, single_node_tokens: list[int]
) -> None:
    specs = [workers[0].spec((0, 1)), workers[1].spec((1, 3))]
    pipeline = build_pipeline(settings_for(llama, specs), llama, "cpu")
    engine = Engine(pipeline, llama.tokenizer)
    engine.start()
    try:
        short, long = llama.tokenizer.encode(PROMPT), llama.tokenizer.encode(PROMPT + " and the city sleeps") * 3
        events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        engine.submit(long, greedy(40), events.put)  # runs alongside the next one, in the same batches
        first = collect(engine, short, greedy(32), timeout=60)
        assert token_ids(first) == single_node_tokens
        second = collect(engine, short, greedy(8), timeout=60)
        assert token_ids(second) == single_node_tokens[:8]
        assert engine.in_flight == 0
        assert live_sequences(pipeline) == {workers[0].name: 0, workers[1].name: 0}
    finally:
        engine.stop()
        pipeline.close()


def _seeded_choices(engine: Engine, prompt: list[int], share: bool) -> list[list[int]]:
    """Three seeded choices of one prompt, the later ones copying the first one's prefill when `share`."""
    params = [SamplingParams(temperature=0.9, max_tokens=10, seed=seed, ignore_eos=True) for seed in range(3)]
    sinks: list[queue.SimpleQueue[GenerationEvent]] = [queue.SimpleQueue() for _ in params]
    leader = None
    with engine.submitting():  # one request's choices start in one step, as the HTTP routes submit them
        for choice, sink in zip(params, sinks, strict=True):
            seq_id = engine.submit(prompt, choice, sink.put, share_prefill_with=leader if share else None)
            leader = leader or seq_id
    tokens = []
    for sink in sinks:
        events = [sink.get(timeout=60)]
        while not events[-1].finished:
            events.append(sink.get(timeout=60))
        assert events[-1].finish_reason == "length", events[-1]
        tokens.append(token_ids(events))
    return tokens


def test_choices_copy_one_prefill_on_every_worker(workers: list[WorkerProcess], llama: ModelSource) -> None:
    """n > 1: each worker copies the first choice's caches for the others, chained; tokens as on a single node."""
    prompt = llama.tokenizer.encode(PROMPT + " and the city sleeps") * 3
    single = Engine(local_pipeline(llama, torch.float32), llama.tokenizer)
    single.start()
    try:
        expected = _seeded_choices(single, prompt, share=False)
    finally:
        single.stop()
    specs = [workers[0].spec((0, 1)), workers[1].spec((1, 3))]
    pipeline = build_pipeline(settings_for(llama, specs), llama, "cpu")
    engine = Engine(pipeline, llama.tokenizer)
    engine.start()
    try:
        assert _seeded_choices(engine, prompt, share=True) == expected
        assert engine.stats.prompt_tokens == len(prompt) + 2  # one prefill; the others computed one token each
        wait_until(lambda: live_sequences(pipeline) == {workers[0].name: 0, workers[1].name: 0}, 5.0, "releases")
    finally:
        engine.stop()
        pipeline.close()


def _greedy(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    events = collect(engine, prompt, greedy(max_tokens), 60.0)
    assert events[-1].error is None, events[-1].error
    return token_ids(events)


def test_a_chat_turn_copies_the_kept_prefix_on_every_worker(workers: list[WorkerProcess], llama: ModelSource) -> None:
    """Prefix caching through workers: the second turn copies the first turn's caches on every stage (chained) and
    computes only its new tokens; its tokens are a single node's. A worker that lost the kept caches costs a retry."""
    first_turn = llama.tokenizer.encode(PROMPT + " and the night is long") * 3
    specs = [workers[0].spec((0, 1)), workers[1].spec((1, 3))]
    pipeline = build_pipeline(settings_for(llama, specs), llama, "cpu")
    engine = Engine(pipeline, llama.tokenizer, prefix_cache_tokens=4096)
    single = Engine(local_pipeline(llama, torch.float32), llama.tokenizer)
    engine.start()
    single.start()
    try:
        answer = _greedy(engine, first_turn, 8)
        second_turn = first_turn + answer + llama.tokenizer.encode(" and then?")
        wait_until(lambda: engine.in_flight == 0, 5.0, "the first turn to finish")
        before = engine.stats.prompt_tokens
        assert _greedy(engine, second_turn, 8) == _greedy(single, second_turn, 8)
        kept = len(first_turn) + len(answer) - 1
        assert engine.stats.prefix_cached_tokens == kept
        assert engine.stats.prompt_tokens - before == len(second_turn) - kept
        # Choices of the first turn's prompt again: each copies the kept cache in the same step (a worker checks
        # every copy before it makes any: one copying the leader, which holds nothing yet, would fail the step).
        wait_until(lambda: engine.in_flight == 0, 5.0, "the second turn to finish")
        assert _seeded_choices(engine, first_turn, share=True) == _seeded_choices(single, first_turn, share=False)
        assert engine.stats.prefix_cached_tokens == kept + 3 * (len(first_turn) - 1)
        # The workers drop what the master keeps (as their idle timeout would): the next turn is computed whole.
        wait_until(lambda: engine.in_flight == 0, 5.0, "the choices to finish")
        copied = engine.stats.prefix_cached_tokens
        pipeline.release(list(engine.prefix_cache._entries))  # noqa: SLF001
        third_turn = second_turn + [5, 6, 7]
        assert _greedy(engine, third_turn, 6) == _greedy(single, third_turn, 6)
        assert engine.stats.prefix_cached_tokens == copied
    finally:
        engine.stop()
        single.stop()
        pipeline.close()


def test_embeddings_through_workers_equal_a_single_node(workers: list[WorkerProcess], llama: ModelSource) -> None:
    """An embedding's hidden states come back from the last worker (chained) and are pooled on the master: the same
    vector as a single node, for both poolings, a prompt prefilled over several steps included."""
    prompt = llama.tokenizer.encode(PROMPT + " and the night is long") * 2
    specs = [workers[0].spec((0, 1)), workers[1].spec((1, 3))]
    pipeline = build_pipeline(settings_for(llama, specs), llama, "cpu")
    engine = Engine(pipeline, llama.tokenizer, max_batch_tokens=8)
    single = Engine(local_pipeline(llama, torch.float32), llama.tokenizer)
    engine.start()
    single.start()
    try:
        for kind in ("last", "mean"):
            params = SamplingParams(max_tokens=0, pooling=Pooling(kind))
            ours, theirs = (collect(e, prompt, params, 60.0)[-1].embedding for e in (engine, single))
            assert ours is not None and theirs is not None
            vectors = [torch.frombuffer(bytearray(data), dtype=torch.float32) for data in (ours, theirs)]
            torch.testing.assert_close(vectors[0], vectors[1], rtol=0.0, atol=1e-5)
        assert engine.stats.steps >= 2 * -(-len(prompt) // 8)
        wait_until(lambda: live_sequences(pipeline) == {workers[0].name: 0, workers[1].name: 0}, 5.0, "releases")
    finally:
        engine.stop()
        single.stop()
        pipeline.close()


def test_speculative_drafts_through_workers_equal_a_single_node(
    workers: list[WorkerProcess], llama: ModelSource
) -> None:
    """Prompt lookup drafts travel as multi-token slices through the chained workers; rejected drafts' positions are
    rewritten on every worker by the next slice: the tokens are a single node's, one at a time."""
    grammar = compiler_for(llama.tokenizer).compile(regex_grammar("(ab cd ){4}(ab ce ){4}"))
    params = SamplingParams(temperature=0.0, max_tokens=60, grammar=grammar)
    prompt = llama.tokenizer.encode(PROMPT)
    specs = [workers[0].spec((0, 1)), workers[1].spec((1, 3))]
    pipeline = build_pipeline(settings_for(llama, specs), llama, "cpu")
    engine = Engine(pipeline, llama.tokenizer, speculative_tokens=4)
    single = Engine(local_pipeline(llama, torch.float32), llama.tokenizer)
    engine.start()
    single.start()
    try:
        expected = token_ids(collect(single, prompt, params, 60.0))
        assert token_ids(collect(engine, prompt, params, 60.0)) == expected
        stats = engine.stats
        assert 0 < stats.accepted_draft_tokens < stats.draft_tokens  # drafts held, and some were rewritten
        assert stats.steps < single.stats.steps
        wait_until(lambda: live_sequences(pipeline) == {workers[0].name: 0, workers[1].name: 0}, 5.0, "releases")
    finally:
        engine.stop()
        single.stop()
        pipeline.close()


# ---- 7. the weight cache: a restarted worker downloads nothing; a damaged file is streamed again ----


def test_weight_cache_survives_a_restart_and_repairs_a_damaged_file(
    cluster: LocalCluster, llama: ModelSource, single_node_tokens: list[int]
) -> None:
    worker = cluster.worker(name="cached")
    worker.start()
    assignment = Assignment(llama.model_id, json.dumps(llama.weights.config), llama.weights, 0, 3, torch.float32)

    def assign() -> pb.AssignReply:
        connection = WorkerConnection(worker.spec(), None, None)
        try:
            return connection.assign(assignment)
        finally:
            connection.close()

    first = assign()
    manifest = WorkerConnection(worker.spec(), None, None).manifest(assignment)
    total = sum({spec.sha256: spec.size_bytes for spec in manifest}.values())
    assert (first.received_bytes, first.reused_bytes) == (total, 0)
    assert total > 100_000

    worker.stop()
    worker.start()  # same port, same --cache-dir
    again = assign()
    assert (again.received_bytes, again.reused_bytes) == (0, total)
    assert "0.0 MB received" in worker.stderr

    # Damage one cached tensor without changing its size: the worker must notice and ask for it again.
    victim = max(manifest, key=lambda spec: spec.size_bytes)
    path = worker.cache_dir / victim.sha256[:2] / victim.sha256
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    path.write_bytes(bytes(data))
    repaired = assign()
    assert repaired.received_bytes == victim.size_bytes
    assert "damaged" in worker.stderr
    assert hashlib.sha256(path.read_bytes()).hexdigest() == victim.sha256

    pipeline = build_pipeline(settings_for(llama, [worker.spec()]), llama, "cpu")
    try:
        assert generate_tokens(pipeline, llama.tokenizer, llama.tokenizer.encode(PROMPT)) == single_node_tokens
    finally:
        pipeline.close()
        worker.stop()


def test_the_master_says_how_far_a_weight_stream_is(
    cluster: LocalCluster, llama: ModelSource, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large model streamed for minutes with nothing on the master's log between its start and its end."""
    from cake_py.rpc import connection

    worker = cluster.worker(name="progress")
    worker.start()
    monkeypatch.setattr(connection, "PROGRESS_EVERY_S", 0.0)  # a line per chunk
    assignment = Assignment(llama.model_id, json.dumps(llama.weights.config), llama.weights, 0, 3, torch.float32)
    link = WorkerConnection(worker.spec(), None, None)
    try:
        with caplog.at_level(logging.INFO, logger="cake_py.rpc.connection"):
            link.assign(assignment)
    finally:
        link.close()
        worker.stop()
    assert re.search(r"worker 'progress' at \S+: streaming [\d.]+ MB of weights for layers 0-2", caplog.text)
    shares = [int(share) for share in re.findall(r"MB streamed \((\d+)%\)", caplog.text)]
    assert shares and shares == sorted(shares) and shares[-1] == 100, caplog.text


# ---- 1b. the real model, SmolLM2-135M, in float32 over two workers ----


@pytest.mark.slow
def test_smollm2_over_two_workers_equals_single_node(workers: list[WorkerProcess]) -> None:
    smollm = resolve_model(None)
    prompt = smollm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    expected = generate_tokens(local_pipeline(smollm, torch.float32), smollm.tokenizer, prompt, max_tokens=16)
    n_layers = smollm.config.n_layers
    specs = [workers[1].spec((0, n_layers // 2)), workers[2].spec((n_layers // 2, n_layers))]
    pipeline = build_pipeline(settings_for(smollm, specs), smollm, "cpu")
    try:
        assert [stage.name for stage in pipeline.stages] == [spec.name for spec in specs]
        tokens = generate_tokens(pipeline, smollm.tokenizer, prompt, max_tokens=16, timeout=120)
        assert tokens == expected
        assert "Paris" in smollm.tokenizer.decode(tokens)
    finally:
        pipeline.close()


# ---- a sequence its master never releases is freed after --kv-idle-seconds ----


def first_layers_on(worker: WorkerProcess, llama: ModelSource) -> tuple[WorkerConnection, RemoteStage]:
    """Start `worker` and assign it the model's first 3 layers, in float32: its connection and the stage."""
    worker.start()
    assignment = Assignment(llama.model_id, json.dumps(llama.weights.config), llama.weights, 0, 3, torch.float32)
    connection = WorkerConnection(worker.spec(), None, None)
    connection.handshake()
    connection.assign(assignment)
    return connection, RemoteStage(connection, assignment)


def test_worker_frees_sequences_no_master_releases(cluster: LocalCluster, llama: ModelSource) -> None:
    worker = cluster.worker("--kv-idle-seconds", "1", name="reaper")
    connection, remote = first_layers_on(worker, llama)
    try:
        remote.forward(torch.randn(4, llama.config.hidden_size), [SequenceSlice(5, 0, 4)])
        assert connection.info().live_sequences == 1
        wait_until(lambda: connection.info().live_sequences == 0, 10.0, "the idle sequence to be freed")
    finally:
        remote.close()
        worker.kill()


# ---- a worker keeps --keep-free-mb of its host's memory from KV caches ----


def test_a_worker_refuses_kv_caches_that_would_take_the_memory_it_keeps_free(
    cluster: LocalCluster, llama: ModelSource
) -> None:
    """No host has 100 TB free: the first cache fails to grow, with the error the master recognises (faults.py), and
    the worker serves on."""
    worker = cluster.worker("--keep-free-mb", str(100 * 1024 * 1024), name="tight")
    connection, remote = first_layers_on(worker, llama)
    try:
        with pytest.raises(StageError, match=f"{KVMemoryError.MARK}: .* under the 100.0 TiB kept free"):
            remote.forward(torch.randn(4, llama.config.hidden_size), [SequenceSlice(5, 0, 4)])
        assert connection.info().status == pb.WORKER_STATUS_READY
    finally:
        remote.close()
        worker.kill()


# ---- chained forward: each worker passes its output to the next, the last answers the master ----


def remote_stages(pipeline: Pipeline) -> list[RemoteStage]:
    return [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]


def test_workers_chain_and_fall_back_to_the_master_when_one_cannot_reach_the_next(
    workers: list[WorkerProcess], llama: ModelSource, single_node_tokens: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    specs = [worker.spec(layers) for worker, layers in zip(workers, PLACEMENTS["3-workers-manual"], strict=True)]
    prompt = llama.tokenizer.encode(PROMPT)
    pipeline = build_pipeline(settings_for(llama, specs), llama, "cpu")
    try:
        assert generate_tokens(pipeline, llama.tokenizer, prompt) == single_node_tokens
        stages = remote_stages(pipeline)
        steps = stages[0].stats.calls
        assert [stage.chained_calls for stage in stages] == [steps] * 3
        assert all(stage.describe()["chained_calls"] == steps for stage in stages)

        # The master reaches the last worker, the middle one cannot (a wrong port): the middle worker answers the
        # master with its output, the master runs the last stage itself, and stops chaining these workers.
        fast = stages[2]._fast
        assert fast is not None
        fast.port = free_port()  # only what the chain tells the middle worker; the master's socket stays open
        assert generate_tokens(pipeline, llama.tokenizer, prompt) == single_node_tokens
        assert f"cannot pass its output to {stages[2].name!r}" in caplog.text
        assert not any(stage.chainable() for stage in stages)
        assert stages[2].chained_calls == steps and stages[2].stats.calls > steps
    finally:
        pipeline.close()


def test_no_chain_sends_every_hop_through_the_master(
    workers: list[WorkerProcess], llama: ModelSource, single_node_tokens: list[int]
) -> None:
    specs = [workers[0].spec((0, 2)), workers[1].spec((2, 3))]
    settings = settings_for(llama, specs)
    settings.chain = False
    pipeline = build_pipeline(settings, llama, "cpu")
    try:
        assert generate_tokens(pipeline, llama.tokenizer, llama.tokenizer.encode(PROMPT)) == single_node_tokens
        assert [stage.chained_calls for stage in remote_stages(pipeline)] == [0, 0]
        assert all(stage.stats.calls > 0 for stage in remote_stages(pipeline))
    finally:
        pipeline.close()


def test_chained_request_to_an_unreachable_worker_is_answered_with_the_output(
    workers: list[WorkerProcess], llama: ModelSource
) -> None:
    """The protocol itself: a worker that cannot reach `next` answers on the master's connection, hidden included."""
    assignment = Assignment(llama.model_id, json.dumps(llama.weights.config), llama.weights, 0, 3, torch.float32)
    connection = WorkerConnection(workers[0].spec(), None, None)
    reply = connection.handshake()
    connection.assign(assignment)
    client = DataPlaneClient("127.0.0.1", reply.data_port, None, None)
    client.connect(timeout=5)
    hidden = torch.randn(4, llama.config.hidden_size)
    request = pb.ForwardRequest(
        request_id=7,
        sequences=[pb.SequenceSlice(seq_id=99, start_pos=0, n_tokens=4)],
        next=[pb.ChainHop(host="127.0.0.1", data_port=free_port(), session=b"x" * 16, name="ghost")],
        reply_session=client.session,
    )
    encode_tensor(hidden, out=request.hidden)
    try:
        answer = pb.ForwardReply.FromString(client.exchange(request.SerializeToString()))
        assert answer.request_id == 7 and not answer.error
        assert "'ghost'" in answer.chain_error and "refused" in answer.chain_error.lower()
        assert len(answer.chain_forward_us) == 1
        expected = LocalStage(load_transformer(llama.weights, llama.config, 0, 3, with_embedding=False,
                                               with_head=False, dtype=torch.float32))  # fmt: skip
        want = expected.forward(hidden, [SequenceSlice(99, 0, 4)])
        torch.testing.assert_close(decode_tensor(answer.hidden), want, atol=1e-5, rtol=1e-5)
    finally:
        client.close()
        connection.release([99])
        connection.close()


# ---- --cpus: master and workers sharing one core, every thread of theirs on it ----


def _thread_cpus(pid: int) -> set[str]:
    """The Cpus_allowed_list of every thread of a process."""
    found = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found.add(line.split(":", 1)[1].strip())
    return found


def test_master_and_worker_pinned_to_one_cpu(cluster: LocalCluster, tiny_model_factory: TinyModelFactory) -> None:
    cpu = str(max(os.sched_getaffinity(0)))  # the last CPU: not where an unpinned process would report alone
    worker = cluster.worker("--cpus", cpu, name="pinned")
    worker.start()
    master = cluster.serve(str(tiny_model_factory("llama")), "--workers", worker.address, "--cpus", cpu)
    try:
        reply = httpx.post(
            f"{master.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0}, timeout=60
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        topology = httpx.get(f"{master.url}/api/v1/topology", timeout=10).json()
        assert [w["layers"] for w in topology["workers"]] == [["model.layers.0", "model.layers.1", "model.layers.2"]]
        for process in (worker, master):
            assert process.process is not None
            assert _thread_cpus(process.process.pid) == {cpu}, process.name
    finally:
        master.kill()
        worker.kill()


# ---- the forward fast path, and the gRPC stream when a worker offers none ----


def test_fast_path_by_default_and_grpc_stream_without_it(
    cluster: LocalCluster, workers: list[WorkerProcess], llama: ModelSource, single_node_tokens: list[int]
) -> None:
    plain = cluster.worker("--data-port", "-1", name="grpc-only")
    plain.start()
    try:
        settings = settings_for(llama, [workers[0].spec((0, 2)), plain.spec((2, 3))])
        pipeline = build_pipeline(settings, llama, "cpu")
        try:
            prompt = llama.tokenizer.encode(PROMPT)
            assert generate_tokens(pipeline, llama.tokenizer, prompt) == single_node_tokens
            assert [s.transport for s in pipeline.stages if isinstance(s, RemoteStage)] == ["fast", "grpc"]
        finally:
            pipeline.close()
    finally:
        plain.kill()


def test_a_failed_fast_path_connect_is_tried_again(
    workers: list[WorkerProcess], llama: ModelSource, single_node_tokens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One failed connect (a busy port, a slow TLS handshake) turned the fast path off for good."""
    real_connect, failures = DataPlaneClient.connect, [1]

    def flaky(self: DataPlaneClient, timeout: float) -> None:
        if failures:
            failures.pop()
            raise ClusterError("the connection closed")
        real_connect(self, timeout)

    monkeypatch.setattr(DataPlaneClient, "connect", flaky)
    pipeline = build_pipeline(settings_for(llama, [workers[0].spec((0, 3))]), llama, "cpu")
    try:
        prompt = llama.tokenizer.encode(PROMPT)
        stage = next(s for s in pipeline.stages if isinstance(s, RemoteStage))
        assert generate_tokens(pipeline, llama.tokenizer, prompt) == single_node_tokens
        assert stage.transport == "grpc"  # the gRPC stream carried it meanwhile
        time.sleep(1.1)  # the first wait
        assert generate_tokens(pipeline, llama.tokenizer, prompt) == single_node_tokens
        assert stage.transport == "fast"
    finally:
        pipeline.close()


# ---- a model that fails while its layers are handed out leaves no channel open ----


def test_weights_failing_during_assignment_close_every_worker_channel(
    workers: list[WorkerProcess], llama: ModelSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []
    real_close = WorkerConnection.close

    def failing_assign(self: WorkerConnection, assignment: Assignment) -> None:
        raise WeightsError("tensor 'model.layers.0.mlp.up_proj.weight' is truncated")

    def recording_close(self: WorkerConnection) -> None:
        closed.append(self.spec.name)
        real_close(self)

    monkeypatch.setattr(WorkerConnection, "assign", failing_assign)
    monkeypatch.setattr(WorkerConnection, "close", recording_close)
    specs = [workers[0].spec((0, 2)), workers[1].spec((2, 3))]
    with pytest.raises(WeightsError, match="truncated"):
        build_pipeline(settings_for(llama, specs), llama, "cpu")
    assert set(closed) == {spec.name for spec in specs}  # every channel (closing one twice is harmless)


def test_one_worker_listed_under_two_addresses_is_a_startup_error(
    workers: list[WorkerProcess], llama: ModelSource
) -> None:
    port = workers[0].spec().address.rpartition(":")[2]
    specs = [WorkerSpec("a", f"127.0.0.1:{port}"), WorkerSpec("b", f"localhost:{port}")]
    with pytest.raises(ClusterError, match=r"'a' \(127\.0\.0\.1:\d+\) and 'b' \(localhost:\d+\) are the same worker"):
        build_pipeline(settings_for(llama, specs), llama, "cpu")
