"""GET /metrics: bounded label sets, one series per stage, and engine counters that never go back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from cake_py.api.app import create_app
from cake_py.api.metrics import EngineCollector
from cake_py.api.state import ServerState
from cake_py.cluster.pipeline import local_pipeline
from cake_py.config import ServeSettings
from cake_py.engine.engine import Engine
from cake_py.models.hub import resolve_model
from tests.unit.api.conftest import SplitEngine, TinyState


@pytest.fixture
def client() -> Iterator[TestClient]:
    state = ServerState(engine=None, source=None, settings=ServeSettings(rate_limit=0))
    with TestClient(create_app(state)) as test_client:
        yield test_client


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) of every sample called `name` in a Prometheus exposition."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_made_up_http_methods_share_one_other_label(client: TestClient) -> None:
    for method in ("X12345", "X67890", "BREW", "PROPFIND"):
        client.request(method, "/health")
    client.get("/health")
    client.request("OPTIONS", "/health")
    text = client.get("/metrics").text
    counts = {
        labels["method"]: value
        for labels, value in samples(text, "cake_http_requests_total")
        if labels["route"] == "/health"
    }
    assert counts == {"other": 4.0, "GET": 1.0, "OPTIONS": 1.0}
    assert "X12345" not in text and "BREW" not in text


def test_a_request_refused_before_routing_is_labelled_by_its_route_template(tmp_path: Path) -> None:
    """A 401 (or 413, 429) on a path with parameters was counted under route="unmatched"."""
    settings = ServeSettings(rate_limit=0, api_keys=("sekrit",), files_dir=tmp_path / "files")
    with TestClient(create_app(ServerState(engine=None, source=None, settings=settings))) as client:
        assert client.get("/v1/files/file-abc").status_code == 401
        assert client.post("/v1/batches/batch_1/cancel").status_code == 401
        assert client.get("/no/such/route").status_code == 401
        text = client.get("/metrics", headers={"Authorization": "Bearer sekrit"}).text
    routes = {labels["route"] for labels, _ in samples(text, "cake_http_requests_total") if labels["status"] == "401"}
    assert routes == {"/v1/files/{file_id}", "/v1/batches/{batch_id}/cancel", "unmatched"}


def test_every_stage_has_its_own_series_even_when_names_repeat(
    split_engine: Callable[[list[tuple[str, int, int]]], Engine], tiny_state: Callable[[Engine | None], ServerState]
) -> None:
    # A worker on layer 1 leaves the master two runs of layers, two stages both called "master".
    engine = split_engine([("master", 0, 1), ("gpu-box", 1, 2), ("master", 2, 3)])
    with TestClient(create_app(tiny_state(engine))) as client:
        text = client.get("/metrics").text
    expected = [
        {"stage": "master", "layers": "0-0"},
        {"stage": "gpu-box", "layers": "1-1"},
        {"stage": "master", "layers": "2-2"},
    ]
    for name in (
        "cake_stage_forward_ms",
        "cake_stage_round_trip_ms",
        "cake_stage_calls_total",
        "cake_stage_sent_bytes_total",
        "cake_stage_received_bytes_total",
    ):
        assert [labels for labels, _ in samples(text, name)] == expected, name


ENGINE_COUNTERS = (
    "cake_engine_requests_total",
    "cake_generated_tokens_total",
    "cake_prompt_tokens_total",
    "cake_engine_steps_total",
)


def counters(client: TestClient) -> dict[str, float]:
    """The engine counters and the master stage's calls, from one scrape (a missing series reads as absent)."""
    text = client.get("/metrics").text
    values = {name: value for name in ENGINE_COUNTERS for _, value in samples(text, name)}
    for labels, value in samples(text, "cake_stage_calls_total"):
        values[f"calls {labels['stage']} {labels['layers']}"] = value
    return values


def test_engine_counters_keep_counting_across_unload_and_load(
    tiny_llama: Path, tiny_state: Callable[[Engine | None], ServerState]
) -> None:
    source = resolve_model(str(tiny_llama))
    state = tiny_state(Engine(local_pipeline(source, torch.float32), source.tokenizer))
    with TestClient(create_app(state)) as client:

        def complete() -> int:
            body = {"prompt": "The oven", "max_tokens": 3, "temperature": 0}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200
            tokens: int = response.json()["usage"]["completion_tokens"]
            assert tokens > 0
            return tokens

        first = complete()
        served = counters(client)
        assert served["cake_generated_tokens_total"] == first and served["cake_engine_requests_total"] == 1
        assert served["calls master 0-2"] > 0

        assert client.post("/models/unload").status_code == 200
        assert counters(client) == served  # nothing served now: the totals are still there, not gone or 0

        assert client.post("/models/load", json={"model_id": str(tiny_llama)}).status_code == 200
        assert counters(client) == served  # a fresh engine counts from 0: added to what the others counted
        second = complete()
        again = counters(client)
        live = client.get("/api/v1/topology").json()["live"]  # the dashboard's tiles count for the process too
    assert again["cake_generated_tokens_total"] == first + second and again["cake_engine_requests_total"] == 2
    assert (live["tokens_generated"], live["requests_total"]) == (first + second, 2)
    for name, value in served.items():
        assert again[name] > value, name


