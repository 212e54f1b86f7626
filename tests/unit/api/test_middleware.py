"""Auth, rate limit and body limit middleware: statuses, headers and JSON bodies, on an app with no model."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from cake_py import __version__
from cake_py.api.app import create_app
from cake_py.api.middleware import AuthMiddleware, RateLimiter, RateLimitMiddleware
from cake_py.api.state import ServerState
from cake_py.config import ServeSettings

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _client(**settings: object) -> TestClient:
    state = ServerState(engine=None, source=None, settings=ServeSettings(**settings))  # type: ignore[arg-type]
    return TestClient(create_app(state))


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def keyed() -> Iterator[TestClient]:
    with _client(api_keys=("sekrit",), rate_limit=0) as client:
        yield client


def test_api_key_is_required_on_every_route_but_health(keyed: TestClient) -> None:
    # Answered without the key (503: this state serves no model), never a 401.
    assert keyed.get("/health").status_code == 503 and keyed.get("/health").json()["running"] is False
    assert keyed.get("/ping").status_code == keyed.post("/ping").status_code == 503  # vLLM's probes
    assert keyed.get("/v1/health").status_code == 503  # llama.cpp's other name for it (it was a 404)
    assert keyed.get("/version").json() == {"version": __version__}
    missing = keyed.post("/v1/chat/completions", json=CHAT)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["error"]
    wrong = keyed.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json() == {"error": "invalid API key"}
    native = keyed.get("/models/current")
    assert native.status_code == 401
    assert "detail" in native.json()
    for path in ("/metrics", "/openapi.json", "/system/info", "/api/v1/topology"):
        assert keyed.get(path).status_code == 401, path
    good = {"Authorization": "Bearer sekrit"}
    assert keyed.get("/v1/models", headers=good).status_code == 200
    assert keyed.post("/v1/chat/completions", json=CHAT, headers=good).status_code == 404  # past auth: no model


def test_the_ui_page_loads_without_the_api_key(keyed: TestClient) -> None:
    page = keyed.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")


def test_ui_auth_guards_the_page_and_topology_with_basic() -> None:
    with _client(ui_auth=("admin", "pw"), api_keys=("sekrit",)) as client:
        for path in ("/", "/api/v1/topology"):
            refused = client.get(path)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Basic")
            assert client.get(path, headers=_basic("admin", "wrong")).status_code == 401
        assert "'admin'" in client.get("/", headers=_basic("admin", "wrong")).json()["error"]
        assert client.get("/", headers=_basic("admin", "pw")).status_code == 200
        topology = client.get("/api/v1/topology", headers=_basic("admin", "pw"))
        assert topology.status_code == 200 and topology.json()["state"] == "no_model"
        assert client.get("/health").status_code == 503  # not behind --ui-auth (503: no model in this state)


def test_a_malformed_basic_header_is_a_401_not_a_500() -> None:
    with _client(ui_auth=("admin", "pw")) as client:
        for header in (b"Basic \xe9", b"Basic %%%", b"Basic " + base64.b64encode(b"\xff\xfe")):
            refused = client.get("/", headers={"Authorization": header})
            assert refused.status_code == 401, (header, refused.text)
            assert refused.headers["www-authenticate"].startswith("Basic")


def test_rate_limit_answers_429_with_retry_after_on_generation_routes_only() -> None:
    with _client(rate_limit=60, rate_burst=2) as client:
        statuses = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(2)]
        assert statuses == [404, 404]
        limited = client.post("/v1/chat/completions", json=CHAT)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert "60 requests per minute" in limited.json()["error"]
        native = client.post("/generate", json={"prompt": "hi"})
        assert native.status_code == 429
        assert "detail" in native.json()
        assert all(client.get("/v1/models").status_code == 200 for _ in range(5))  # not a generation route
        # Listing stored chat completions shares the path, not the cost: only the POST is limited.
        assert all(client.get("/v1/chat/completions").status_code == 200 for _ in range(5))
        other_token = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer other"})
        assert other_token.status_code == 429  # a new bearer token is not a new client


def test_rate_limit_buckets_are_per_client_address() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = RateLimitMiddleware(app, per_minute=60, burst=1)
    statuses: list[int] = []

    async def record(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def run() -> None:
        for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
            scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [], "client": (address, 1)}
            await middleware(scope, receive, record)

    asyncio.run(run())
    assert statuses == [200, 429, 200]


def test_rate_limit_zero_turns_it_off() -> None:
    with _client(rate_limit=0, rate_burst=1) as client:
        assert all(client.post("/v1/completions", json={"prompt": "x"}).status_code == 404 for _ in range(15))


def test_token_bucket_refills_at_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(1.0)
    assert limiter.acquire("b") == 0.0
    now[0] = 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] = 1.0
    assert limiter.acquire("a") == 0.0
    now[0] = 100.0
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0  # refills to the burst, no further


def test_rate_limit_buckets_stay_bounded_when_addresses_rotate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RateLimiter, "MAX_CLIENTS", 100)
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    scans = 0
    make_room = limiter._make_room

    def counted(at: float) -> None:
        nonlocal scans
        scans += 1
        make_room(at)

    monkeypatch.setattr(limiter, "_make_room", counted)
    assert limiter.acquire("steady") == 0.0 and limiter.acquire("steady") == 0.0  # its burst spent
    for index in range(1000):  # no bucket ever refills in this frozen time: none is "idle"
        limiter.acquire(f"rotating-{index}")
        assert limiter.acquire("steady") > 0  # a client seen all along keeps its empty bucket
        assert len(limiter.buckets) <= 100
    assert scans <= 1000 // 10 + 1  # a scan frees a tenth: not one O(n) scan per new address


def test_body_over_the_limit_is_413_from_content_length_or_while_streaming() -> None:
    with _client(max_body_bytes=100, rate_limit=0) as client:
        declared = client.post("/v1/chat/completions", content=b"x" * 101, headers={"content-type": "application/json"})
        assert declared.status_code == 413
        assert declared.json() == {"error": "request body of 101 bytes is over the limit of 100 bytes"}

        def chunks() -> Iterator[bytes]:
            yield b"{" + b" " * 60
            yield b" " * 60 + b"}"

        streamed = client.post("/models/load", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert "over the limit of 100 bytes" in streamed.json()["detail"]
        small = client.post("/models/load", content=b"[]", headers={"content-type": "application/json"})
        assert small.status_code == 400


def test_a_compressed_body_is_415_naming_its_encoding() -> None:
    """A gzip body was parsed as it came: its JSON read as malformed (or, as {}, 'messages must be...')."""
    body = gzip.compress(b'{"messages": [{"role": "user", "content": "hi"}]}')
    with _client(rate_limit=0) as client:
        for path, field in (("/v1/chat/completions", "error"), ("/models/load", "detail")):
            sent = client.post(
                path, content=body, headers={"content-type": "application/json", "content-encoding": "GZip"}
            )
            assert sent.status_code == 415
            assert sent.json() == {
                field: "Content-Encoding 'gzip' is not supported: send the request body uncompressed"
            }
        plain = client.post("/v1/chat/completions", json=CHAT, headers={"content-encoding": "identity"})
        assert (plain.status_code, plain.json()) == (404, {"error": "No text model loaded"})  # past the middleware


PREFLIGHT = {
    "Origin": "https://app.example.com",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_browser_pages_of_any_origin_may_call_the_api_by_default(keyed: TestClient) -> None:
    """CORS as vLLM and llama.cpp's server allow it: a preflight needs no key, and a refusal still reaches the page."""
    preflight = keyed.options("/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "POST" in preflight.headers["access-control-allow-methods"]
    refused = keyed.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example.com"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in refused.headers  # a page cannot borrow the browser's Basic auth


def test_allowed_origins_limit_or_turn_off_cors() -> None:
    with _client(allowed_origins=("https://app.example.com",), rate_limit=0) as client:
        assert client.options("/v1/models", headers=PREFLIGHT).status_code == 200
        other = {**PREFLIGHT, "Origin": "https://evil.example.org"}
        assert client.options("/v1/models", headers=other).status_code == 400
        answer = client.get("/v1/models", headers={"Origin": "https://evil.example.org"})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
        mine = client.get("/v1/models", headers={"Origin": "https://app.example.com"})
        assert mine.headers["access-control-allow-origin"] == "https://app.example.com"
    with _client(allowed_origins=(), rate_limit=0) as client:
        answer = client.get("/v1/models", headers={"Origin": "https://app.example.com"})
        assert "access-control-allow-origin" not in answer.headers
    with _client(rate_limit=0) as client:  # no key, no flag: an open server is not readable by other sites' pages
        answer = client.get("/v1/models", headers={"Origin": "https://app.example.com"})
        assert "access-control-allow-origin" not in answer.headers
    with _client(allowed_origins=("*",), rate_limit=0) as client:  # unless asked for
        answer = client.get("/v1/models", headers={"Origin": "https://app.example.com"})
        assert answer.headers["access-control-allow-origin"] == "*"


async def _echo_state(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that answers with the request's scope["state"] as JSON."""
    body = json.dumps(scope.get("state", {})).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _call(app: AuthMiddleware, path: str, headers: dict[str, str]) -> dict[str, str]:
    answer: dict[str, str] = TestClient(app).get(path, headers=headers).json()  # no lifespan: a bare ASGI app
    return answer


def test_a_public_route_compares_no_key_and_sets_no_owner() -> None:
    """/health takes no key: a header sent there is not compared with the keys (no timing to read), nor trusted."""
    app = AuthMiddleware(_echo_state, api_keys=("alice-key", "bob-key"))
    assert _call(app, "/health", {"authorization": "Bearer alice-key"}) == {}
    assert "cake_owner" in _call(app, "/v1/models", {"authorization": "Bearer alice-key"})


def test_an_admin_key_on_a_one_user_server_keeps_everything_shared() -> None:
    """--admin-key adds the admin's key to the API's: one user's server turned per-key, and the files and responses
    it had stored (owner "") were no longer found."""
    alone = AuthMiddleware(_echo_state, api_keys=("alice-key", "root"), admin_key="root")
    assert _call(alone, "/v1/models", {"authorization": "Bearer alice-key"}) == {}  # no owner: all shared
    several = AuthMiddleware(_echo_state, api_keys=("alice-key", "bob-key", "root"), admin_key="root")
    assert "cake_owner" in _call(several, "/v1/models", {"authorization": "Bearer alice-key"})


def test_every_route_that_runs_the_model_is_rate_limited() -> None:
    """/v1/reranking and /infill ran the model with no limit: a route is limited when its handler asks for the
    engine (generation_request), and an alias when the route it aliases is."""
    import inspect

    from starlette.routing import Route

    from cake_py.api.paths import GENERATION_PATHS

    state = ServerState(engine=None, source=None, settings=ServeSettings())  # type: ignore[arg-type]
    routes = [route for route in create_app(state).routes if isinstance(route, Route)]
    limited = {route.endpoint for route in routes if route.path in GENERATION_PATHS}
    missing = [
        route.path
        for route in routes
        if route.path not in GENERATION_PATHS
        and route.methods
        and "POST" in route.methods
        and (route.endpoint in limited or "generation_request(" in inspect.getsource(route.endpoint))
    ]
    assert missing == []


def test_loading_and_unloading_the_model_are_the_admins() -> None:
    """Any key could unload the model for every other key's clients, or load one (a Hub download) in its place."""
    unload = "/models/unload"  # with no model loaded, a request let through is a 404 "No text model loaded"
    with _client(api_keys=("alice", "bob"), rate_limit=0) as several:
        refused = several.post(unload, headers={"Authorization": "Bearer alice"})
        assert refused.status_code == 403 and "--admin-key" in refused.json()["detail"]
        assert several.post("/models/load", json={"model_id": None}, headers={"x-api-key": "bob"}).status_code == 403
        assert several.get("/models/current", headers={"Authorization": "Bearer bob"}).status_code == 200  # reads
    with _client(api_keys=("alice", "bob", "root"), admin_key="root", rate_limit=0) as administered:
        assert administered.post(unload, headers={"Authorization": "Bearer alice"}).status_code == 403
        assert administered.post(unload).status_code == 401
        assert administered.post(unload, headers={"Authorization": "Bearer root"}).status_code == 404
    with _client(api_keys=("alice",), rate_limit=0) as single:  # one key: its holder is the admin, as before
        assert single.post(unload, headers={"Authorization": "Bearer alice"}).status_code == 404
    with _client(admin_key="root", rate_limit=0) as open_api:  # an open API, its model management guarded
        assert open_api.get("/v1/models").status_code == 200
        missing = open_api.post(unload)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert open_api.post(unload, headers={"Authorization": "Bearer nope"}).status_code == 403
        assert open_api.post(unload, headers={"Authorization": "Bearer root"}).status_code == 404
