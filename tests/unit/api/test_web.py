"""The web UI's files, without a browser: served from the package with the right content types, behind --ui-auth,
and nothing in them loads from or talks to another host (no CDN, no web fonts: the dashboard works offline)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import cake_py
from cake_py.api.app import create_app
from cake_py.api.state import ServerState
from cake_py.api.web import ASSETS, PAGE
from cake_py.config import ServeSettings

WEB = Path(cake_py.__file__).parent / "web"
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def _client(**settings: object) -> TestClient:
    state = ServerState(engine=None, source=None, settings=ServeSettings(**settings))  # type: ignore[arg-type]
    return TestClient(create_app(state))


@pytest.fixture()
def client() -> TestClient:
    return _client()


def _referenced_assets() -> set[str]:
    """Every /static/ file the page loads, and every module those scripts import, transitively."""
    html = (WEB / PAGE).read_text()
    found = set(re.findall(r'(?:src|href)="/static/([^"]+)"', html))
    pending = [name for name in found if name.endswith(".js")]
    while pending:
        script = (WEB / pending.pop()).read_text()
        for name in re.findall(r'^import .* from "\./([^"]+)";$', script, flags=re.MULTILINE):
            if name not in found:
                found.add(name)
                pending.append(name)
    return found


def test_root_serves_the_page_with_a_content_security_policy_that_allows_only_this_origin(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.content == (WEB / PAGE).read_bytes()
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    for directive in ("script-src 'self'", "style-src 'self'", "connect-src 'self'"):
        assert directive in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_every_file_the_page_loads_is_served_with_its_content_type(client: TestClient) -> None:
    referenced = _referenced_assets()
    assert referenced == set(ASSETS), "the page loads files the server does not serve, or the server serves extras"
    for name in sorted(referenced):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == CONTENT_TYPES[Path(name).suffix], name
        assert response.content == (WEB / name).read_bytes()


def test_the_package_ships_exactly_the_served_files() -> None:
    assert {path.name for path in WEB.iterdir()} == {PAGE, *ASSETS}


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/index.html", "/static/..%2Fapi%2Fweb.py"])
def test_anything_else_under_static_is_a_json_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "error" in response.json()


def test_no_file_refers_to_another_host() -> None:
    for path in WEB.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://", text, flags=re.IGNORECASE), f"{path.name} names a URL on another host"
        assert not re.search(r"""(?:src|href|action)\s*=\s*["']//""", text), f"{path.name} has a host-relative URL"
        assert "@import" not in text and "@font-face" not in text, f"{path.name} loads a stylesheet or font"
        assert not re.search(r"url\((?!\s*['\"]?data:)", text), f"{path.name} loads a resource from CSS"


def test_scripts_insert_server_text_as_text_never_as_html() -> None:
    for path in WEB.glob("*.js"):
        script = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in script, f"{path.name} uses {sink}"


def test_the_ui_is_behind_ui_auth_and_outside_the_api_key() -> None:
    guarded = _client(ui_auth=("admin", "secret"))
    for path in ("/", "/static/app.js"):
        refused = guarded.get(path)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        token = base64.b64encode(b"admin:secret").decode()
        assert guarded.get(path, headers={"Authorization": f"Basic {token}"}).status_code == 200

    # An API key guards the API, not the page: the browser loads the page, then the chat sends the key.
    keyed = _client(api_keys=("sesame",))
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert keyed.get(path).status_code == 200
