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


def test_a_model_whose_template_does_not_compile_is_said_at_startup_and_at_load(
    tiny_llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Such a model still serves completions (its chats fail, each a 500 with the reason), and the server says so
    when the model loads, not only to each chat request."""
    broken = copy_model(tiny_llama, tmp_path)
    settings_file = broken / "tokenizer_config.json"
    tokenizer_config = json.loads(settings_file.read_text())
    settings_file.write_text(json.dumps({**tokenizer_config, "chat_template": "{% for m in messages %}{{ m }"}))
    warning = "the model's chat template does not compile: line 1"
    state = build_state(tiny_settings(broken))
    assert warning in caplog.text and "--chat-template FILE" in caplog.text
    caplog.clear()
    with serving(state) as handle, httpx.Client(base_url=handle.base_url, timeout=120) as http:
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 500 and chat.json()["error"].startswith(warning), chat.text  # the model's fault
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        caplog.clear()  # the 500 was logged with its reason
        assert http.post("/models/load", json={"model_id": str(tiny_llama)}).status_code == 200
        assert warning not in caplog.text
        assert http.post("/models/load", json={"model_id": str(broken)}).status_code == 200
        assert warning in caplog.text
