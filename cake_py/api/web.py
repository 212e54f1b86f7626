"""The web dashboard: `/` (the page) and `/static/{name}` (its script and style), read from the package's `web/` folder.

The files ship inside the package, so the UI works offline with no build step. Only the listed files are served,
and the page carries a Content-Security-Policy that allows nothing but this origin: no CDN, no inline script.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "cluster.js": "text/javascript; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "node_card.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PAGE = "index.html"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def read_asset(name: str) -> bytes:
    """The bytes of one file of `cake_py/web/` (a zip-safe read through importlib.resources)."""
    return resources.files("cake_py").joinpath("web", name).read_bytes()


async def index(request: Request) -> Response:
    return Response(
        read_asset(PAGE),
        media_type="text/html; charset=utf-8",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    media_type = ASSETS.get(name)
    if media_type is None:
        return JSONResponse({"error": f"no UI asset named {name!r}"}, status_code=404)
    # no-cache: the browser revalidates, so a server upgrade never runs an old script against a new API.
    return Response(
        read_asset(name),
        media_type=media_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


ROUTES = [
    Route("/", index, methods=["GET"]),
    Route("/static/{name}", asset, methods=["GET"]),
]
