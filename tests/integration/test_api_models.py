"""Model management over a real server: unload, load the embedded SmolLM2 (503 while switching), answer, load back."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from cake_py.api import management
from cake_py.errors import WeightsError
from cake_py.models.hub import EMBEDDED_MODEL_ID
from tests.fixtures.fake_hub import HubBehaviour, fake_hub, folder_files
from tests.fixtures.server import ServerHandle, running_server, tiny_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama, model_name="tiny")) as handle:
        yield handle


def test_unload_then_generation_routes_say_no_text_model(server: ServerHandle, tiny_llama: Path) -> None:
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        assert http.get("/models/current").json()["model_id"] == tiny_llama.name
        assert http.post("/models/unload").json() == {"status": "unloaded", "model_id": "tiny"}
        assert http.post("/generate", json={"prompt": "hi"}).json() == {"detail": "No text model loaded"}
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert (chat.status_code, chat.json()) == (404, {"error": "No text model loaded"})
        assert http.get("/v1/models").json()["data"] == []
        assert http.get("/health").json()["running"] is False
        assert http.get("/metrics").status_code == 200


def test_load_switches_the_model_and_answers_503_meanwhile(
    server: ServerHandle, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome: dict[str, httpx.Response] = {}
    # The new engine is built only once the requests below were answered: they come while the model is switched on
    # any machine (polled against a real load, a fast one could end the switch between the 503 and the next two).
    building, go_on, build = threading.Event(), threading.Event(), management.build_engine

    def held_build(*args: Any) -> Any:
        building.set()
        go_on.wait(60)
        return build(*args)

    monkeypatch.setattr(management, "build_engine", held_build)

    def load() -> None:
        outcome["load"] = httpx.post(f"{server.base_url}/models/load", json={"model_id": None}, timeout=120)

    loader = threading.Thread(target=load)
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        loader.start()
        try:
            assert building.wait(60), "the load never started building"
            seen = [http.post("/generate", json={"prompt": "hi", "max_length": 1})]
            health = http.get("/health")
            busy = http.post("/models/load", json={"model_id": None})
        finally:
            go_on.set()
        loader.join()
        assert seen[0].status_code == 503, seen[0].text
        assert "loading model" in seen[0].json()["detail"]
        assert seen[0].headers["retry-after"] == "5"
        assert (health.status_code, health.json()["status"]) == (503, "loading")
        assert busy.status_code == 503 and "already" in busy.json()["detail"]
        assert busy.headers["retry-after"] == "5"
        loaded = outcome["load"]
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["model_id"] == EMBEDDED_MODEL_ID
        assert http.get("/v1/models").json()["data"][0]["id"] == EMBEDDED_MODEL_ID
        available = http.get("/models/available").json()
        assert available["current"] == EMBEDDED_MODEL_ID
        embedded = next(m for m in available["models"] if m["model_id"] == EMBEDDED_MODEL_ID)
        assert embedded["loaded"] is True and embedded["load_as"] is None
        started_with = next(m for m in available["models"] if m["model_id"] == str(tiny_llama))  # still listed
        assert started_with["sources"] == ["configured"] and started_with["loaded"] is False
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = http.post("/chat", json={"messages": question, "max_length": 24, "do_sample": False}).json()
        assert "Paris" in answer["choices"][0]["message"]["content"]


def test_load_back_by_path_and_a_bad_id_leaves_the_served_model(server: ServerHandle, tiny_llama: Path) -> None:
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        missing = http.post("/models/load", json={"model_id": str(tiny_llama / "missing")})
        assert missing.status_code == 404
        not_a_model = http.post("/models/load", json={"model_id": str(tiny_llama / "config.json")})
        assert not_a_model.status_code == 400  # there, but no model: docs/api.md's "unreadable or malformed"
        assert "neither a model folder nor a .gguf file" in not_a_model.json()["detail"]
        assert http.get("/models/current").json()["loaded"] is True  # still serving the previous model
        back = http.post("/models/load", json={"model_id": str(tiny_llama)})
        assert back.status_code == 200
        assert back.json()["n_layers"] == 3
        assert http.post("/generate", json={"prompt": "hi", "max_length": 2}).status_code == 200


def test_a_model_that_fails_to_build_leaves_the_previous_one_served(
    server: ServerHandle, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    config = json.loads((broken / "config.json").read_text())
    build, builds = management.build_engine, [0]

    def out_of_memory_once(*args: Any) -> Any:  # what still fails once the files' headers are found sound
        builds[0] += 1
        if builds[0] == 1:
            raise WeightsError("cannot place layers 0-2 on cpu in float32: out of memory")
        return build(*args)

    monkeypatch.setattr(management, "build_engine", out_of_memory_once)
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        missing_key = http.post("/models/load", json={"model": str(broken)})
        assert missing_key.status_code == 400 and "model_id is required" in missing_key.json()["detail"]
        failed = http.post("/models/load", json={"model_id": str(broken)})
        assert failed.status_code == 400, failed.text  # the request's model is bad, not the server
        detail = failed.json()["detail"]
        assert "out of memory" in detail and "is served again" in detail and builds[0] == 2, detail
        # Integers where weights go: refused from the header, before the served model is dropped (no build at all).
        tensors = load_file(broken / "model.safetensors")
        tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.2.mlp.up_proj.weight"].to(torch.int32)
        save_file(tensors, broken / "model.safetensors")
        integers = http.post("/models/load", json={"model_id": str(broken)})
        assert integers.status_code == 400, integers.text
        detail = integers.json()["detail"]
        assert "'model.layers.2.mlp.up_proj.weight'" in detail and "stored as I32" in detail, detail
        assert "served again" not in detail and builds[0] == 2, detail
        (broken / "config.json").write_text(json.dumps({**config, "hidden_size": float("inf")}))  # Infinity
        unreadable = http.post("/models/load", json={"model_id": str(broken)})
        assert unreadable.status_code == 400, unreadable.text
        detail = unreadable.json()["detail"]
        assert "config.json has a malformed field: hidden_size must be a whole number, got inf" in detail
        current = http.get("/models/current").json()
        assert current["loaded"] is True and current["n_layers"] == 3
        assert (current["model_id"], current["load_as"]) == (tiny_llama.name, str(tiny_llama))  # loadable anywhere
        # The served model answers to the path it was loaded as, which /models/available calls it by.
        available = http.get("/models/available").json()
        assert available["current"] == str(tiny_llama)
        assert next(m for m in available["models"] if m["model_id"] == str(tiny_llama))["loaded"] is True
        answer = http.post("/generate", json={"prompt": "hi", "max_length": 2, "model_id": str(tiny_llama)})
        assert answer.status_code == 200, answer.text
        wrong_type = http.post("/generate", json={"prompt": "hi", "model_id": 5})
        assert wrong_type.status_code == 400 and "model_id" in wrong_type.json()["detail"]


def test_a_hub_that_stops_answering_is_a_502_naming_it(
    server: ServerHandle, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub's ConnectError (its file server refusing connections) was a 500 "internal error"."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as probe:  # a port where nothing listens: the file server refuses connections
        probe.bind(("127.0.0.1", 0))
        refusing = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with fake_hub({"org/tiny": folder_files(tiny_llama)}, HubBehaviour(weights_at=refusing)) as endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            failed = http.post("/models/load", json={"model_id": "org/tiny"})
            assert failed.status_code == 502, failed.text  # the Hub's failure: neither the model's nor this server's
            detail = failed.json()["detail"]
            assert detail.startswith("cannot download 'org/tiny': the Hub or its file server stopped answering"), detail
            assert http.get("/models/current").json()["loaded"] is True  # still serving the previous model
