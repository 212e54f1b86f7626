"""On a CUDA machine, the model, the engine, GPU workers and a GPU master compute what the CPU computes.

CI has no GPU, so these tests are not collected there. On a machine with CUDA, run `pytest tests/gpu --gpu`:
there a missing or unusable GPU fails the run, it does not skip. `CAKE_TEST_GPU_DEVICE=cpu` runs the same tests
on the CPU, only to check the tests' own code on a machine without a GPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from cake_py.api.server import build_pipeline
from cake_py.cluster.hostinfo import host_facts, measure_tflops
from cake_py.cluster.pipeline import Pipeline, local_pipeline
from cake_py.config import ServeSettings
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.hub import ModelSource, embedded_model_path, resolve_model
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.pooling import Pooling
from cake_py.models.sampling import SamplingParams
from cake_py.rpc.client import RemoteStage
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import LocalCluster, WorkerProcess, generate_tokens
from tests.fixtures.tiny_models import KINDS

pytestmark = pytest.mark.timeout(300)

DEVICE = os.environ.get("CAKE_TEST_GPU_DEVICE", "cuda")
PROMPT = "The quick brown cake bakes over the river and the baker"


@pytest.fixture(scope="session", autouse=True)
def gpu_present() -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA device and torch sees none (set CAKE_TEST_GPU_DEVICE=cpu to dry-run)")


def prompt_ids(source: ModelSource) -> list[int]:
    return source.tokenizer.encode(PROMPT)


def prefill_logits(pipeline: Pipeline, ids: list[int]) -> torch.Tensor:
    """(T, vocab) float32 logits of every prompt position, on the CPU; the sequence's caches are freed after."""
    batch = [SequenceSlice(seq_id=1, start_pos=0, n_tokens=len(ids))]
    try:
        return pipeline.logits(torch.tensor(ids, dtype=torch.long), batch, range(len(ids))).cpu()
    finally:
        pipeline.release([1])


# ---- the model on the GPU ----


@pytest.mark.parametrize("kind", KINDS)
def test_float32_on_the_gpu_equals_the_cpu(kind: str, tiny_model_factory: TinyModelFactory) -> None:
    source = resolve_model(str(tiny_model_factory(kind)))
    ids = prompt_ids(source)
    cpu, gpu = local_pipeline(source, torch.float32, "cpu"), local_pipeline(source, torch.float32, DEVICE)
    assert gpu.ends.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(prefill_logits(gpu, ids), prefill_logits(cpu, ids), atol=2e-4, rtol=1e-4)
    # Decode runs other kernels (one query row, replayed as CUDA graphs): greedy tokens must agree too.
    assert generate_tokens(gpu, source.tokenizer, ids) == generate_tokens(cpu, source.tokenizer, ids)
    assert_graphed(gpu)


