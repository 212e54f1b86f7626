"""Mixture-of-experts models on real `cake worker` processes: a master and one or two workers holding the sparse
layers (each worker receiving every expert of its layers by tensor name: 4-bit values from a Q4_0 GGUF in bfloat16, int8
rows from a Q8_0 one) give the single node's greedy tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
import torch

from cake_py.api.server import build_pipeline
from cake_py.cluster.master import layer_bytes
from cake_py.cluster.pipeline import local_pipeline
from cake_py.cluster.stage import LocalStage
from cake_py.config import ServeSettings
from cake_py.models.hub import resolve_model
from cake_py.rpc.client import RemoteStage
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import LocalCluster, WorkerProcess, generate_tokens
from tests.unit.models.test_gguf_moe import write_moe_gguf

pytestmark = pytest.mark.timeout(180)

PROMPT = "The quick brown cake bakes over the river"


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running.start_workers(2)


@pytest.mark.parametrize(
    ("kind", "ranges"),
    [
        ("mixtral", [(0, 2), (2, 3)]),  # every layer sparse, all on the workers
        ("qwen3_moe", [(1, 3)]),  # the master's sparse layer 0; the worker's dense layer 1 and sparse layer 2
        ("qwen2_moe", [(0, 1), (1, 3)]),  # the shared expert's layer 1 on the second worker
    ],
)
def test_moe_layers_on_workers_give_the_single_node_tokens(
    kind: str, ranges: list[tuple[int, int]], workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory
) -> None:
    source = resolve_model(str(tiny_model_factory(kind)))
    assert source.config.moe is not None
    prompt = source.tokenizer.encode(PROMPT)
    expected = generate_tokens(local_pipeline(source, torch.float32), source.tokenizer, prompt)
    specs = [worker.spec(layers) for worker, layers in zip(workers, ranges, strict=False)]
    settings = ServeSettings(model=source.model_id, workers=specs, dtype="float32", device="cpu")
    pipeline = build_pipeline(settings, source, "cpu")
    try:
        remote = [(stage.start, stage.end) for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        assert remote == ranges
        assert generate_tokens(pipeline, source.tokenizer, prompt) == expected
        assert len(set(expected)) > 4  # a model that routes well enough to say something varied
    finally:
        pipeline.close()


@pytest.mark.parametrize(("qtype", "form"), [("Q8_0", "w13_q8"), ("Q4_0", "w13_q4")])
def test_quantized_experts_of_a_gguf_on_a_worker_give_the_single_node_tokens(
    qtype: str, form: str, workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory, tmp_path: Path
) -> None:
    """A Q8_0 or Q4_0 Mixtral GGUF in bfloat16: the worker receives its layers' experts as int8 rows or 4-bit values
    and runs them so, as the master does for its own layer."""
    expert_type = gguf.GGMLQuantizationType[qtype]
    path = write_moe_gguf(tiny_model_factory("mixtral"), tmp_path / "mixtral.gguf", expert_type)
    source = resolve_model(str(path))
    prompt = source.tokenizer.encode(PROMPT)
    single = local_pipeline(source, torch.bfloat16)
    expected = generate_tokens(single, source.tokenizer, prompt)
    settings = ServeSettings(model=source.model_id, workers=[workers[0].spec((1, 3))], dtype="bfloat16", device="cpu")
    pipeline = build_pipeline(settings, source, "cpu")
    try:
        master = pipeline.stages[0]
        assert isinstance(master, LocalStage) and (master.start, master.end) == (0, 1)
        assert getattr(master.model.layers[0].feed_forward, form) is not None  # kept so on the master too
        assert generate_tokens(pipeline, source.tokenizer, prompt) == expected
        # The worker holds its layers in the bytes placement counted for them: experts as int8 rows or 4-bit packs
        # (half a byte a weight), not bf16.
        (remote,) = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        assert remote.connection.info().weights_bytes == sum(layer_bytes(source, torch.bfloat16, "cpu")[1:3])
    finally:
        pipeline.close()
