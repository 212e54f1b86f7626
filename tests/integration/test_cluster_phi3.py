"""Phi-3 and the long-context rope scalings split over real `cake worker` processes: a master with one or two
workers gives the single node's greedy tokens, through the tiny Phi-3's fused projections, partial rotation and
LongRoPE past its original context (64 positions: the 40-token prompt plus 40 tokens pass it while decoding), and
through YaRN's scaled cos and sin."""

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

PROMPT = [5 + (i * 13) % 300 for i in range(40)]
N_TOKENS = 40


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running.start_workers(2)


@pytest.mark.parametrize(
    ("kind", "layers"),
    [
        pytest.param("phi3", [(0, 1), (1, 2)], id="phi3-two-workers"),
        pytest.param("phi3", [(1, 2)], id="phi3-master-and-one-worker"),
        pytest.param("yarn", [(0, 1), (1, 2)], id="yarn-two-workers"),
    ],
)
def test_a_split_model_gives_the_single_nodes_greedy_tokens(
    kind: str, layers: list[tuple[int, int]], workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory
) -> None:
    source = resolve_model(str(tiny_model_factory(kind)))
    specs = [worker.spec(held) for worker, held in zip(workers, layers, strict=False)]
    settings = ServeSettings(model=source.model_id, workers=specs, dtype="float32", device="cpu")
    expected = generate_tokens(local_pipeline(source, torch.float32), source.tokenizer, PROMPT, N_TOKENS)
    pipeline = build_pipeline(settings, source, "cpu")
    try:
        got = generate_tokens(pipeline, source.tokenizer, PROMPT, N_TOKENS)
    finally:
        pipeline.close()
    assert got == expected
    assert len(set(got)) > N_TOKENS // 4  # not one token repeated: the comparison would prove little


@pytest.mark.parametrize("prompt_length", [24, 12], ids=["prompt-past", "decoding-past"])
def test_longrope_past_the_original_context_in_pieces_and_computed_again(
    prompt_length: int, workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory
) -> None:
    """The Phi-3 with an original context of 16 positions over two workers, prompts prefilled in pieces of 8: each
    piece of a 24-token prompt takes the long factors on the workers (the prompt's length crosses the wire with
    it), and a 12-token prompt whose decoding passes the original context is computed again on them; the single
    node, given each prompt in one pass, gives the same tokens."""
    source = resolve_model(str(tiny_model_factory("phi3-longrope")))
    prompt = PROMPT[:prompt_length]
    specs = [worker.spec(held) for worker, held in zip(workers, [(0, 1), (1, 2)], strict=True)]
    settings = ServeSettings(model=source.model_id, workers=specs, dtype="float32", device="cpu")
    expected = generate_tokens(local_pipeline(source, torch.float32), source.tokenizer, prompt, 20)
    pipeline = build_pipeline(settings, source, "cpu")
    try:
        got = generate_tokens(pipeline, source.tokenizer, prompt, 20, max_batch_tokens=8)
    finally:
        pipeline.close()
    assert got == expected
