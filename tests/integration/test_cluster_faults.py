"""Faults with real worker processes: killed or paused mid-generation, back again, and seen over HTTP.

Every wait is bounded: a request that hangs, a stage that never turns down or never comes back fails the test.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from cake_py.api import failover as failover_module
from cake_py.api.server import build_pipeline
from cake_py.cluster import master as master_module
from cake_py.cluster.master import available_workers
from cake_py.cluster.pipeline import Pipeline, local_pipeline
from cake_py.config import ServeSettings, WorkerSpec
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.errors import ClusterError
from cake_py.models.hub import ModelSource, resolve_model
from cake_py.models.sampling import SamplingParams
from cake_py.rpc import chain as chain_module
from cake_py.rpc import client as client_module
from cake_py.rpc import connection as connection_module
from cake_py.rpc.client import RemoteStage
from cake_py.rpc.connection import Assignment, WorkerConnection
from cake_py.rpc.dataplane import DataPlaneServer
from cake_py.rpc.pb import worker_pb2 as pb
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import LocalCluster, collect, free_port, generate_tokens, greedy, token_ids, wait_until
from tests.fixtures.server import running_server, slow_steps, tiny_settings

pytestmark = pytest.mark.timeout(120)

PROMPT = "The quick brown cake bakes over the river"
LONG = 450  # tokens: far more than a test waits for before it breaks a worker (the tiny model's context is 512)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("faults")) as running:
        yield running


@pytest.fixture(autouse=True)
def _a_quick_failover_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failover watch looks at the stages every 0.2 s (every second in a server): what a test waits for is then
    the behaviour it checks, not the watch's next look. (Nothing here depends on how seldom it looks.)"""
    monkeypatch.setattr(failover_module, "CHECK_S", 0.2)


@pytest.fixture(scope="module")
def llama(tiny_model_factory: TinyModelFactory) -> ModelSource:
    return resolve_model(str(tiny_model_factory("llama")))


@pytest.fixture(scope="module")
def single_node_tokens(llama: ModelSource) -> list[int]:
    return generate_tokens(local_pipeline(llama, torch.float32), llama.tokenizer, llama.tokenizer.encode(PROMPT))


def finish(events: queue.SimpleQueue[GenerationEvent], timeout: float) -> list[GenerationEvent]:
    """The remaining events of a generation, up to its last; fails instead of hanging."""
    result: list[GenerationEvent] = []
    deadline = time.monotonic() + timeout
    while not result or not result[-1].finished:
        try:
            result.append(events.get(timeout=max(deadline - time.monotonic(), 0.001)))
        except queue.Empty:
            pytest.fail(f"the generation neither finished nor failed within {timeout} s: it hangs")
    return result


def start_long_generation(engine: Engine, prompt: list[int]) -> tuple[int, queue.SimpleQueue[GenerationEvent]]:
    """Submit a long greedy generation; returns its id and events once its first token arrived (it is under way)."""
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    seq_id = engine.submit(prompt, greedy(LONG), events.put)
    first = events.get(timeout=30)
    assert not first.finished, first
    return seq_id, events


def serving_engine(llama: ModelSource, workers: list[WorkerSpec]) -> tuple[Pipeline, Engine]:
    settings = ServeSettings(model=llama.model_id, workers=workers, dtype="float32", device="cpu")
    pipeline = build_pipeline(settings, llama, "cpu")
    engine = Engine(pipeline, llama.tokenizer)
    engine.start()
    return pipeline, engine


# ---- 8. a worker killed mid-generation: an error, not a hang; down at once; back after a restart ----


def test_killed_worker_fails_the_request_and_the_stage_comes_back(
    cluster: LocalCluster, llama: ModelSource, single_node_tokens: list[int]
) -> None:
    worker = cluster.worker()
    worker.start()
    pipeline, engine = serving_engine(llama, [worker.spec()])
    prompt = llama.tokenizer.encode(PROMPT)
    try:
        assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens

        _, events = start_long_generation(engine, prompt)
        worker.kill()
        rest = finish(events, timeout=10)
        last = rest[-1]
        assert last.finish_reason == "error"
        assert isinstance(last.exception, ClusterError)
        assert last.error is not None and worker.address in last.error, last.error
        assert 1 + len(token_ids(rest)) < LONG
        wait_until(lambda: not pipeline.healthy(), 3.0, "the pipeline turning unhealthy")
        refused = collect(engine, prompt, greedy(4), timeout=5)[-1]  # new requests fail at once, never wait
        assert refused.finish_reason == "error" and "is down" in (refused.error or ""), refused.error

        worker.start()  # same port, same cache dir
        wait_until(pipeline.healthy, 15.0, "the master reconnecting to the restarted worker")
        assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens
        assert "0.0 MB received" in worker.stderr  # its layers came from its disk cache

        # An idle worker that dies is noticed by the monitor's pings, within a few seconds.
        worker.kill()
        wait_until(lambda: not pipeline.healthy(), 3.5, "the pipeline noticing an idle worker died")
    finally:
        engine.stop()
        pipeline.close()


