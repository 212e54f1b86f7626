"""The SDK's exceptions: one family under `CakeClientError`, and the typed error of each HTTP status.

The server's error bodies are `{"error": …}` on Cake/OpenAI routes and `{"detail": …}` on native ones; both become
`CakeAPIError.message`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class CakeClientError(Exception):
    """Anything the SDK raises."""


class CakeConnectionError(CakeClientError):
    """The server could not be reached, or the connection broke (refused, DNS, timeout, reset)."""


class StreamError(CakeClientError):
    """The server reported a failure in the middle of a stream (after its 200 status was sent)."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message, self.request_id = message, request_id


class StreamInterruptedError(StreamError, CakeConnectionError):
    """The connection broke, went quiet or ended in the middle of a stream (the server died, a proxy cut it): both a
    `StreamError` (the generation did not finish) and a `CakeConnectionError` (the transport failed)."""


class CakeAPIError(CakeClientError):
    """An error answer: `status_code`, the server's `message`, its JSON `body`, `code` and `retry_after` if given."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        body: Any = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code, self.message, self.body = status_code, message, body
        self.code, self.retry_after = code, retry_after


class BadRequestError(CakeAPIError):
    """400: malformed or invalid input; the message names the field and value."""


class AuthenticationError(CakeAPIError):
    """401: missing or wrong API key (or UI user and password)."""


class NotFoundError(CakeAPIError):
    """404: no model of that type is loaded (e.g. no image or audio model), or an unknown route."""


class PayloadTooLargeError(CakeAPIError):
    """413: the body or the prompt is too long."""


class RateLimitError(CakeAPIError):
    """429: too many requests; `retry_after` says how many seconds to wait."""


class InternalServerError(CakeAPIError):
    """500: the server failed."""


class ServiceUnavailableError(CakeAPIError):
    """503: the cluster is not ready (a stage is down, or the model is being switched)."""


_ERRORS: dict[int, type[CakeAPIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    500: InternalServerError,
    503: ServiceUnavailableError,
}


def api_error(response: httpx.Response) -> CakeAPIError:
    """The typed error of an error answer (read): `{"error": …}` on Cake/OpenAI routes, `{"detail": …}` on native."""
    body: Any = None
    message = response.text[:500] or response.reason_phrase
    try:
        body = response.json()
    except ValueError:
        pass
    code = None
    if isinstance(body, dict):
        found = body.get("error", body.get("detail"))
        if isinstance(found, dict):  # OpenAI's {"error": {"message": …, "code": …}}
            code = found.get("code")
            found = found.get("message", found)
        if found is not None:
            message = found if isinstance(found, str) else json.dumps(found)
        code = code or body.get("code")
    try:
        retry_after: float | None = float(response.headers["retry-after"])
    except (KeyError, ValueError):
        retry_after = None
    kind = _ERRORS.get(response.status_code, CakeAPIError)
    return kind(response.status_code, message, body=body, code=code, retry_after=retry_after)


def connection_error(base_url: str, error: httpx.TransportError) -> CakeConnectionError:
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        # It answered the connection, then went quiet (httpx's async timeouts carry no message of their own).
        return CakeConnectionError(
            f"the cake server at {base_url} did not answer in time: {type(error).__name__}: {str(error) or 'timed out'}"
        )
    return CakeConnectionError(f"cannot reach the cake server at {base_url}: {type(error).__name__}: {error}")


def stream_interrupted(base_url: str, error: httpx.TransportError | None, request_id: str | None) -> StreamError:
    """A stream whose connection failed (`error`) or ended cleanly (None) before its last event: the server was
    reached, so not "cannot reach" but what happened mid-stream."""
    if error is None:
        what = "the connection ended before its last event (done)"
    elif isinstance(error, httpx.TimeoutException):
        what = f"the server went quiet: {type(error).__name__}: {str(error) or 'timed out'}"
    else:
        what = f"the connection broke: {type(error).__name__}: {error}"
    return StreamInterruptedError(f"the stream from the cake server at {base_url} stopped midway: {what}", request_id)
