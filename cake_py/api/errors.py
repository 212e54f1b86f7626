"""HTTP errors and the one seam that turns every failure into a JSON body (never HTML, never a traceback).

The body's shape follows the route family (see `paths`): `{"error": …}` on Cake/OpenAI routes, `{"detail": …}` on
the seed-001 native routes. The pure-ASGI middleware answers through `send_error` with the same rules.
"""

from __future__ import annotations

import json
import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Send

from cake_py.api.paths import uses_detail_errors
from cake_py.errors import (
    CakeError,
    ClusterError,
    ContextLengthError,
    ModelNotFoundError,
    OverloadedError,
    RequestError,
    UnsupportedArchitectureError,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status; the body shape is picked by the route family of the request's path."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def error_payload(path: str, message: str, code: str | None = None) -> dict[str, object]:
    """`{"detail": …}` on the seed-001 native routes, `{"error": …}` (plus `code` when known) everywhere else."""
    if uses_detail_errors(path):
        return {"detail": message}
    body: dict[str, object] = {"error": message}
    if code:
        body["code"] = code
    return body


def error_body(request: Request, message: str, code: str | None = None) -> dict[str, object]:
    return error_payload(request.url.path, message, code)


def status_of(error: CakeError, *, detail_style: bool = False) -> tuple[int, str | None]:
    """HTTP status (and OpenAI error code) of a cake_py error.

    A prompt longer than the context is OpenAI's 400 `context_length_exceeded` on the OpenAI routes and seed 001's
    413 "input too long" on the native ones.
    """
    if isinstance(error, ContextLengthError):
        return (413, None) if detail_style else (400, "context_length_exceeded")
    if isinstance(error, RequestError | UnsupportedArchitectureError):
        return 400, None
    if isinstance(error, ModelNotFoundError):
        return 404, None
    if isinstance(error, ClusterError | OverloadedError):
        return 503, None
    return 500, None


def api_error(error: CakeError, path: str) -> ApiError:
    status, code = status_of(error, detail_style=uses_detail_errors(path))
    headers = {"Retry-After": "5"} if isinstance(error, OverloadedError) else None
    return ApiError(status, str(error), code=code, headers=headers)


async def send_error(send: Send, path: str, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error answered straight from ASGI middleware, before (or instead of) any route."""
    body = json.dumps(error_payload(path, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(error_body(request, exc.message, exc.code), status_code=exc.status, headers=exc.headers)


async def cake_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CakeError)
    error = api_error(exc, request.url.path)
    if error.status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse(error_body(request, error.message, error.code), status_code=error.status, headers=error.headers)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return JSONResponse(error_body(request, message), status_code=exc.status_code, headers=exc.headers)


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    message = f"internal error: {type(exc).__name__}: {exc}"[:300]
    return JSONResponse(error_body(request, message), status_code=500)


EXCEPTION_HANDLERS = {
    ApiError: api_error_handler,
    CakeError: cake_error_handler,
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}