# ---- a paused worker: a short stall is waited out; a long one fails the request, and its caches do not leak ----


def test_a_worker_paused_for_a_few_seconds_is_a_stall_its_requests_wait_out(
    cluster: LocalCluster, llama: ModelSource, single_node_tokens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ping unanswered within 1.5 s marked the stage down and failed every request in flight, though the worker
    answered again a second later with the same layers (a GC pause, swapping, a CPU-starved VM)."""
    monkeypatch.setattr(client_module, "SILENT_DOWN_S", 15.0)  # 5 s in a server: room here for a loaded machine
    first, second = cluster.start_workers(2)
    pipeline, engine = serving_engine(llama, [first.spec((0, 1)), second.spec((1, 3))])
    prompt = llama.tokenizer.encode(PROMPT)
    try:
        _, events = start_long_generation(engine, prompt)
        first.pause()  # 4 s: pings a second apart with a 1.5 s timeout, so at least one goes unanswered
        try:
            time.sleep(4.0)
            assert pipeline.healthy()  # a stall, not a worker down: /health stays 200
        finally:
            first.resume()
        rest = finish(events, timeout=60)
        assert rest[-1].finish_reason == "length", rest[-1].error
        assert pipeline.healthy()
        assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens
    finally:
        first.resume()
        engine.stop()
        pipeline.close()


def test_paused_worker_fails_the_request_and_its_stale_caches_are_released(
    cluster: LocalCluster, llama: ModelSource, single_node_tokens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "SILENT_DOWN_S", 2.0)  # 5 s in a server
    first, second = cluster.start_workers(2)
    pipeline, engine = serving_engine(llama, [first.spec((0, 1)), second.spec((1, 3))])
    prompt = llama.tokenizer.encode(PROMPT)
    try:
        _, events = start_long_generation(engine, prompt)
        second.pause()
        paused = time.monotonic()
        last = finish(events, timeout=10)[-1]  # silent for SILENT_DOWN_S: an error in bounded time, not a hang
        assert time.monotonic() - paused >= 1.0  # not at the first late ping (its last answer was <= 1 s before)
        assert last.finish_reason == "error" and last.error is not None and second.address in last.error
        assert "answered nothing for 2 s" in last.error, last.error
        assert not pipeline.healthy()
        stage = pipeline.stages[-1]
        # Its reconnects time out: the reason says it answered before (the hint blamed TLS and the address).
        wait_until(lambda: "it answered before" in str(stage.describe()["error"]), 10.0, "a reconnect failing")
        assert "TLS" not in str(stage.describe()["error"])
        second.resume()
        wait_until(pipeline.healthy, 15.0, "the master reconnecting to the resumed worker")
        # The worker kept its layers (no re-assignment), so the failed sequence's caches must be released explicitly.
        stages = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        wait_until(
            lambda: all(stage.connection.info().live_sequences == 0 for stage in stages),
            5.0,
            "every worker dropping the failed sequence's KV caches",
        )
        assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens
    finally:
        second.resume()
        engine.stop()
        pipeline.close()


# ---- the first worker of a chain killed mid-generation: the master waits on every worker of the chain ----


def test_first_worker_of_a_chain_killed_mid_generation(
    cluster: LocalCluster, llama: ModelSource, single_node_tokens: list[int]
) -> None:
    first = cluster.worker()
    second = cluster.worker("--data-port", str(free_port()))  # the same fast-path port after a restart
    for worker in (first, second):
        worker.launch()  # side by side: their imports overlap
    for worker in (first, second):
        worker.wait_ready()
    pipeline, engine = serving_engine(llama, [first.spec((0, 1)), second.spec((1, 3))])
    stages = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
    prompt = llama.tokenizer.encode(PROMPT)
    try:
        assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens
        assert all(stage.chained_calls > 0 for stage in stages)

        _, events = start_long_generation(engine, prompt)
        first.kill()
        last = finish(events, timeout=10)[-1]
        assert last.finish_reason == "error" and last.error is not None and first.address in last.error, last.error
        wait_until(lambda: not pipeline.healthy(), 3.0, "the pipeline turning unhealthy")

        first.start()
        wait_until(pipeline.healthy, 15.0, "the master reconnecting to the restarted worker")
        chained = stages[1].chained_calls
        assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens
        assert stages[1].chained_calls > chained  # chained again, through the restarted worker

        # The last worker restarts while idle: the first one's link to it is stale and must not swallow a step.
        second.kill()
        wait_until(lambda: not pipeline.healthy(), 3.5, "the pipeline noticing the idle worker died")
        second.start()
        wait_until(pipeline.healthy, 15.0, "the master reconnecting to the restarted worker")
        chained = stages[1].chained_calls
        assert token_ids(collect(engine, prompt, greedy(32), timeout=30)) == single_node_tokens
        assert stages[1].chained_calls > chained
    finally:
        engine.stop()
        pipeline.close()


# ---- a chained forward lost between workers: the step fails in bounded time, the cluster serves on ----


def test_a_chained_forward_lost_on_the_way_fails_the_step(
    cluster: LocalCluster, llama: ModelSource, single_node_tokens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first worker passes its output to a server that takes frames and never answers: both real workers
    stay up and idle, so only their pings' forward_idle_seconds can tell the master its hidden states are gone."""
    monkeypatch.setattr(chain_module, "CHAIN_STALL_S", 2.0)
    black_hole = DataPlaneServer("127.0.0.1", 0, lambda frame: None, None, None)
    black_hole.start()
    first, second = cluster.start_workers(2)
    pipeline, engine = serving_engine(llama, [first.spec((0, 1)), second.spec((1, 3))])
    stages = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
    prompt = llama.tokenizer.encode(PROMPT)
    try:
        assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens
        fast = stages[1]._fast
        assert fast is not None
        fast.port = black_hole.port  # what the chain tells the first worker; the master's own socket stays open
        began = time.monotonic()
        last = collect(engine, prompt, greedy(32), timeout=20)[-1]
        assert last.finish_reason == "error" and last.error is not None and "was lost" in last.error, last.error
        assert time.monotonic() - began < 10
        assert pipeline.healthy() and not any(stage.chainable() for stage in stages)
        assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens  # via the master
    finally:
        engine.stop()
        pipeline.close()
        black_hole.close()


# ---- 9. GET /api/v1/topology answers during a generation, with live figures, and shows a dead worker ----


def test_topology_and_health_over_http_during_generation_and_faults(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = cluster.start_workers(2)
    settings = tiny_settings(tiny_model_factory("llama"), workers=[first.spec((0, 2)), second.spec((2, 3))])
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=5.0) as http:
        engine = server.state.engine
        assert engine is not None
        prompt = engine.tokenizer.encode(PROMPT)
        slow_steps(monkeypatch, server, 0.02)  # LONG tokens take 9 s or more: a fast machine ended them before the GET
        seq_id, events = start_long_generation(engine, prompt)

        began = time.monotonic()
        response = http.get("/api/v1/topology")
        elapsed = time.monotonic() - began
        assert response.status_code == 200, response.text
        # Far under the generation's 9 s, with room for a loaded 2-core machine (1 s left it a thin margin)
        assert elapsed < 3.0, f"topology took {elapsed:.2f} s during a generation"
        topology = response.json()
        assert topology["live"]["requests_in_flight"] == 1  # answered while the generation ran
        assert topology["num_layers"] == 3
        assert topology["master"]["layers"] == []
        assert set(topology["layer_details"]) == {"model.layers.0", "model.layers.1", "model.layers.2"}
        nodes = {node["name"]: node for node in topology["workers"]}
        assert nodes[first.name]["layers"] == ["model.layers.0", "model.layers.1"]
        assert nodes[second.name]["layers"] == ["model.layers.2"]
        for worker in (first, second):
            node = nodes[worker.name]
            assert node["host"] == worker.address
            assert node["status"] == "up"
            assert node["forward_ms"] > 0
            assert node["round_trip_ms"] >= node["forward_ms"]
            assert node["bytes_sent"] > 0 and node["bytes_received"] > 0

        engine.cancel(seq_id)
        assert finish(events, timeout=10)[-1].finish_reason == "cancelled"
        assert http.get("/health").status_code == 200

        second.kill()

        def second_is_down() -> bool:
            document = http.get("/api/v1/topology").json()
            return {node["name"]: node["status"] for node in document["workers"]}[second.name] == "down"

        wait_until(second_is_down, 3.5, "the topology showing the killed worker down")
        health = http.get("/health")
        assert health.status_code == 503, health.text
        completion = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert completion.status_code == 503 and second.name in completion.json()["error"], completion.text
        # A stream is refused before its 200, not with an error inside a 200 stream.
        for path, body in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
            ("/generate", {"prompt": PROMPT, "max_length": 2, "stream": True}),
        ):
            streamed = http.post(path, json=body)
            assert streamed.status_code == 503, (path, streamed.text)
            assert streamed.headers["content-type"] == "application/json"
            assert second.name in streamed.text and streamed.headers["retry-after"] == "5"
        form = http.post("/generate", files={"text": (None, PROMPT)})
        assert form.status_code == 503 and second.name in form.json()["detail"], form.text
        # A model switch now would leave nothing served: it is refused, and the model stays loaded.
        load = http.post("/models/load", json={"model_id": None})
        assert load.status_code == 503 and "still loaded" in load.json()["detail"], load.text
        assert http.get("/models/current").json()["loaded"] is True

        second.start()
        wait_until(lambda: http.get("/health").status_code == 200, 15.0, "/health turning 200 after the restart")
        completion = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] >= 1


