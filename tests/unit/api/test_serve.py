"""Startup checks of `cake serve` that need no model."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from cake_py.api import server as server_module
from cake_py.api.server import warn_of_an_open_api
from cake_py.config import ServeSettings
from cake_py.errors import ConfigError, StoppedStarting


def test_ui_auth_alone_warns_that_the_api_is_open(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        warn_of_an_open_api(ServeSettings(ui_auth=("admin", "pw")))
    assert "the API (generation, files, model loading) is open" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_of_an_open_api(ServeSettings(ui_auth=("admin", "pw"), api_keys=("k",)))
        warn_of_an_open_api(ServeSettings())
    assert caplog.text == ""


@pytest.mark.parametrize("stop", [StoppedStarting(signal.SIGTERM), ConfigError("no room")])
def test_a_startup_stopped_after_placing_the_model_frees_the_layers_on_every_stage(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: Path, stop: BaseException
) -> None:
    """A SIGTERM or an error after the pipeline was placed (the engine, the speed measure) left the workers holding
    the layers until another master took them over, 60 s idle later."""
    closed: list[str] = []
    built = server_module.build_pipeline

    def pipeline(*args: object) -> object:
        placed = built(*args)  # type: ignore[arg-type]
        close = placed.close
        monkeypatch.setattr(placed, "close", lambda: (closed.append("pipeline"), close()))
        return placed

    def measure(device: str) -> float:
        raise stop

    monkeypatch.setattr(server_module, "build_pipeline", pipeline)
    monkeypatch.setattr(server_module, "measure_tflops", measure)
    with pytest.raises(type(stop)):
        server_module.build_state(ServeSettings(model=str(tiny_llama), dtype="float32", threads=1))
    assert closed == ["pipeline"]