def assert_graphed(pipeline: Pipeline) -> None:
    """The pipeline's local layers replayed their decode steps as CUDA graphs (on a GPU); a mixture of experts' ran
    eagerly (models/moe.py)."""
    if DEVICE != "cuda":
        return
    model = pipeline.stages[0].model  # type: ignore[attr-defined]
    if model.config.moe is not None:
        assert model._decode_graphs is None
        return
    assert model._decode_graphs is not None and not model._decode_graphs.disabled


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3", "gemma3"])
def test_graphed_decode_across_a_reallocation_equals_eager(kind: str, tiny_model_factory: TinyModelFactory) -> None:
    """A 250-token prompt and 24 tokens more: the caches grow past 256 positions mid-generation (the graph is
    recorded again), and the windowed models slide their window all along (Gemma 3 with a rope per layer kind).
    Graphs, eager and the CPU agree."""
    source = resolve_model(str(tiny_model_factory(kind)))
    ids = [5 + (i * 13) % 300 for i in range(250)]
    graphed = local_pipeline(source, torch.float32, DEVICE)
    eager = local_pipeline(source, torch.float32, DEVICE)
    eager.stages[0].model.cuda_graphs = False  # type: ignore[attr-defined]
    tokens = generate_tokens(graphed, source.tokenizer, ids, max_tokens=24)
    assert tokens == generate_tokens(eager, source.tokenizer, ids, max_tokens=24)
    # Again on the same layers: the first sequence's graph is dropped, the next one's recorded.
    assert generate_tokens(graphed, source.tokenizer, ids, max_tokens=24) == tokens
    assert tokens == generate_tokens(local_pipeline(source, torch.float32, "cpu"), source.tokenizer, ids, 24)
    assert_graphed(graphed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_gpu_stays_close_to_float32(dtype: torch.dtype, tiny_llama: Path) -> None:
    source = resolve_model(str(tiny_llama))
    ids = prompt_ids(source)
    reference = prefill_logits(local_pipeline(source, torch.float32, "cpu"), ids)
    half = prefill_logits(local_pipeline(source, dtype, DEVICE), ids)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    similarity = torch.nn.functional.cosine_similarity(half, reference, dim=-1)
    assert similarity.min() > 0.995, similarity


def test_sampling_features_draw_the_same_tokens_on_the_gpu(tiny_llama: Path) -> None:
    """Seeded sampling with every logits processor: the draw happens on the CPU, so a seed means the same tokens."""
    source = resolve_model(str(tiny_llama))
    ids = prompt_ids(source)
    params = SamplingParams(
        temperature=0.8,
        top_p=0.95,
        top_k=40,
        min_p=0.01,
        repetition_penalty=1.1,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        logit_bias=((ids[0], 2.0), (ids[1], -100.0)),
        seed=1234,
        max_tokens=24,
        min_tokens=4,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=3,
    )

    def draw(device: str) -> tuple[list[int], list[float]]:
        engine = Engine(local_pipeline(source, torch.float32, device), source.tokenizer)
        engine.start()
        try:
            events = _collect(engine, [(ids, params, None)])[0]
        finally:
            engine.stop()
        tokens = [token for event in events for token in event.tokens]
        return [token.token_id for token in tokens], [token.logprob for token in tokens]

    gpu_tokens, gpu_logprobs = draw(DEVICE)
    cpu_tokens, cpu_logprobs = draw("cpu")
    assert gpu_tokens == cpu_tokens
    assert ids[1] not in gpu_tokens
    assert gpu_logprobs == pytest.approx(cpu_logprobs, abs=1e-3)


def test_choices_share_their_prefill_on_the_gpu(tiny_llama: Path) -> None:
    """n > 1: the other choices copy the first one's caches on the device; each samples as if it had its own."""
    source = resolve_model(str(tiny_llama))
    engine = Engine(local_pipeline(source, torch.float32, DEVICE), source.tokenizer, max_batch_tokens=64)
    prompt = [5 + (i * 11) % 300 for i in range(150)]
    seeded = [SamplingParams(temperature=0.9, max_tokens=12, seed=seed, ignore_eos=True) for seed in range(3)]
    engine.start()
    try:
        alone = [_tokens(_collect(engine, [(prompt, params, None)])[0]) for params in seeded]
        before = engine.stats.prompt_tokens
        shared = _collect(engine, [(prompt, params, 0 if index else None) for index, params in enumerate(seeded)])
    finally:
        engine.stop()
    assert [_tokens(events) for events in shared] == alone
    assert engine.stats.prompt_tokens - before == 150 + 2
    assert_graphed(engine.pipeline)  # alone, each was graphed; together, they ran eagerly in one batch


def test_embeddings_on_the_gpu_equal_the_cpu(tiny_llama: Path) -> None:
    """The pooled vector leaves the device for its bytes; both poolings equal the CPU's."""
    source = resolve_model(str(tiny_llama))
    prompt = [5 + (i * 11) % 300 for i in range(40)]
    vectors = {}
    for device in ("cpu", DEVICE):
        engine = Engine(local_pipeline(source, torch.float32, device), source.tokenizer, max_batch_tokens=16)
        engine.start()
        try:
            for kind in ("last", "mean"):
                params = SamplingParams(max_tokens=0, pooling=Pooling(kind))
                [events] = _collect(engine, [(prompt, params, None)])
                assert events[-1].embedding is not None
                vectors[device, kind] = torch.frombuffer(bytearray(events[-1].embedding), dtype=torch.float32)
        finally:
            engine.stop()
    for kind in ("last", "mean"):
        torch.testing.assert_close(vectors[DEVICE, kind], vectors["cpu", kind], rtol=0.0, atol=1e-4)


def _tokens(events: list[GenerationEvent]) -> list[int]:
    return [token.token_id for event in events for token in event.tokens]


def _collect(
    engine: Engine, requests: list[tuple[list[int], SamplingParams, int | None]], timeout: float = 120.0
) -> list[list[GenerationEvent]]:
    """Submit requests together (the third field: the index of the request whose prefill it shares) and wait for
    every one to finish; each request's events in order."""
    results: list[list[GenerationEvent]] = [[] for _ in requests]
    done = threading.Semaphore(0)
    seq_ids: list[int] = []
    with engine.submitting():
        for index, (prompt, params, leader) in enumerate(requests):

            def sink(event: GenerationEvent, index: int = index) -> None:
                results[index].append(event)
                if event.finished:
                    done.release()

            share = seq_ids[leader] if leader is not None else None
            seq_ids.append(engine.submit(prompt, params, sink, share_prefill_with=share))
    for _ in requests:
        assert done.acquire(timeout=timeout), "a generation did not finish in time"
    for events in results:
        assert events[-1].error is None, events[-1].error
    return results


# ---- workers on the GPU ----


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("gpu-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def gpu_workers(cluster: LocalCluster) -> list[WorkerProcess]:
    return cluster.start_workers(2, "--device", DEVICE)


def test_the_host_reports_its_gpu() -> None:
    facts = host_facts(DEVICE, measure_tflops(DEVICE))
    assert facts.backend == torch.device(DEVICE).type and facts.tflops > 0
    if DEVICE == "cuda":
        free, total = torch.cuda.mem_get_info()
        assert facts.memory_total_bytes == total and 0 < facts.memory_free_bytes <= total
        assert facts.memory_id == f"cuda-{torch.cuda.get_device_properties(0).uuid}"


@pytest.mark.parametrize("master_device", ["cpu", DEVICE])
def test_gpu_workers_generate_what_a_single_node_does(
    master_device: str, gpu_workers: list[WorkerProcess], tiny_llama: Path
) -> None:
    source = resolve_model(str(tiny_llama))
    ids = prompt_ids(source)
    expected = generate_tokens(local_pipeline(source, torch.float32, "cpu"), source.tokenizer, ids)
    settings = ServeSettings(
        model=source.model_id, workers=[w.spec() for w in gpu_workers], dtype="float32", device=master_device
    )
    pipeline = build_pipeline(settings, source, master_device)
    try:
        remote = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        assert [stage.name for stage in remote] == [w.name for w in gpu_workers]
        for stage in remote:
            described = stage.describe()
            assert described["backend"] == torch.device(DEVICE).type, described
            host = stage.connection.host
            assert host is not None
            # Both workers share one GPU: placement pools their memory as one.
            assert host.memory_id == remote[0].connection.host.memory_id  # type: ignore[union-attr]
            if DEVICE == "cuda":
                assert host.memory_id.startswith("cuda-")
        assert generate_tokens(pipeline, source.tokenizer, ids) == expected
    finally:
        pipeline.close()


# ---- the real model, served from the GPU ----


def test_the_embedded_model_served_from_gpu_workers_answers_paris(
    cluster: LocalCluster, gpu_workers: list[WorkerProcess]
) -> None:
    model = str(embedded_model_path())
    workers = ",".join(worker.address for worker in gpu_workers)
    master = cluster.serve(model, "--device", DEVICE, "--dtype", "bfloat16", "--workers", workers)
    body = {
        "model": "any",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 24,
    }
    reply = httpx.post(f"{master.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    topology = httpx.get(f"{master.url}/api/v1/topology", timeout=10).json()
    assert topology["master"]["backend"] == torch.device(DEVICE).type
    assert {worker["backend"] for worker in topology["workers"]} == {torch.device(DEVICE).type}
    assert sum(len(worker["layers"]) for worker in topology["workers"]) == topology["num_layers"]
    master.stop()
