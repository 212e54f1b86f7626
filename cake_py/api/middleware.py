"""Auth, rate limits and body limits as pure ASGI middleware.

Pure ASGI, not BaseHTTPMiddleware: streams and client disconnects must pass through untouched, so that a client
that leaves mid-stream cancels its sequence. Refusals are JSON in the route family's shape (see `paths`).

- API keys (`--api-key`, `--api-key-file`, `CAKE_API_KEY`): `Authorization: Bearer KEY` (or Anthropic's
  `x-api-key: KEY`) on every route but the public ones (/health) and the UI page. With several keys, the request's
  owner (`request_owner`: a digest of its key, never the key) is what stored objects belong to; with one key or
  none everything is everyone's (owner "").
- UI auth (`--ui-auth USER:PASS`): HTTP Basic on the UI (`/`, its assets, `/api/v1/topology`). A request has one
  Authorization header, so there Basic stands in for the key.
- Rate limit (seed 001): a token bucket per owner with several keys (people behind one address each get their
  own), else per client address (one key is everyone's, and without a key a bearer token costs nothing to change);
  on generation routes only.
- Body limit: a Content-Length over the limit is refused before reading; a body without one is counted as it
  streams and refused as soon as it passes the limit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cake_py.api.errors import ApiError, send_error
from cake_py.api.paths import PUBLIC_PATHS, is_generation, is_ui, is_ui_page

REALM = 'Basic realm="cake", charset="UTF-8"'
BODY_READ_TIMEOUT_S = 60.0  # the longest a request body may pause: a slow link still sends something this often
# Bodies of the largest size the server holds at once, all requests together: each request keeps its body (and
# what it parsed) in memory until it is answered, and a queue of 1,024 requests of 8 MB would hold about 17 GB.
IN_FLIGHT_BODIES = 64
IN_FLIGHT_RETRY_S = "1"


def _bearer(headers: Headers) -> str | None:
    """The API key: `Authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY` (what its SDK sends)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip() or None


def _basic(headers: Headers) -> tuple[str, str] | None:
    scheme, _, encoded = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):  # binascii.Error, and non-ASCII text b64decode refuses
        return None
    return (user, password) if sep else None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


OWNER_KEY = "cake_owner"  # in the request's scope["state"]
NAME_KEY = "cake_key_name"  # and the key's name, for the metrics: --api-key-file's, else the owner's first digits
ADMIN_MARK = "cake_admin"  # present when the request came with the --admin-key


def owner_of(key: str) -> str:
    """The owner a key stands for: a digest, so that nothing stored or logged holds the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Caller:
    """Who a request is for, with several keys: its owner (stored objects) and its key's name (usage metrics)."""

    owner: str = ""
    key_name: str = ""

    def state(self) -> dict[str, str]:
        """As the middleware leaves it in a request's scope["state"]."""
        return {OWNER_KEY: self.owner, NAME_KEY: self.key_name} if self.owner else {}


NOBODY = Caller()


def request_caller(request: Request) -> Caller:
    return Caller(request_owner(request), request_key_name(request))


def request_owner(request: Request) -> str:
    """Whose stored objects a request sees and makes: its key's owner with several keys, else "" (everyone)."""
    return str(request.scope.get("state", {}).get(OWNER_KEY, ""))


def is_admin(request: Request) -> bool:
    """Whether the request came with the server's --admin-key."""
    return bool(request.scope.get("state", {}).get(ADMIN_MARK))


def request_key_name(request: Request) -> str:
    """The name its usage is counted under with several keys (`cake_api_key_*` metrics), else ""."""
    return str(request.scope.get("state", {}).get(NAME_KEY, ""))


