"""The app with no model loaded: every error is JSON in its route family's shape, with the status DESIGN.md gives."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from cake_py.api.app import create_app
from cake_py.api.openapi import document
from cake_py.api.state import ServerState
from cake_py.config import ServeSettings


@pytest.fixture
def client() -> Iterator[TestClient]:
    state = ServerState(engine=None, source=None, settings=ServeSettings(rate_limit=0))
    with TestClient(create_app(state)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/api/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/embeddings", {"input": "hi"}),
        ("/v1/responses", {"input": "hi"}),
        ("/tokenize", {"prompt": "hi"}),
        ("/detokenize", {"tokens": [1, 2]}),
    ],
)
def test_text_routes_say_no_text_model_in_cake_shape(client: TestClient, path: str, body: dict[str, object]) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 404
    assert response.json() == {"error": "No text model loaded"}


@pytest.mark.parametrize("path", ["/generate", "/chat", "/generate/batch"])
def test_native_routes_say_no_text_model_in_detail_shape(client: TestClient, path: str) -> None:
    response = client.post(path, json={"prompt": "hi"})
    assert response.status_code == 404
    assert response.json() == {"detail": "No text model loaded"}


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v1/images/generations", "No image model loaded"),
        ("/api/v1/image", "No image model loaded"),
        ("/v1/audio/speech", "No audio model loaded"),
    ],
)
def test_media_routes_answer_cakes_404(client: TestClient, path: str, message: str) -> None:
    response = client.post(path, json={"prompt": "a cat", "input": "hello"})
    assert response.status_code == 404
    assert response.json() == {"error": message}


def test_unknown_route_and_wrong_method_are_json(client: TestClient) -> None:
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json() == {"error": "no route for GET /v2/nothing"}
    wrong = client.put("/v1/chat/completions")
    assert wrong.status_code == 405
    assert wrong.json() == {"error": "method PUT is not allowed on /v1/chat/completions"}
    assert client.get("/models/load").json() == {"detail": "method GET is not allowed on /models/load"}


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/chat/completions/"), ("GET", "/health/")])
def test_a_trailing_slash_is_a_json_404_not_a_redirect(client: TestClient, method: str, path: str) -> None:
    """Starlette redirected it: an empty 307 with an absolute Location, where every error is JSON."""
    response = client.request(method, path, json={"messages": []}, follow_redirects=False)
    assert response.status_code == 404
    assert response.json() == {"error": f"no route for {method} {path}"}


def test_without_a_model_health_is_503_not_running_and_models_are_empty(client: TestClient) -> None:
    """Nothing can be served (an unload, a load that lost the previous model): a load balancer must look elsewhere
    (it answered 200 "healthy")."""
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"
    assert health.json()["running"] is False
    assert health.json()["error"] == "No text model loaded: load one with POST /models/load"
    assert client.get("/v1/models").json() == {"object": "list", "data": []}
    assert client.get("/models/current").json() == {"loaded": False, "model_id": None, "name": None}
    unload = client.post("/models/unload")
    assert unload.status_code == 404
    assert unload.json() == {"detail": "No text model loaded"}


def test_load_of_a_missing_model_is_404_naming_it(client: TestClient) -> None:
    response = client.post("/models/load", json={"model_id": "/no/such/model-folder"})
    assert response.status_code == 404
    assert "/no/such/model-folder" in response.json()["detail"]
    bad = client.post("/models/load", json={"model_id": 42})
    assert bad.status_code == 400
    assert "42" in bad.json()["detail"]


def test_malformed_json_is_400_naming_the_problem(client: TestClient) -> None:
    state: ServerState = client.app.state.cake  # type: ignore[attr-defined]
    assert state.engine is None
    response = client.post("/models/load", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]


def test_openapi_describes_every_mounted_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec == document()
    assert spec["openapi"].startswith("3.")
    app = client.app
    for route in app.routes:  # type: ignore[attr-defined]
        assert isinstance(route, Route)
        path = re.sub(r":\w+}", "}", route.path)  # Starlette's {id:path} is OpenAPI's {id}
        assert path in spec["paths"], f"{route.path} is mounted but not in /openapi.json"
        described = set(spec["paths"][path])
        for method in route.methods or ():
            if method != "HEAD":
                assert method.lower() in described, f"{method} {route.path} is not described"
    for operation in (op for item in spec["paths"].values() for op in item.values()):
        for response in operation["responses"].values():
            for media in response.get("content", {}).values():
                ref = media["schema"].get("$ref")
                if ref:
                    assert ref.split("/")[-1] in spec["components"]["schemas"]


def test_metrics_are_prometheus_text_from_a_registry_per_app(client: TestClient) -> None:
    client.get("/health")
    first = client.get("/metrics")
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("text/plain")
    assert 'cake_http_requests_total{method="GET",route="/health",status="503"} 1.0' in first.text
    other = ServerState(engine=None, source=None, settings=ServeSettings())
    with TestClient(create_app(other)) as second:
        assert 'route="/health"' not in second.get("/metrics").text


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000 + b"]" * 100_000, b'{"model_id": ' + b"9" * 5000 + b"}", b"\xff{}", b"{"],
)
def test_json_that_python_cannot_read_is_a_400(client: TestClient, raw: bytes) -> None:
    response = client.post("/models/load", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith("request body is not valid JSON")


def test_system_info_without_a_model_still_lists_the_configured_workers() -> None:
    """It listed none (they were only known through the served pipeline); a worker that cannot be reached is down."""
    from cake_py.config import WorkerSpec
    from tests.fixtures.cluster import free_port

    address = f"127.0.0.1:{free_port()}"
    settings = ServeSettings(rate_limit=0, workers=[WorkerSpec("gpu-box", address)])
    with TestClient(create_app(ServerState(engine=None, source=None, settings=settings))) as client:
        response = client.get("/system/info")
    assert response.status_code == 200
    (worker,) = response.json()["workers"]
    assert (worker["name"], worker["host"], worker["status"], worker["healthy"]) == ("gpu-box", address, "down", False)
    assert address in worker["error"]
