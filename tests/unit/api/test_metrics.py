"""GET /metrics: bounded label sets, one series per stage, and engine counters that never go back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from cake_py.api.app import create_app
from cake_py.api.state import ServerState
from cake_py.config import ServeSettings


@pytest.fixture
def client() -> Iterator[TestClient]:
    state = ServerState(engine=None, source=None, settings=ServeSettings(rate_limit=0))
    with TestClient(create_app(state)) as test_client:
        yield test_client


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) of every sample called `name` in a Prometheus exposition."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_made_up_http_methods_share_one_other_label(client: TestClient) -> None:
    for method in ("X12345", "X67890", "BREW", "PROPFIND"):
        client.request(method, "/health")
    client.get("/health")
    client.request("OPTIONS", "/health")
    text = client.get("/metrics").text
    counts = {
        labels["method"]: value
        for labels, value in samples(text, "cake_http_requests_total")
        if labels["route"] == "/health"
    }
    assert counts == {"other": 4.0, "GET": 1.0, "OPTIONS": 1.0}
    assert "X12345" not in text and "BREW" not in text