ADMIN_PATHS = frozenset({"/models/load", "/models/unload"})  # they change the model every client is served
FORBIDDEN = ""  # the challenge of a refusal that is a 403: a key was given and is not the one it takes


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        api_keys: tuple[str, ...] = (),
        ui_auth: tuple[str, str] | None = None,
        key_names: dict[str, str] | None = None,
        admin_key: str | None = None,
    ) -> None:
        self.app, self.api_keys, self.ui_auth, self.admin_key = app, api_keys, ui_auth, admin_key
        # Stored objects are per key with several users' keys; the admin's key (--admin-key) is the operator's, not
        # another user's: a one-user server given one keeps seeing its files and responses as before.
        self.owners = len([key for key in api_keys if key != admin_key]) > 1
        names = key_names or {}
        self.identities = {key: (owner_of(key), names.get(key) or owner_of(key)[:12]) for key in api_keys}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal, key = self._check(scope["path"], Headers(scope=scope))
            if refusal is None and scope["path"] in ADMIN_PATHS:
                refusal = self._check_admin(Headers(scope=scope))
            if refusal is not None:
                message, challenge = refusal
                status = 403 if challenge == FORBIDDEN else 401
                await send_error(send, scope, status, message, {"WWW-Authenticate": challenge} if status == 401 else {})
                return
            if self.owners and key is not None:
                state = scope.setdefault("state", {})
                state[OWNER_KEY], state[NAME_KEY] = self.identities[key]
            if self.admin_key is not None and key is not None and _same(key, self.admin_key):
                scope.setdefault("state", {})[ADMIN_MARK] = True
        await self.app(scope, receive, send)

    def _check_admin(self, headers: Headers) -> tuple[str, str] | None:
        """Loading and unloading the model are the admin's: the --admin-key's holder, or with one API key and no
        admin key its holder (as before), or anyone on an open server. With several keys and no admin key, nobody."""
        if self.admin_key is None:
            if len(self.api_keys) > 1:
                return "with several API keys, loading or unloading the model needs the server's --admin-key", FORBIDDEN
            return None
        token = _bearer(headers)
        if token is None:
            return "loading or unloading the model needs the --admin-key as the Bearer key", "Bearer"
        if not _same(token, self.admin_key):
            return "loading or unloading the model needs the --admin-key, not this key", FORBIDDEN
        return None

    def _check(self, path: str, headers: Headers) -> tuple[tuple[str, str] | None, str | None]:
        """(None, the key it gave, if one was checked) when the request may pass, else ((message, WWW-Authenticate
        challenge), None). Keys are compared only where one is required, and every one of them each time."""
        if path in PUBLIC_PATHS:
            return None, None
        if is_ui(path) and self.ui_auth is not None:
            credentials = _basic(headers)
            user, password = self.ui_auth
            if credentials is None:
                return ("this page needs the --ui-auth user and password (HTTP Basic)", REALM), None
            if not (_same(credentials[0], user) & _same(credentials[1], password)):
                return (f"wrong user or password for user {credentials[0]!r}", REALM), None
            return None, None
        if is_ui_page(path) or not self.api_keys:
            return None, None
        token = _bearer(headers)
        if token is None:
            missing = "missing API key: send the header 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
            return (missing, "Bearer"), None
        matches = [_same(token, key) for key in self.api_keys]  # every key compared: no timing says which is near
        if not any(matches):
            return ("invalid API key", 'Bearer error="invalid_token"'), None
        return None, self.api_keys[matches.index(True)]


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets: `burst` requests at once, refilled at `per_minute` / 60 per second, per client key."""

    MAX_CLIENTS = 10_000

    def __init__(self, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(max(burst, 1))
        self.clock = clock
        self.buckets: dict[str, _Bucket] = {}

    def acquire(self, key: str) -> float:
        """Take one request from `key`'s bucket: 0.0 when allowed, else the seconds until one is available."""
        now = self.clock()
        bucket = self.buckets.pop(key, None)  # re-inserted below: the dict's order is least recently seen first
        if bucket is None:
            if len(self.buckets) >= self.MAX_CLIENTS:
                self._make_room(now)
            bucket = _Bucket(self.capacity, now)
        self.buckets[key] = bucket
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _make_room(self, now: float) -> None:
        """Drop buckets that have refilled completely (forgetting them changes nothing), then, if that freed less than
        a tenth, the least recently seen: the scan runs at most once per MAX_CLIENTS / 10 new clients, however many
        addresses a client rotates through."""
        full = [key for key, b in self.buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.capacity]
        for key in full:
            del self.buckets[key]
        excess = len(self.buckets) - self.MAX_CLIENTS * 9 // 10
        for key in list(itertools.islice(self.buckets, max(excess, 0))):
            del self.buckets[key]


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.limiter = RateLimiter(per_minute, burst, clock) if per_minute > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.limiter is not None and scope["type"] == "http" and is_generation(scope["method"], scope["path"]):
            client = scope.get("client")
            owner = scope.get("state", {}).get(OWNER_KEY)
            wait = self.limiter.acquire(f"key {owner}" if owner else client[0] if client else "unknown")
            if wait > 0:
                per_minute = round(self.limiter.rate * 60)
                message = f"rate limit exceeded: {per_minute} requests per minute (burst {self.limiter.capacity:.0f})"
                retry = str(max(1, math.ceil(wait)))
                await send_error(send, scope, 429, f"{message}; retry in {retry} s", {"Retry-After": retry})
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """415 for a compressed body (Content-Encoding: nothing decompresses it); 413 for a body over `max_bytes` (0: no
    limit), or over the path's own limit in `overrides` (uploads); 408 for
    a body that stops arriving for `read_timeout` seconds (a client that sends half a request holds a connection
    and a task for as long as it likes otherwise); 503 (with Retry-After) for a body that would take the bodies of
    the requests being answered past `in_flight_bytes` (default IN_FLIGHT_BODIES × `max_bytes`; uploads, which have
    their own limit and go to disk, are not counted): a request holds its body until it is answered, so many large
    ones queued could otherwise take all the memory."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        overrides: dict[str, int] | None = None,
        read_timeout: float = BODY_READ_TIMEOUT_S,
        in_flight_bytes: int | None = None,
    ) -> None:
        self.app, self.max_bytes, self.overrides = app, max_bytes, overrides or {}
        self.read_timeout = read_timeout
        self.in_flight_limit = max_bytes * IN_FLIGHT_BODIES if in_flight_bytes is None else in_flight_bytes
        self.in_flight = 0  # bytes of the bodies of the requests being answered (event loop only: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.overrides.get(scope.get("path", ""), self.max_bytes)

        def too_large(size: int | str) -> str:
            return f"request body of {size} bytes is over the limit of {limit} bytes"

        headers = Headers(scope=scope)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):  # parsed as it came, a gzip body would read as malformed JSON
            message = f"Content-Encoding {encoding!r} is not supported: send the request body uncompressed"
            await send_error(send, scope, 415, message)
            return
        declared = headers.get("content-length")
        if limit > 0 and declared is not None and declared.isdigit() and int(declared) > limit:
            await send_error(send, scope, 413, too_large(int(declared)))
            return
        budgeted = self.in_flight_limit > 0 and scope.get("path", "") not in self.overrides

        def busy() -> str:
            return (
                f"the server holds {self.in_flight} bytes of request bodies being answered, its limit of "
                f"{self.in_flight_limit} ({IN_FLIGHT_BODIES} x --max-body-bytes): retry shortly"
            )

        if (
            budgeted
            and declared is not None
            and declared.isdigit()
            and self.in_flight + int(declared) > self.in_flight_limit
        ):
            await send_error(send, scope, 503, busy(), {"Retry-After": IN_FLIGHT_RETRY_S})
            return
        received, complete, held = 0, False, 0

        async def counted() -> Message:
            nonlocal received, complete, held
            if complete:  # past the body: a streaming answer waits here for the client to leave, untimed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                raise ApiError(  # the rest of the body may still come: the connection cannot carry another request
                    408,
                    f"the request body stopped arriving: nothing came for {self.read_timeout:g} s",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                received += size
                complete = not message.get("more_body", False)
                if 0 < limit < received:
                    raise ApiError(413, too_large(f"more than {limit}"), headers={"Connection": "close"})
                if budgeted:
                    if self.in_flight + size > self.in_flight_limit:  # a body without a declared length
                        headers = {"Retry-After": IN_FLIGHT_RETRY_S, "Connection": "close"}
                        raise ApiError(503, busy(), headers=headers)
                    self.in_flight += size
                    held += size
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            self.in_flight -= held
