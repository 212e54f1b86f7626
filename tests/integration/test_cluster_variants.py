"""The Llama variants (SmolLM3, Granite, OLMo 2) split over real `cake worker` processes compute what one node does.

Each worker builds its layers from the config and tensors the master streams it, so a worker that built a Llama
block in place of the variant's (no NoPE, no branch scaling, the wrong norms) would answer other tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from cake_py.api.server import build_pipeline
from cake_py.cluster.pipeline import local_pipeline
from cake_py.config import ServeSettings
from cake_py.models.hub import resolve_model
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import LocalCluster, WorkerProcess, generate_tokens

pytestmark = pytest.mark.timeout(180)

PROMPT = "The quick brown cake bakes over the river"


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    with LocalCluster(tmp_path_factory.mktemp("variants_cluster")) as cluster:
        yield cluster.start_workers(2)


# 3 layers each: the first worker holds layers 0-1 (SmolLM3's NoPE layer 1 among them), the second layer 2; the
# master keeps the embedding and the head (Granite's embedding and logits scalings, OLMo 2's final norm).
RANGES = [(0, 2), (2, 3)]


@pytest.mark.parametrize("kind", ["smollm3", "granite", "olmo2"])
def test_variant_over_two_workers_equals_single_node(
    kind: str, workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory
) -> None:
    source = resolve_model(str(tiny_model_factory(kind)))
    assert source.config.family == kind
    prompt = source.tokenizer.encode(PROMPT)
    expected = generate_tokens(local_pipeline(source, torch.float32), source.tokenizer, prompt)
    specs = [worker.spec(layers) for worker, layers in zip(workers, RANGES, strict=True)]
    settings = ServeSettings(model=source.model_id, workers=specs, dtype="float32", device="cpu")
    pipeline = build_pipeline(settings, source, "cpu")
    try:
        stages = [(stage.name, stage.start, stage.end) for stage in pipeline.stages]
        assert stages == [(spec.name, *layers) for spec, layers in zip(specs, RANGES, strict=True)]
        assert generate_tokens(pipeline, source.tokenizer, prompt) == expected
    finally:
        pipeline.close()
