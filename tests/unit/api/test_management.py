"""A model switch frees the old model before the new one loads: a GPU never has to hold both."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest

from cake_py.api import management
from cake_py.api.server import build_state
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