def test_a_scrape_racing_an_engine_swap_counts_the_engine_once(
    split_engine: SplitEngine, tiny_state: TinyState
) -> None:
    """The swap happens on the event loop while a scrape renders in a thread: forced here between two metrics."""
    engine = split_engine([("master", 0, 3)])
    engine.stats.tokens_generated, engine.stats.requests_total = 7, 2
    state = tiny_state(engine)
    scrape = EngineCollector(state).collect()
    first = next(scrape)  # cake_model_loaded; the engine and its totals are read by now
    state.engine = None  # /models/unload
    families = {family.name: family for family in [first, *scrape]}
    assert families["cake_generated_tokens"].samples[0].value == 7  # not 14 (live and retired), not 0
    assert families["cake_engine_requests"].samples[0].value == 2
    after = {family.name: family for family in EngineCollector(state).collect()}
    assert after["cake_generated_tokens"].samples[0].value == 7  # retired now, counted once
    assert state.counted == (None, state.retired)


def test_what_an_engine_counts_after_it_was_replaced_is_counted_once_it_stopped(
    split_engine: SplitEngine, tiny_state: TinyState
) -> None:
    """The totals were taken when the engine was replaced, before it stopped: a step still running then added
    tokens nobody counted (clients got 405 tokens, the counter grew by 403)."""
    engine = split_engine([("master", 0, 3)])
    engine.stats.tokens_generated, engine.stats.requests_total = 7, 2
    state = tiny_state(engine)
    state.engine = None  # /models/unload: replaced ...
    engine.stats.tokens_generated += 2  # ... while its last step ran
    engine.pipeline.stages[0].stats.calls += 1
    before = state.retired.stage_calls[("master", 0, 3)]
    state.recount(engine)  # once it stopped
    assert (state.retired.generated_tokens, state.retired.requests) == (9, 2)
    assert state.retired.stage_calls[("master", 0, 3)] == before + 1 and state.counted == (None, state.retired)
    state.recount(engine)  # counted once
    assert state.retired.generated_tokens == 9


def test_a_second_chat_turn_counts_the_prompt_tokens_it_copied(
    tiny_llama: Path, tiny_state: Callable[[Engine | None], ServerState]
) -> None:
    source = resolve_model(str(tiny_llama))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, prefix_cache_tokens=4096)
    with TestClient(create_app(tiny_state(engine))) as client:
        system = {"role": "system", "content": "You answer questions about ovens and bread, briefly. " * 4}
        turn = [system, {"role": "user", "content": "Why does bread rise?"}]
        first = client.post("/v1/chat/completions", json={"messages": turn, "max_tokens": 4, "temperature": 0})
        assert first.status_code == 200
        text = client.get("/metrics").text
        assert samples(text, "cake_prefix_cached_tokens_total") == [({}, 0.0)]
        ((_, kept),) = samples(text, "cake_prefix_cache_kept_tokens")
        assert kept > 0
        turn += [{"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]}]
        turn += [{"role": "user", "content": "And cake?"}]
        second = client.post("/v1/chat/completions", json={"messages": turn, "max_tokens": 4, "temperature": 0})
        assert second.status_code == 200
        ((_, copied),) = samples(client.get("/metrics").text, "cake_prefix_cached_tokens_total")
        assert copied >= first.json()["usage"]["prompt_tokens"] - 1


def test_drafted_and_confirmed_tokens_are_counted(
    tiny_llama: Path, tiny_state: Callable[[Engine | None], ServerState]
) -> None:
    source = resolve_model(str(tiny_llama))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, speculative_tokens=4)
    with TestClient(create_app(tiny_state(engine))) as client:
        # One token far likelier than the rest: the answer repeats it, and the drafts of it hold.
        body = {"prompt": "The oven", "max_tokens": 20, "temperature": 0, "logit_bias": {"77": 30}}
        assert client.post("/v1/completions", json=body).status_code == 200
        text = client.get("/metrics").text
    ((_, drafted),) = samples(text, "cake_draft_tokens_total")
    ((_, confirmed),) = samples(text, "cake_accepted_draft_tokens_total")
    assert drafted >= confirmed > 0
    assert (drafted, confirmed) == (engine.stats.draft_tokens, engine.stats.accepted_draft_tokens)


def test_preemptions_are_counted_across_engines(
    tiny_llama: Path, tiny_state: Callable[[Engine | None], ServerState]
) -> None:
    """Sequences that waited for memory (engine/faults.py `_preempt`): the engine's count, plus a replaced one's."""
    source = resolve_model(str(tiny_llama))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer)
    state = tiny_state(engine)
    with TestClient(create_app(state)) as client:
        engine.stats.preemptions = 2
        ((_, counted),) = samples(client.get("/metrics").text, "cake_preemptions_total")
        assert counted == 2
        replacement = Engine(local_pipeline(source, torch.float32), source.tokenizer)
        state.engine = replacement  # what a model switch does: the old engine's counts are kept
        replacement.stats.preemptions = 1
        ((_, counted),) = samples(client.get("/metrics").text, "cake_preemptions_total")
        assert counted == 3
