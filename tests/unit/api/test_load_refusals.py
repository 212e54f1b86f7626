"""POST /models/load of a model that cannot be loaded: a 400 naming the problem, found before the served model is
dropped (it goes on serving, the same engine, never rebuilt)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from cake_py.api import management
from cake_py.api.server import build_state
from tests.fixtures.server import serving, tiny_settings
from tests.fixtures.tiny_models import copy_model


def test_weights_that_do_not_fit_their_config_are_refused_before_the_served_model_goes(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found only while building: the served model was dropped first, then built again (a cluster's weights
    streamed to every worker again) to answer that the new one was bad."""
    broken = copy_model(tiny_llama, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    state = build_state(tiny_settings(tiny_llama))
    served = state.engine
    builds: list[Any] = []
    build = management.build_engine

    def building(*args: Any) -> Any:
        builds.append(args)
        return build(*args)

    monkeypatch.setattr(management, "build_engine", building)
    with serving(state) as handle, httpx.Client(base_url=handle.base_url, timeout=120) as http:
        refused = http.post("/models/load", json={"model_id": str(broken)})
        assert refused.status_code == 400, refused.text
        assert "'model.layers.3.input_layernorm.weight' is missing" in refused.json()["detail"]
        assert builds == [] and state.engine is served  # never dropped, never rebuilt
        assert http.post("/generate", json={"prompt": "hi", "max_length": 2}).status_code == 200