def test_with_no_model_served_the_topology_lists_the_workers_as_they_are(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an unload (or a failed load whose restore failed) the topology was a 404, so the cluster view could not
    show the worker at fault, only /health could."""
    from cake_py.api import state as state_module

    monkeypatch.setattr(state_module, "PROBES_REUSED_S", 0.0)  # every call probes (polls of 2 s share one probe)
    first, second = cluster.start_workers(2)
    settings = tiny_settings(tiny_model_factory("llama"), workers=[first.spec((0, 2)), second.spec((2, 3))])
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=30.0) as http:
        assert http.post("/models/unload").status_code == 200
        answer = http.get("/api/v1/topology")
        assert answer.status_code == 200, answer.text
        document = answer.json()
        assert document["state"] == "no_model" and document["model_id"] is None
        nodes = {node["name"]: node for node in document["workers"]}
        assert {name: node["status"] for name, node in nodes.items()} == {first.name: "up", second.name: "up"}
        assert nodes[first.name]["host"] == first.address and nodes[first.name]["layers"] == []
        assert nodes[first.name]["hostname"]  # its host facts, as a served topology shows them
        second.pause()
        try:
            nodes = {node["name"]: node for node in http.get("/api/v1/topology").json()["workers"]}
        finally:
            second.resume()
        assert nodes[first.name]["status"] == "up"
        assert nodes[second.name]["status"] == "down" and second.address in nodes[second.name]["error"]


def test_a_worker_has_one_name_in_every_message_and_a_new_name_after_a_restart(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory
) -> None:
    """--workers entries are shown under the --name their workers report: a worker restarted under another --name
    kept its old one in /health and the topology, and a load that could not reach a worker called it `worker-2`
    (its name before any handshake) while /health and the log said `beta`."""
    first, second = cluster.worker(name="alpha"), cluster.worker(name="beta")
    for worker in (first, second):
        worker.launch()
    for worker in (first, second):
        worker.wait_ready()
    model = tiny_model_factory("llama")
    specs = [WorkerSpec("worker-1", first.address, named=False), WorkerSpec("worker-2", second.address, named=False)]
    settings = tiny_settings(model, workers=specs, connect_timeout=1.0)
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=30.0) as http:

        def names() -> list[str]:
            return [stage["name"] for stage in http.get("/health").json()["stages"]]

        assert names() == ["alpha", "beta"]
        second.stop()
        second.args[second.args.index("--name") + 1] = "gamma"
        second.start()  # same port, same cache
        wait_until(lambda: names() == ["alpha", "gamma"], 20.0, "/health showing the worker's new --name")
        wait_until(lambda: http.get("/health").status_code == 200, 20.0, "the restarted worker serving")
        topology = http.get("/api/v1/topology").json()
        assert [node["name"] for node in topology["workers"]] == ["alpha", "gamma"]

        assert http.post("/models/unload").status_code == 200
        second.kill()
        load = http.post("/models/load", json={"model_id": str(model)})
        assert load.status_code >= 400, load.text
        detail = load.json()["detail"]
        assert f"worker 'gamma' at {second.address}" in detail and "worker-2" not in detail, detail
        down = {node["name"]: node["status"] for node in http.get("/api/v1/topology").json()["workers"]}
        assert down == {"alpha": "up", "gamma": "down"}


def test_a_load_just_after_a_worker_froze_is_refused_and_the_model_stays(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory
) -> None:
    """The load looked at the stages' state as of their last ping: a worker frozen a moment before still looked up,
    the model serving was unloaded, and nothing was served until the worker answered again."""
    first, second = cluster.start_workers(2)
    settings = tiny_settings(tiny_model_factory("llama"), workers=[first.spec((0, 2)), second.spec((2, 3))])
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=30.0) as http:
        second.pause()
        try:
            load = http.post("/models/load", json={"model_id": None})
        finally:
            second.resume()
        assert load.status_code == 503 and "still loaded" in load.json()["detail"], load.text
        assert second.name in load.json()["detail"]
        assert http.get("/models/current").json()["loaded"] is True
        wait_until(lambda: http.get("/health").status_code == 200, 15.0, "/health turning 200 after the pause")
        completion = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert completion.status_code == 200, completion.text


def test_health_and_refusals_say_why_a_worker_is_down(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory
) -> None:
    """A worker restarted with another cluster key was only "down" in /health and in the 503 ("the master reconnects
    on its own": it never will); why was in the master's log alone."""
    worker = cluster.worker("--cluster-key", "right-key")
    worker.start()
    settings = tiny_settings(tiny_model_factory("llama"), workers=[worker.spec()], cluster_key="right-key")
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=30.0) as http:
        worker.stop()
        worker.args[worker.args.index("right-key")] = "another-key"
        worker.start()

        def said() -> bool:
            return "cluster key" in str(http.get("/health").json().get("error"))

        wait_until(said, 20.0, "/health naming the refused cluster key")
        refused = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert refused.status_code == 503 and "cluster key" in refused.json()["error"], refused.text
        assert worker.name in refused.json()["error"]
    worker.stop()


# ---- a worker another master re-assigned: never run on its weights; taken back only once it is left idle ----


def test_a_worker_taken_by_another_master_is_not_used_until_left_idle(
    cluster: LocalCluster,
    llama: ModelSource,
    single_node_tokens: list[int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another model under the same folder name: a name check alone would take its layers for ours.
    other_folder = tmp_path / "other" / "llama"
    shutil.copytree(llama.weights.path, other_folder)
    tensors = load_file(other_folder / "model.safetensors")
    save_file({name: tensor * 1.5 for name, tensor in tensors.items()}, other_folder / "model.safetensors")
    other = resolve_model(str(other_folder))
    assert other.model_id == llama.model_id
    worker = cluster.worker()
    worker.start()
    pipeline, engine = serving_engine(llama, [worker.spec()])
    prompt = llama.tokenizer.encode(PROMPT)
    try:
        assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens
        caplog.set_level(logging.WARNING)
        intruder, intruder_engine = serving_engine(other, [worker.spec()])  # a second master assigns it
        assert "was serving another master" in caplog.text and "this master takes it over" in caplog.text
        try:
            assert token_ids(collect(intruder_engine, prompt, greedy(4), timeout=60)) != single_node_tokens[:4]
            wait_until(lambda: not pipeline.healthy(), 3.5, "the first master noticing the re-assignment")
            refused = collect(engine, prompt, greedy(4), timeout=10)[-1]
            assert refused.finish_reason == "error", refused  # not the other model's tokens
            stage = pipeline.stages[0]
            wait_until(lambda: "now serves another master" in str(stage.describe()["error"]), 10.0, "a clear reason")
            # ...said in the master's log too, once over several tries (it was only in the topology)
            time.sleep(2.0)
            assert caplog.text.count("is still down: ") == 1 and "now serves another master" in caplog.text
            monkeypatch.setattr(client_module, "TAKEOVER_IDLE_S", 0.5)  # the intruder has gone quiet
            wait_until(pipeline.healthy, 15.0, "the first master taking its worker back")
            assert token_ids(collect(engine, prompt, greedy(32), timeout=60)) == single_node_tokens
        finally:
            intruder_engine.stop()
            intruder.close()
    finally:
        engine.stop()
        pipeline.close()


# ---- --failover-after: the model placed again without a dead worker, and with it once it is back ----


def test_failover_serves_without_a_dead_worker_and_takes_it_back(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(failover_module, "BACK_FOR_S", 1.0)  # answering this long before it is taken back
    monkeypatch.setattr(failover_module, "PROBE_S", 0.5)
    first, second = cluster.start_workers(2)
    workers = [first.spec((0, 2)), second.spec((2, 3))]
    settings = tiny_settings(tiny_model_factory("llama"), workers=workers, failover_after=1.0)
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=30.0) as http:

        def greedy_text() -> str:
            answer = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
            assert answer.status_code == 200, answer.text
            return str(answer.json()["choices"][0]["text"])

        def holders() -> dict[str, list[str]]:
            """Who holds which layers; {} while the model is being placed (the topology is then a 503)."""
            answer = http.get("/api/v1/topology")
            if answer.status_code != 200:
                return {}
            document = answer.json()
            found = {node["name"]: node["layers"] for node in document["workers"] if node["layers"]}
            return {**found, "master": document["master"]["layers"]}

        before = greedy_text()
        assert holders() == {
            first.name: ["model.layers.0", "model.layers.1"],
            second.name: ["model.layers.2"],
            "master": [],
        }
        second.kill()

        def served_without_second() -> bool:
            held = holders()
            return bool(held) and second.name not in held and http.get("/health").status_code == 200

        wait_until(served_without_second, 30.0, "the model placed again without the dead worker")
        layers = sorted(layer for held in holders().values() for layer in held)
        assert layers == ["model.layers.0", "model.layers.1", "model.layers.2"]  # every layer has a holder
        assert greedy_text() == before  # the same tokens from the new placement
        assert server.state.failover is not None and server.state.failover.left_out == {second.address}
        named = [(w["name"], w["host"]) for w in http.get("/health").json()["left_out"]]
        assert named == [(second.name, second.address)]
        assert [w["name"] for w in http.get("/api/v1/topology").json()["left_out"]] == [second.name]
        metrics = http.get("/metrics").text
        assert "cake_failover_left_out_workers 1.0" in metrics and "cake_failover_held_sequences 0.0" in metrics

        second.start()  # back on its address: taken back once nothing is generated
        wait_until(lambda: second.name in holders() and http.get("/health").status_code == 200, 30.0, "fail-back")
        assert holders() == {
            first.name: ["model.layers.0", "model.layers.1"],
            second.name: ["model.layers.2"],
            "master": [],
        }
        assert greedy_text() == before
        assert server.state.failover.left_out == set() and http.get("/health").json()["left_out"] == []


def test_a_load_while_a_worker_is_dead_places_the_model_without_it_and_takes_it_back(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --failover-after, /models/load goes over the workers that answer (it was a 503, and nothing served until
    the dead worker came back and the load was sent again); fail-back then restores the configured cluster."""
    monkeypatch.setattr(failover_module, "BACK_FOR_S", 1.0)
    monkeypatch.setattr(failover_module, "PROBE_S", 0.5)
    first, second = cluster.start_workers(2)
    model = tiny_model_factory("llama")
    settings = tiny_settings(model, workers=[first.spec((0, 2)), second.spec((2, 3))], failover_after=1.0)
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=30.0) as http:

        def greedy_text() -> str:
            answer = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
            assert answer.status_code == 200, answer.text
            return str(answer.json()["choices"][0]["text"])

        def holders() -> set[str]:
            """The workers holding layers; none while the model is being placed (the topology is then a 503)."""
            answer = http.get("/api/v1/topology")
            return {node["name"] for node in answer.json()["workers"] if node["layers"]} if answer.is_success else set()

        before = greedy_text()
        assert http.post("/models/unload").status_code == 200
        second.kill()
        loaded = http.post("/models/load", json={"model_id": str(model)})
        assert loaded.status_code == 200, loaded.text
        assert holders() == {first.name} and greedy_text() == before
        assert [w["name"] for w in http.get("/health").json()["left_out"]] == [second.name]

        second.start()
        wait_until(lambda: holders() == {first.name, second.name}, 30.0, "fail-back once the worker answers")
        assert greedy_text() == before and http.get("/health").json()["left_out"] == []


def test_a_request_in_flight_when_a_worker_dies_goes_on_over_the_new_placement(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = cluster.start_workers(2)
    settings = tiny_settings(tiny_model_factory("llama"), workers=[first.spec(), second.spec()], failover_after=1.0)
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=60.0) as http:
        uninterrupted = http.post("/v1/completions", json=body)
        assert uninterrupted.status_code == 200, uninterrupted.text
        engine = server.state.engine
        slow_steps(monkeypatch, server, 0.01)  # 400 tokens take 4 s: the answer had not all been sent before the kill
        pieces, finish = [], None
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: ") :])
                assert "error" not in chunk, chunk
                choice = chunk["choices"][0]
                pieces.append(choice["text"])
                finish = choice["finish_reason"] or finish
                if len(pieces) == 5:
                    second.kill()  # mid-answer: the request waits for the failover, then goes on
        assert server.state.engine is not engine and server.state.failover is not None
        assert server.state.failover.left_out == {second.address}  # it went on over the new placement
        assert finish == "length"
        assert "".join(pieces) == uninterrupted.json()["choices"][0]["text"]  # the same greedy answer, whole


def test_a_failover_placement_that_fails_is_tried_again_and_said_meanwhile(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = cluster.start_workers(2)
    settings = tiny_settings(tiny_model_factory("llama"), workers=[first.spec(), second.spec()], failover_after=1.0)
    real, attempts = failover_module.build_engine, []

    def flaky(*args: Any) -> Any:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise ClusterError("the model fits on none of the nodes left (a test's failure)")
        return real(*args)

    monkeypatch.setattr(failover_module, "build_engine", flaky)
    monkeypatch.setattr(failover_module, "PROBE_S", 0.5)
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=30.0) as http:
        lines: list[str] = []
        started = threading.Event()

        def in_flight() -> None:  # a request under way when the worker dies: it waits, then hears why it ended
            body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as stream:
                for line in stream.iter_lines():
                    lines.append(line)
                    started.set()

        reader = threading.Thread(target=in_flight, daemon=True)
        reader.start()
        assert started.wait(30)
        second.kill()
        wait_until(lambda: len(attempts) >= 1, 30.0, "a first placement without the dead worker")
        reader.join(30)
        assert not reader.is_alive(), "the request in flight was left hanging"
        errors = [line for line in lines if '"error"' in line]
        assert errors and "could not be placed again" in errors[0] and "fits on none" in errors[0], lines[-3:]
        assert [line for line in lines if line][-1] == "data: [DONE]"
        health = http.get("/health")
        if len(attempts) == 1:  # not yet tried again: the reason is what is served
            assert health.status_code == 503 and "fits on none of the nodes left" in health.json()["error"]
            answer = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            assert answer.status_code == 503 and "fits on none" in answer.json()["error"]
        wait_until(lambda: http.get("/health").status_code == 200, 30.0, "the placement tried again")
        assert len(attempts) == 2 and server.state.failover is not None
        assert server.state.failover.left_out == {second.address} and server.state.failover.waiting is None
        answer = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert answer.status_code == 200, answer.text


def test_a_failed_fail_back_serves_again_without_the_worker(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A left-out worker that answers again but cannot take its layers (here: a weight cache too small for any) is
    held off, and the placement that worked is made again."""
    monkeypatch.setattr(failover_module, "PROBE_S", 0.5)
    monkeypatch.setattr(failover_module, "BACK_FOR_S", 1.0)
    first, second = cluster.start_workers(2)
    settings = tiny_settings(tiny_model_factory("llama"), workers=[first.spec(), second.spec()], failover_after=1.0)
    with running_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=30.0) as http:
        failover = server.state.failover
        assert failover is not None
        second.kill()
        wait_until(
            lambda: failover.left_out == {second.address} and http.get("/health").status_code == 200,
            30.0,
            "the model placed without the dead worker",
        )
        second.args += ["--cache-max-gb", "0.000001", "--cache-dir", str(tmp_path / "empty-cache")]
        second.start()
        wait_until(lambda: second.address in failover.held_off, 30.0, "a fail-back tried and failed")
        wait_until(lambda: http.get("/health").status_code == 200, 30.0, "the degraded placement made again")
        assert failover.left_out == {second.address} and failover.waiting is None
        answer = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert answer.status_code == 200, answer.text


def test_a_fail_back_waits_for_what_is_generating(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(failover_module, "PROBE_S", 0.5)
    monkeypatch.setattr(failover_module, "BACK_FOR_S", 0.5)
    first, second = cluster.start_workers(2)
    settings = tiny_settings(tiny_model_factory("llama"), workers=[first.spec(), second.spec()], failover_after=1.0)
    with running_server(settings) as server:
        failover = server.state.failover
        assert failover is not None
        second.kill()
        wait_until(lambda: failover.left_out == {second.address} and server.state.engine is not None, 30.0, "failover")
        engine = server.state.engine
        assert engine is not None
        gate, ended = threading.Event(), threading.Event()

        def held(event: GenerationEvent) -> None:  # the engine thread waits here: the generation stays in flight
            gate.wait(30)
            if event.finished:
                ended.set()

        engine.submit(engine.tokenizer.encode(PROMPT), SamplingParams(temperature=0, max_tokens=4), held)
        second.start()
        time.sleep(3.0)  # answering for longer than BACK_FOR_S, probed several times: held off by the generation
        assert server.state.engine is engine and failover.left_out == {second.address}
        gate.set()
        assert ended.wait(30)  # it ran to its end, not cut by a switch
        wait_until(lambda: not failover.left_out, 30.0, "the fail-back once nothing generates")


def test_failover_does_not_take_a_worker_another_master_is_using(
    cluster: LocalCluster, llama: ModelSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`available_workers` (what a failover placement may take): a worker holding another master's layers counts
    only once that master has left it idle for TAKEOVER_IDLE_S; one holding ours, or nothing, counts at once."""
    worker = cluster.worker()
    worker.start()
    settings = ServeSettings(workers=[worker.spec()])
    assert available_workers(settings, [worker.spec()], 2.0, None) == {worker.address}  # holds nothing
    pipeline, engine = serving_engine(llama, [worker.spec()])
    try:
        assert token_ids(collect(engine, llama.tokenizer.encode(PROMPT), greedy(4), timeout=60))
        assert available_workers(settings, [worker.spec()], 2.0, pipeline) == {worker.address}  # ours
        assert available_workers(settings, [worker.spec()], 2.0, None) == set()  # another master's, just used
        monkeypatch.setattr(master_module, "TAKEOVER_IDLE_S", 0.5)
        time.sleep(1.0)
        assert available_workers(settings, [worker.spec()], 2.0, None) == {worker.address}  # left idle
    finally:
        engine.stop()
        pipeline.close()


def test_a_worker_holding_this_masters_earlier_layers_is_taken_back_at_once(
    cluster: LocalCluster, llama: ModelSource, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker paused while a failover retired its pipeline kept those layers (their drop failed): fail-back
    took it for another master's and waited TAKEOVER_IDLE_S (80 s in all), and a /models/load warned that "another
    master" would fail. The assignment numbers this master's pipelines got say they are its own."""
    from cake_py.cluster.master import assignments_of

    worker = cluster.worker()
    worker.start()
    settings = ServeSettings(workers=[worker.spec()])
    retired, engine = serving_engine(llama, [worker.spec()])  # its layers stay on the worker: never dropped
    try:
        assert token_ids(collect(engine, llama.tokenizer.encode(PROMPT), greedy(4), timeout=60))
        engine.stop()
        placed = assignments_of(retired)
        assert len(placed) == 1
        assert available_workers(settings, [worker.spec()], 2.0, None) == set()  # as another master's: just used
        assert available_workers(settings, [worker.spec()], 2.0, None, placed) == {worker.address}
        caplog.set_level(logging.WARNING)
        spec_settings = ServeSettings(model=llama.model_id, workers=[worker.spec()], dtype="float32", device="cpu")
        again = build_pipeline(spec_settings, llama, "cpu", placed)
        again.close()
        assert "was serving another master" not in caplog.text
    finally:
        engine.stop()
        retired.close()


def test_a_worker_that_hangs_while_it_gets_its_layers_is_given_up_in_seconds(
    cluster: LocalCluster, llama: ModelSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker frozen while it verifies or receives its layers (at startup, a re-assign, a failover placement) fails
    the Assign within ASSIGN_STALL_S, not after Prepare's 60 s deadline or gRPC keepalive's ~70 s, during which a
    failover placement left the whole cluster answering 503."""
    monkeypatch.setattr(connection_module, "ASSIGN_STALL_S", 3.0)  # 10 s in a server: that long here is no more proof
    worker = cluster.worker("--data-port", "-1", name="frozen")
    worker.start()
    assignment = Assignment(llama.model_id, json.dumps(llama.weights.config), llama.weights, 0, 3, torch.float32)
    connection = WorkerConnection(worker.spec(), None, None)
    try:
        connection.handshake()
        worker.pause()
        began = time.monotonic()
        with pytest.raises(ClusterError, match="'frozen' .* stopped answering while verifying its weight cache"):
            connection.assign(assignment)
        assert time.monotonic() - began < connection_module.ASSIGN_STALL_S + 10
        worker.resume()
        assert connection.assign(assignment).received_bytes > 0  # it serves again once it answers
    finally:
        worker.resume()
        connection.close()


def test_a_master_frozen_while_it_streams_weights_leaves_the_worker_free_for_another(
    cluster: LocalCluster, llama: ModelSource
) -> None:
    """A master paused (SIGSTOP) while it streamed a worker its weights held the worker's Assign until the call's
    hour ran out: every other master was refused at once, "loading layers for another assignment", still 8.5 minutes
    later. The worker gives up a stream that sends nothing for --assign-idle-seconds (60 s in a server)."""
    worker = cluster.worker("--assign-idle-seconds", "1", name="shared")
    worker.start()
    assignment = Assignment(llama.model_id, json.dumps(llama.weights.config), llama.weights, 0, 3, torch.float32)
    frozen, other = WorkerConnection(worker.spec(), None, None), WorkerConnection(worker.spec(), None, None)
    thawed = threading.Event()

    def header_then_nothing() -> Iterator[pb.AssignChunk]:  # what the worker reads from a master frozen mid-stream
        yield pb.AssignChunk(
            header=pb.AssignHeader(
                model_id=assignment.model_id,
                config_json=assignment.config_json,
                layers=pb.LayerRange(start=assignment.start, end=assignment.end),
                compute_dtype=pb.DTYPE_FLOAT32,
                tensors=frozen.manifest(assignment),
            )
        )
        thawed.wait(60)

    try:
        frozen.handshake()
        call = frozen._open().Assign.future(header_then_nothing(), timeout=3600)
        wait_until(
            lambda: "assignment failed: the master sent nothing for 1 s" in worker.stderr, 30, "the stream given up"
        )
        assert call.exception(timeout=30) is not None  # ended on the worker's side too
        other.handshake()
        assert other.assign(assignment).layers.end == 3  # not "loading layers for another assignment"
    finally:
        thawed.set()
        frozen.close()
        other.close()
