"""Shared fixtures of the API test modules that name their model: a module-scoped server on the model fixture its
`SERVED_MODEL` names (with `SERVED_OPTIONS` as settings), and the official `openai` client pointed at it. Modules
that need another setup define their own `server` and `client`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from tests.fixtures.server import ServerHandle, running_server, tiny_settings


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[ServerHandle]:
    model = request.getfixturevalue(request.module.SERVED_MODEL)
    options: dict[str, Any] = getattr(request.module, "SERVED_OPTIONS", {})
    with running_server(tiny_settings(model, **options)) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60) as openai_client:
        yield openai_client
