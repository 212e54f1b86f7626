"""GET /health (and vLLM's /ping): each stage of the served pipeline reports its own state, whatever it is called."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from starlette.testclient import TestClient

from cake_py.api.app import create_app
from cake_py.api.health import health_document
from cake_py.api.state import ServerState
from cake_py.engine.engine import Engine


def test_each_stage_is_up_or_down_on_its_own_even_when_names_repeat(
    split_engine: Callable[[list[tuple[str, int, int]]], Engine],
    tiny_state: Callable[[Engine | None], ServerState],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker that calls itself "master" (cluster.yaml may name it so) holds layer 1 and is down; the master's own
    # stages around it are up.
    engine = split_engine([("master", 0, 1), ("master", 1, 2), ("master", 2, 3)])
    monkeypatch.setattr(engine.pipeline.stages[1], "healthy", lambda: False)
    body, status = health_document(tiny_state(engine))
    assert status == 503
    assert body["status"] == "unhealthy" and body["running"] is False
    assert body["stages"] == [
        {"name": "master", "layers": [0, 1], "up": True},
        {"name": "master", "layers": [1, 2], "up": False},
        {"name": "master", "layers": [2, 3], "up": True},
    ]
    assert body["error"] == "pipeline stage(s) down: master"


def test_vllms_ping_answers_as_health_does(
    split_engine: Callable[[list[tuple[str, int, int]]], Engine],
    tiny_state: Callable[[Engine | None], ServerState],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = split_engine([("master", 0, 1), ("w1", 1, 3)])
    with TestClient(create_app(tiny_state(engine))) as client:
        assert client.get("/ping").status_code == client.post("/ping").status_code == 200
        monkeypatch.setattr(engine.pipeline.stages[1], "healthy", lambda: False)
        down = client.post("/ping")
        assert down.status_code == 503 and down.json() == client.get("/health").json()


def test_status_routes_answer_while_a_stage_is_down_and_generation_gets_retry_after(
    split_engine: Callable[[list[tuple[str, int, int]]], Engine],
    tiny_state: Callable[[Engine | None], ServerState],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """llama.cpp front-ends poll /props and /slots: a worker down is no reason for them to fail."""
    engine = split_engine([("master", 0, 1), ("w1", 1, 3)])
    with TestClient(create_app(tiny_state(engine))) as client:
        monkeypatch.setattr(engine.pipeline.stages[1], "healthy", lambda: False)
        props = client.get("/props")
        assert props.status_code == 200 and props.json()["total_slots"] == engine.max_running
        slots = client.get("/slots")
        assert slots.status_code == 200 and not any(slot["is_processing"] for slot in slots.json())
        refused = client.post("/completion", json={"prompt": "a", "n_predict": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
