"""GET /api/v1/topology: the master's own node (its layers' caches, its engine's state)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from starlette.testclient import TestClient

from cake_py.api.app import create_app
from cake_py.api.state import ServerState
from cake_py.api.topology import topology_document
from cake_py.engine.engine import Engine
from cake_py.engine.faults import ENGINE_DEAD
from cake_py.models.kv_cache import SequenceSlice


def test_the_master_node_shows_the_caches_its_stages_hold(
    split_engine: Callable[[list[tuple[str, int, int]]], Engine], tiny_state: Callable[[Engine | None], ServerState]
) -> None:
    engine = split_engine([("master", 0, 1), ("master", 1, 3)])  # the master keeps two runs of layers
    for seq_id, prompt in ((1, [5, 6, 7]), (2, [8, 9])):  # two sequences prefilled through every stage
        engine.pipeline.logits(torch.tensor(prompt), [SequenceSlice(seq_id, 0, len(prompt))], [len(prompt) - 1])
    held = sum(stage.describe()["kv_cache_bytes"] for stage in engine.pipeline.stages)
    assert held > 0

    master = topology_document(tiny_state(engine))["master"]
    assert master["kv_cache_bytes"] == held
    assert master["live_sequences"] == 2
    assert master["status"] == "up" and master["error"] is None
    assert master["layers"] == ["model.layers.0", "model.layers.1", "model.layers.2"]


class _ThreadKiller(BaseException):
    """Ends the engine thread the way a bug would: past every handler of the step loop."""


def test_a_master_whose_engine_died_is_shown_down_with_why(
    split_engine: Callable[[list[tuple[str, int, int]]], Engine],
    tiny_state: Callable[[Engine | None], ServerState],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = split_engine([("master", 0, 3)])
    state = tiny_state(engine)
    assert topology_document(state)["master"]["status"] == "up"

    def broken_drain() -> None:
        raise _ThreadKiller

    monkeypatch.setattr(engine, "_drain_inbox", broken_drain)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's death is the point
    engine.start()
    assert engine.join(10) and engine.died
    master = topology_document(state)["master"]
    assert master["status"] == "down"
    assert master["error"] == ENGINE_DEAD


def test_a_model_switch_is_503_and_no_model_is_404(
    split_engine: Callable[[list[tuple[str, int, int]]], Engine], tiny_state: Callable[[Engine | None], ServerState]
) -> None:
    engine = split_engine([("master", 0, 3)])
    state = tiny_state(engine)
    with TestClient(create_app(state)) as client:
        assert client.get("/api/v1/topology").status_code == 200
        # What /models/load and /models/unload set while they run: the old engine is gone, the new one not there.
        state.engine, state.source, state.switching = None, None, "loading model 'tiny'"
        switching = client.get("/api/v1/topology")
        assert switching.status_code == 503
        assert switching.json() == {"error": "the server is loading model 'tiny'; retry shortly"}
        assert switching.headers["Retry-After"] == "5"
        state.switching = None
        unloaded = client.get("/api/v1/topology")
        assert unloaded.status_code == 404
        assert unloaded.json() == {"error": "No text model loaded"}
    engine.close()  # taken off the state by hand: the app's shutdown no longer sees it
