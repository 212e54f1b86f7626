"""HTTP errors and the one seam that turns every failure into a JSON body (never HTML, never a traceback).

The body's shape follows the route family (see `paths`): `{"error": …}` on Cake/OpenAI routes, `{"detail": …}` on
the seed-001 native routes. The pure-ASGI middleware answers through `send_error` with the same rules.
"""

from __future__ import annotations

import errno
import json
import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cake_py.api.paths import uses_anthropic_errors, uses_detail_errors
from cake_py.errors import (
    CakeError,
    ClusterError,
    ContextLengthError,
    HubError,
    KVMemoryError,
    ModelNotFoundError,
    OverloadedError,
    RequestError,
    UnsupportedArchitectureError,
)

log = logging.getLogger(__name__)
CLIENT_CLOSED_REQUEST = 499


def retry_headers(status: int) -> dict[str, str] | None:
    """Retry-After for an answer a client should retry (429, 503) that is passed on from another route."""
    return {"Retry-After": "5"} if status in (429, 503) else None


MAX_MESSAGE = 1000  # characters of an error message; past this, cut


class ApiError(Exception):
    """An error with its HTTP status; the body shape is picked by the route family of the request's path."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, object] | None = None,
    ):
        if len(message) > MAX_MESSAGE:  # a message quoting a bad value of megabytes: the start names it
            message = message[: MAX_MESSAGE - 1] + "…"
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers
        self.details = details  # Anthropic's `error.details` (what its SDK reads to recover), on its routes only


# Anthropic's error types by status, for its Messages API's body.
ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_payload(
    path: str, message: str, code: str | None = None, status: int = 400, details: dict[str, object] | None = None
) -> dict[str, object]:
    """`{"detail": …}` on the seed-001 native routes, Anthropic's `{"type": "error", "error": {type, message}}` (plus
    `details` when given) on its Messages API, `{"error": …}` (plus `code` when known) everywhere else."""
    if uses_detail_errors(path):
        return {"detail": message}
    if uses_anthropic_errors(path):
        error: dict[str, object] = {"type": ANTHROPIC_ERRORS.get(status, "api_error"), "message": message}
        return {"type": "error", "error": {**error, "details": details} if details else error}
    body: dict[str, object] = {"error": message}
    if code:
        body["code"] = code
    return body


def error_body(
    request: Request, message: str, code: str | None = None, status: int = 400, details: dict[str, object] | None = None
) -> dict[str, object]:
    return error_payload(request.url.path, message, code, status, details)


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
    if isinstance(error, HubError):  # an upstream failure: Bad Gateway
        return 502, None
    if isinstance(error, ClusterError | OverloadedError | KVMemoryError):  # the cluster short of a stage or of room
        return 503, None
    return 500, None


def api_error(error: CakeError, path: str) -> ApiError:
    status, code = status_of(error, detail_style=uses_detail_errors(path))
    return ApiError(status, str(error), code=code, headers=retry_headers(status))  # a stage down, a full queue


UNREAD_BODY_KEPT = 1 << 20  # bytes of an unread body below which an early refusal keeps the connection


async def send_error(
    send: Send, scope: Scope, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    """A JSON error answered straight from ASGI middleware, before (or instead of) any route. A request whose body
    is left unread gets the connection closed after the answer: kept open, a client refused (no key, say) could
    trickle a declared gigabyte into it for ever."""
    body = json.dumps(error_payload(scope["path"], message, status=status)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    sent = dict(scope.get("headers") or [])
    declared = sent.get(b"content-length", b"0")
    # A small body is read and dropped by the server after the answer, keeping the connection; closing it with
    # bytes unread makes the kernel reset it, and the client may lose the answer (a 429 read as a lost connection).
    if b"transfer-encoding" in sent or not declared.isdigit() or int(declared) > UNREAD_BODY_KEPT:
        raw_headers.append((b"connection", b"close"))
    raw_headers += [(key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    body = error_body(request, exc.message, exc.code, exc.status, exc.details)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def cake_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CakeError)
    error = api_error(exc, request.url.path)
    if error.status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc)
    body = error_body(request, error.message, error.code, error.status)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return JSONResponse(
        error_body(request, message, status=exc.status_code), status_code=exc.status_code, headers=exc.headers
    )


async def client_gone_handler(request: Request, exc: Exception) -> Response:
    """The client closed the connection before its request was all sent: nothing to answer, nothing went wrong
    here. 499, nginx's "client closed request", is what the metrics count."""
    log.info("%s %s: the client left before its request was sent", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


async def disk_error_handler(request: Request, exc: Exception) -> Response:
    """A full disk (uploads, batch results, stored answers) is 507 Insufficient Storage, saying so; any other
    OSError is a bug like the rest."""
    assert isinstance(exc, OSError)
    if exc.errno not in DISK_FULL:
        return await internal_error_handler(request, exc)
    where = f" ({exc.filename})" if exc.filename else ""
    log.error("%s %s: the disk is full%s", request.method, request.url.path, where)
    message = "the server's disk is full: nothing was stored; retry once space is freed"
    return JSONResponse(error_body(request, message, status=507), status_code=507)


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    message = f"internal error: {type(exc).__name__}: {exc}"[:300]
    return JSONResponse(error_body(request, message, status=500), status_code=500)


class InternalErrorMiddleware:
    """Answers an error no handler took (a bug) with the JSON 500 itself. Starlette's outermost middleware would
    answer it too, but then raises it on to the server, which closes the connection: the client's next request on
    that keep-alive connection would fail. A response already under way cannot become an error: that one is raised
    on, and the connection ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            response = await internal_error_handler(Request(scope), exc)
            await response(scope, receive, send)


EXCEPTION_HANDLERS = {
    ApiError: api_error_handler,
    ClientDisconnect: client_gone_handler,
    CakeError: cake_error_handler,
    HTTPException: http_exception_handler,
    OSError: disk_error_handler,
    Exception: internal_error_handler,
}
