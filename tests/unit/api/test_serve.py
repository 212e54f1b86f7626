"""Startup checks of `cake serve` that need no model."""

from __future__ import annotations

import logging

import pytest

from cake_py.api.server import warn_of_an_open_api
from cake_py.config import ServeSettings


def test_ui_auth_alone_warns_that_the_api_is_open(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        warn_of_an_open_api(ServeSettings(ui_auth=("admin", "pw")))
    assert "the API (generation, files, model loading) is open" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_of_an_open_api(ServeSettings(ui_auth=("admin", "pw"), api_keys=("k",)))
        warn_of_an_open_api(ServeSettings())
    assert caplog.text == ""
