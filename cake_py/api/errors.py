"""HTTP errors and the one seam that turns every failure into a JSON body (never HTML, never a traceback)."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cake_py.errors import CakeError, ClusterError, ContextLengthError, ModelError, RequestError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status; `style` picks the body shape of the route family."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def error_body(request: Request, message: str, code: str | None = None) -> dict[str, object]:
    """`{"detail": …}` on the seed-001 native routes, `{"error": …}` everywhere else (Cake/OpenAI)."""
    if getattr(request.state, "detail_errors", False):
        return {"detail": message}
    body: dict[str, object] = {"error": message}
    if code:
        body["code"] = code
    return body


def status_of(error: CakeError) -> tuple[int, str | None]:
    if isinstance(error, ContextLengthError):
        return 400, "context_length_exceeded"
    if isinstance(error, RequestError):
        return 400, None
    if isinstance(error, ClusterError):
        return 503, None
    if isinstance(error, ModelError):
        return 500, None
    return 500, None


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(error_body(request, exc.message, exc.code), status_code=exc.status, headers=exc.headers)


async def cake_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CakeError)
    status, code = status_of(exc)
    return JSONResponse(error_body(request, str(exc), code), status_code=status)


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
    return JSONResponse(error_body(request, f"internal error: {type(exc).__name__}"), status_code=500)


EXCEPTION_HANDLERS = {
    ApiError: api_error_handler,
    CakeError: cake_error_handler,
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}
