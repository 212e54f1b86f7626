"""Gemma 2 on real `cake worker` processes: its soft-capped attention computed on the workers and its capped logits on
the master give a single node's greedy tokens and logprobs, which are transformers' own; and `cake serve` answers a
system message that Gemma 2's chat template refuses with a 400 naming the template's reason."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path

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
from tests.fixtures.tiny_models import copy_model

pytestmark = pytest.mark.timeout(180)

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)
PROMPT = [5 + (i * 13) % 300 for i in range(20)]  # with 24 tokens more, past the 16-position window
# google/gemma-2-2b-it's chat template as published: no system role.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def workers(cluster: LocalCluster) -> list[WorkerProcess]:
    return cluster.start_workers(2)


def _answer(engine: Engine, prompt: list[int]) -> list[tuple[int, float]]:
    """Each generated token with its logprob."""
    sink: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    engine.submit(prompt, GREEDY, sink.put)
    out: list[tuple[int, float]] = []
    while True:
        event = sink.get(timeout=60)
        assert event.error is None, event.error
        out += [(token.token_id, token.logprob or 0.0) for token in event.tokens]
        if event.finished:
            return out


@torch.inference_mode()
def test_gemma2_over_two_workers_equals_a_single_node_and_transformers(
    workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory
) -> None:
    """The workers hold every layer (windowed, full, windowed) and cap their attention scores; the master caps the
    logits that the logprobs come from."""
    import transformers

    folder = tiny_model_factory("gemma2")
    source = resolve_model(str(folder))
    specs = [workers[0].spec((0, 2)), workers[1].spec((2, 3))]
    settings = ServeSettings(model=source.model_id, workers=specs, dtype="float32", device="cpu")
    engine = Engine(build_pipeline(settings, source, "cpu"), source.tokenizer)
    single = Engine(local_pipeline(source, torch.float32), source.tokenizer)
    engine.start()
    single.start()
    try:
        split, alone = _answer(engine, PROMPT), _answer(single, PROMPT)
    finally:
        engine.stop()
        single.stop()
        engine.pipeline.close()
    assert [token for token, _ in split] == [token for token, _ in alone]
    assert [logprob for _, logprob in split] == pytest.approx([logprob for _, logprob in alone], abs=1e-4)
    # transformers' logprobs of the same tokens, from its capped logits.
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(PROMPT + [token for token, _ in split])
    logits = reference(ids[None]).logits[0, len(PROMPT) - 1 : -1]
    assert logits.abs().max() <= source.config.final_logit_softcapping
    expected = torch.log_softmax(logits, dim=-1).gather(1, ids[len(PROMPT) :, None])[:, 0]
    assert [logprob for _, logprob in split] == pytest.approx(expected.tolist(), abs=1e-4)


def test_a_system_message_gemma2s_template_refuses_is_a_400(
    cluster: LocalCluster, workers: list[WorkerProcess], tiny_model_factory: TinyModelFactory, tmp_path: Path
) -> None:
    folder = copy_model(tiny_model_factory("gemma2"), tmp_path)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = GEMMA2_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    master = cluster.serve(str(folder), "--workers", ",".join(worker.address for worker in workers))
    try:
        url = f"{master.url}/v1/chat/completions"
        user = {"role": "user", "content": "What is the capital of France?"}
        body = {"model": str(folder), "max_tokens": 4, "temperature": 0}
        refused = httpx.post(url, json={**body, "messages": [{"role": "system", "content": "Be brief."}, user]})
        assert refused.status_code == 400, refused.text
        assert refused.json() == {"error": "the model's chat template rejected the messages: System role not supported"}
        answered = httpx.post(url, json={**body, "messages": [user]}, timeout=60)
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["completion_tokens"] == 4
    finally:
        master.stop()
