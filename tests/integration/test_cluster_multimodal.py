"""Multimodal checkpoints (Gemma 3's, Mistral Small 3.1's: a vision tower beside the language model) on a real
`cake worker`: the worker parses the multimodal config it is sent and builds its layers from the language model's
tensors alone, giving a single node's greedy tokens; `cake serve` answers text and refuses an image with a 400 saying
it only reads text."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import httpx
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
from tests.fixtures.cluster import LocalCluster, WorkerProcess

pytestmark = pytest.mark.timeout(180)

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPT = [5 + (i * 13) % 300 for i in range(20)]  # with 24 tokens more, past the 16-position window


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def worker(cluster: LocalCluster) -> WorkerProcess:
    return cluster.start_workers(1)[0]


def _tokens(engine: Engine, prompt: list[int]) -> list[int]:
    sink: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    engine.submit(prompt, GREEDY, sink.put)
    out: list[int] = []
    while True:
        event = sink.get(timeout=60)
        assert event.error is None, event.error
        out += [token.token_id for token in event.tokens]
        if event.finished:
            return out


@pytest.mark.parametrize("kind", ["gemma3_vision", "mistral3_vision"])
@torch.inference_mode()
def test_multimodal_checkpoint_split_over_a_worker_equals_a_single_node(
    kind: str, worker: WorkerProcess, tiny_model_factory: TinyModelFactory
) -> None:
    """The master holds layer 0 with the embedding and head, the worker layers 1-2."""
    source = resolve_model(str(tiny_model_factory(kind)))
    settings = ServeSettings(model=source.model_id, workers=[worker.spec((1, 3))], dtype="float32", device="cpu")
    engine = Engine(build_pipeline(settings, source, "cpu"), source.tokenizer)
    single = Engine(local_pipeline(source, torch.float32), source.tokenizer)
    engine.start()
    single.start()
    try:
        split, alone = _tokens(engine, PROMPT), _tokens(single, PROMPT)
    finally:
        engine.stop()
        single.stop()
        engine.pipeline.close()
    assert len(split) == GREEDY.max_tokens
    assert split == alone


def test_an_image_part_is_a_400_and_text_is_answered(
    cluster: LocalCluster, worker: WorkerProcess, tiny_model_factory: TinyModelFactory
) -> None:
    folder = tiny_model_factory("gemma3_vision")
    master = cluster.serve(str(folder), "--workers", worker.address)
    try:
        url = f"{master.url}/v1/chat/completions"
        body = {"model": str(folder), "max_tokens": 4, "temperature": 0}
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        parts = [{"type": "text", "text": "What is in this picture?"}, image]
        refused = httpx.post(url, json={**body, "messages": [{"role": "user", "content": parts}]}, timeout=60)
        assert refused.status_code == 400, refused.text
        assert refused.json() == {"error": "messages[0] has a 'image_url' part; this model only reads text"}
        user = {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}
        answered = httpx.post(url, json={**body, "messages": [user]}, timeout=60)
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["completion_tokens"] == 4
    finally:
        master.stop()
