"""A split GGUF (llama.cpp's gguf-split) over a master and real `cake worker` processes: placement sizes its layers
from every part, the master streams each worker its layers' tensors from whichever part holds them, and the
greedy tokens equal a single node's on the unsplit file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import pytest
import torch

from cake_py.api.server import build_pipeline
from cake_py.cluster.master import layer_bytes, model_bytes
from cake_py.cluster.pipeline import local_pipeline
from cake_py.config import ServeSettings
from cake_py.models.hub import ModelSource, resolve_model
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import LocalCluster, WorkerProcess, generate_tokens
from tests.fixtures.gguf_split import split_gguf
from tests.unit.models.test_gguf import _write_gguf

pytestmark = pytest.mark.timeout(180)

PROMPT = "The quick brown cake bakes over the river"


@pytest.fixture(scope="module")
def files(tiny_model_factory: TinyModelFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The tiny Llama (3 layers) as one Q8_0 GGUF, and split in 3 parts of 10 tensors: layers straddle parts."""
    root = tmp_path_factory.mktemp("split")
    whole = _write_gguf(tiny_model_factory("llama"), root / "tiny.gguf", lambda _: gguf.GGMLQuantizationType.Q8_0)
    (root / "parts").mkdir()
    return whole, split_gguf(whole, root / "parts" / "tiny.gguf", 10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def workers(cluster: LocalCluster) -> list[WorkerProcess]:
    return cluster.start_workers(2)


@pytest.fixture(scope="module")
def single_node_tokens(files: tuple[Path, list[Path]]) -> list[int]:
    whole = resolve_model(str(files[0]))
    return generate_tokens(local_pipeline(whole, torch.float32), whole.tokenizer, whole.tokenizer.encode(PROMPT))


@pytest.mark.parametrize("ranges", [[(0, 2), (2, 3)], [None, None]], ids=["manual", "automatic"])
def test_a_split_gguf_over_two_workers_equals_a_single_node_on_the_whole_file(
    ranges: list[tuple[int, int] | None],
    files: tuple[Path, list[Path]],
    workers: list[WorkerProcess],
    single_node_tokens: list[int],
) -> None:
    whole, parts = files
    source: ModelSource = resolve_model(str(parts[0]))
    unsplit = resolve_model(str(whole))
    assert layer_bytes(source, torch.float32) == layer_bytes(unsplit, torch.float32) != []
    assert model_bytes(source, torch.float32, "cpu") == model_bytes(unsplit, torch.float32, "cpu")
    specs = [worker.spec(layers) for worker, layers in zip(workers, ranges, strict=True)]
    settings = ServeSettings(model=source.model_id, workers=specs, dtype="float32", device="cpu")
    pipeline = build_pipeline(settings, source, "cpu")
    try:
        assert {stage.name for stage in pipeline.stages} == {spec.name for spec in specs}  # every layer remote
        tokens = generate_tokens(pipeline, source.tokenizer, source.tokenizer.encode(PROMPT))
        assert tokens == single_node_tokens
    finally:
        pipeline.close()


def test_cake_serve_and_models_load_take_a_split_gguf(
    files: tuple[Path, list[Path]], cluster: LocalCluster, workers: list[WorkerProcess]
) -> None:
    whole, parts = files
    master = cluster.serve(str(parts[0]), "--workers", ",".join(worker.address for worker in workers))
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    split_text = httpx.post(f"{master.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    loaded = httpx.post(f"{master.url}/models/load", json={"model_id": str(whole)}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert httpx.post(f"{master.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == split_text
    later = httpx.post(f"{master.url}/models/load", json={"model_id": str(parts[1])}, timeout=120)
    assert later.status_code == 400 and repr(str(parts[0])) in later.json()["detail"], later.text
    master.stop()
