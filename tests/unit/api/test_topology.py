"""GET /api/v1/topology: the master's own node (its layers' caches, its engine's state)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import replace

import httpx
import pytest
import torch
from starlette.testclient import TestClient

from cake_py.api import state as state_module
from cake_py.api import topology as topology_module
from cake_py.api.app import create_app
from cake_py.api.state import PROBES_REUSED_S, RecentProbes, ServerState
from cake_py.api.topology import topology_document
from cake_py.config import WorkerSpec
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


def test_a_model_switch_and_no_model_still_list_the_nodes_and_say_why(
    split_engine: Callable[[list[tuple[str, int, int]]], Engine],
    tiny_state: Callable[[Engine | None], ServerState],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A switch answered 503 and no model 404, so the cluster view showed nothing exactly when a worker was in
    trouble (a failed load, a failover placement): only /health named the worker at fault."""
    monkeypatch.setattr(topology_module, "PROBE_TIMEOUT_S", 0.5)
    engine = split_engine([("master", 0, 3)])
    state = tiny_state(engine)
    gone = WorkerSpec("w1", f"127.0.0.1:{_closed_port()}", named=True)  # a configured worker nothing answers for
    state.settings = replace(state.settings, workers=[gone])
    with TestClient(create_app(state)) as client:
        served = client.get("/api/v1/topology").json()
        assert served["state"] == "serving" and served["reason"] is None and served["model_id"]
        # What /models/load and /models/unload set while they run: the old engine is gone, the new one not there.
        state.engine, state.source, state.switching = None, None, "loading model 'tiny'"
        for answer, (kind, reason) in (
            (client.get("/api/v1/topology"), ("switching", "the server is loading model 'tiny'")),
            (_unloaded(state, client), ("no_model", "No text model loaded: load one with POST /models/load")),
        ):
            assert answer.status_code == 200, answer.text
            document = answer.json()
            assert (document["state"], document["reason"]) == (kind, reason)
            assert (document["model"], document["model_id"], document["num_layers"]) == (None, None, None)
            assert document["layer_details"] == {} and document["master"]["layers"] == []
            assert document["master"]["status"] == "up" and document["master"]["hostname"]
            [worker] = document["workers"]
            assert (worker["name"], worker["host"], worker["status"], worker["layers"]) == (
                "w1",
                gone.address,
                "down",
                [],
            )
            assert gone.address in worker["error"]
        state.restore_error = "the previous model 'tiny' could not be loaded again: worker 'w1' froze"
        assert client.get("/api/v1/topology").json()["reason"] == state.restore_error
    engine.close()  # taken off the state by hand: the app's shutdown no longer sees it


def _unloaded(state: ServerState, client: TestClient) -> httpx.Response:
    state.switching = None
    return client.get("/api/v1/topology")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_polls_with_no_model_served_share_one_probe_of_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every poll (each dashboard tab asks every second) probed every worker, a silent one for its whole timeout:
    the polls of PROBES_REUSED_S take one probe's answer, and later ones probe again."""
    now = [100.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: now[0])
    probes: list[int] = []

    def probe() -> list[dict[str, object]]:
        probes.append(1)
        return [{"name": "w1", "status": "down"}]

    recent = RecentProbes()
    first = recent.get(probe)
    first[0]["name"] = "changed by its caller"
    now[0] += PROBES_REUSED_S - 0.1
    assert recent.get(probe) == [{"name": "w1", "status": "down"}] and len(probes) == 1  # a copy each
    now[0] += 0.1
    recent.get(probe)
    assert len(probes) == 2
