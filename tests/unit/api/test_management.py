"""A model switch frees the old model before the new one loads: a GPU never has to hold both."""

from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest

from cake_py.api import management
from cake_py.api.server import build_state
from cake_py.errors import ClusterError
from tests.fixtures.server import serving, tiny_settings


@pytest.mark.parametrize("route", ["load", "unload"])
def test_the_old_model_is_gone_before_the_new_one_loads(
    route: str, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = build_state(tiny_settings(tiny_llama))
    assert state.engine is not None
    old_layers = weakref.ref(state.engine.pipeline.stages[0].model)  # type: ignore[attr-defined]
    alive_when_building: list[bool] = []
    released: list[str] = []
    build, release = management.build_engine, management.release_device_memory

    def building(*args: Any) -> Any:
        alive_when_building.append(old_layers() is not None)
        return build(*args)

    def releasing(device: str) -> None:
        release(device)
        released.append(device)

    monkeypatch.setattr(management, "build_engine", building)
    monkeypatch.setattr(management, "release_device_memory", releasing)
    with serving(state) as handle, httpx.Client(base_url=handle.base_url, timeout=120) as http:
        if route == "load":
            assert http.post("/models/load", json={"model_id": str(tiny_llama)}).status_code == 200
            assert alive_when_building == [False]
        else:
            assert http.post("/models/unload").status_code == 200
            assert old_layers() is None
    assert released == ["cpu"]


def test_a_previous_model_that_could_not_be_restored_is_brought_back_when_it_can(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker died during a load: the new model failed and so did the previous one's restore, and the server
    stayed without a model (and /health said 200) until someone loaded one by hand."""
    state = build_state(tiny_settings(tiny_llama))
    build, calls = management.build_engine, [0]

    def failing_twice(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] <= 2:  # the new model, then the previous one's first restore
            raise ClusterError("worker 'w2' at 127.0.0.1:1 is unreachable")
        return build(*args)

    monkeypatch.setattr(management, "build_engine", failing_twice)
    monkeypatch.setattr(management, "RESTORE_FIRST_S", 0.3)
    with serving(state) as handle, httpx.Client(base_url=handle.base_url, timeout=120) as http:
        failed = http.post("/models/load", json={"model_id": str(tiny_llama)})
        assert failed.status_code == 503 and "none is loaded until it can be" in failed.json()["detail"]
        health = http.get("/health")
        assert health.status_code == 503 and "could not be loaded again" in health.json()["error"]
        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http.get("/health").status_code == 200 and calls[0] == 3
        assert http.post("/generate", json={"prompt": "hi", "max_length": 2}).status_code == 200


def test_a_model_the_master_alone_cannot_hold_is_refused_before_the_old_one_goes(
    tiny_llama: Path, tiny_model_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone, the master found a model larger than its memory only by loading it (the OOM killer ended the server),
    after the served model was already dropped. What the current model frees counts: one of the same size loads."""
    from cake_py.cluster import master

    state = build_state(tiny_settings(tiny_llama))
    larger = tiny_model_factory("smollm")
    monkeypatch.setattr(master, "device_memory", lambda device: (8 << 30, 0))  # nothing free beyond the old model
    with serving(state) as handle, httpx.Client(base_url=handle.base_url, timeout=120) as http:
        refused = http.post("/models/load", json={"model_id": str(larger)})
        assert refused.status_code == 400, refused.text
        detail = refused.json()["detail"]
        assert detail.startswith("smollm needs") and "GB free" in detail and "'llama' is still loaded" in detail
        assert http.post("/generate", json={"prompt": "hi", "max_length": 2}).status_code == 200
        assert http.post("/models/load", json={"model_id": str(tiny_llama)}).status_code == 200


def test_a_model_the_master_alone_cannot_hold_is_a_startup_error(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cake_py.cluster import master

    monkeypatch.setattr(master, "device_memory", lambda device: (8 << 30, 1000))
    with pytest.raises(ClusterError, match=r"needs .* GB on cpu and this master has 0.0 GB free"):
        build_state(tiny_settings(tiny_llama))
