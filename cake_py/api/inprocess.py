"""A request to one of this server's routes from inside the server (the Batch API's requests, the Anthropic Messages
API's translation to chat completions): an ASGI call with a JSON body, whose status and JSON answer (or SSE events)
come back as values."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Scope

from cake_py.api.middleware import NOBODY, Caller

LARGE_ANSWER_BYTES = 256 * 1024


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


async def _payload(body: dict[str, Any]) -> bytes:
    """The body as JSON, written in a thread: a translated request (a long chat, a Messages request near the body
    limit) is megabytes of JSON, tens of ms or more of writing that would hold every other stream on the loop."""
    return await asyncio.to_thread(_encode, body)


def _scope(app: ASGIApp, path: str, payload: bytes, caller: Caller) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("cake", 0),
        "server": ("cake", 0),
        "app": app,
        "state": caller.state(),  # whose stored objects it makes and whose usage it is (the caller's)
    }


Receive = Callable[[], Awaitable[Message]]


def _receiver(payload: bytes, outer: Receive | None) -> Receive:
    """The request's body, then what `outer` (the caller's own request, its body already read) receives next: its
    client going away reaches the route as a disconnect, so the route stops. Without one the caller never goes away
    (a route watching for a disconnect waits until it is cancelled, which is how such a caller stops it)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        if outer is not None:
            return await outer()
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


async def post_json(
    app: ASGIApp,
    dispatch: ASGIApp,
    path: str,
    body: dict[str, Any],
    outer: Receive | None = None,
    caller: Caller = NOBODY,
) -> tuple[int, Any]:
    """POSTs `body` to `path` through `dispatch` (routes and error handlers; `app` is what they find as
    request.app). Cancelling this call, or `outer`'s client leaving, is how the caller stops it."""
    payload = await _payload(body)
    status, chunks = 500, []

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await dispatch(_scope(app, path, payload, caller), _receiver(payload, outer), send)
    answer = b"".join(chunks)
    try:
        if len(answer) > LARGE_ANSWER_BYTES:  # thousands of embeddings: tens of ms of parsing, off the event loop
            return status, await asyncio.to_thread(json.loads, answer)
        return status, json.loads(answer)
    except ValueError:
        return 500, {"error": f"the route answered {status} with a body that is not JSON"}


async def post_json_stream(
    app: ASGIApp, dispatch: ASGIApp, path: str, body: dict[str, Any], caller: Caller = NOBODY
) -> tuple[int, Any, AsyncGenerator[Any, None] | None]:
    """POSTs `body` to a route that answers with SSE: (status, error body, None) when it answers otherwise than 200,
    else (200, None, the `data:` payloads as they come, parsed, up to `[DONE]`). Leaving the iterator early cancels
    the route (its sequences leave the engine)."""
    payload = await _payload(body)
    messages: asyncio.Queue[Message] = asyncio.Queue()
    task = asyncio.ensure_future(dispatch(_scope(app, path, payload, caller), _receiver(payload, None), messages.put))
    task.add_done_callback(lambda _: messages.put_nowait({"type": "cake.done"}))
    try:
        start = await messages.get()
    except asyncio.CancelledError:  # the caller stopped (a shutdown) before the route answered: so does the route
        task.cancel()
        raise
    if start["type"] != "http.response.start":  # the route failed before answering: its error handler did not run
        task.cancel()
        return 500, {"error": "the route ended without an answer"}, None
    if start["status"] != 200:
        chunks = []
        while (message := await messages.get())["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            return start["status"], json.loads(b"".join(chunks)), None
        except ValueError:
            return start["status"], {"error": f"the route answered {start['status']}"}, None

    async def events() -> AsyncGenerator[Any, None]:
        """The payloads up to `[DONE]`; a stream that ends without it (the route failed) raises StreamBroken."""
        pending = b""
        try:
            while (message := await messages.get())["type"] == "http.response.body":
                pending += message.get("body", b"")
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: "):
                        continue
                    if line[6:].strip() == b"[DONE]":
                        return
                    yield json.loads(line[6:])
                if not message.get("more_body", False):
                    break
            failure = task.exception() if task.done() and not task.cancelled() else None
            raise StreamBroken(f"the route's stream broke off: {failure or 'it ended without [DONE]'}")
        finally:
            task.cancel()

    return 200, None, events()


class StreamBroken(Exception):
    """A route's SSE stream ended without its `[DONE]`: the route failed mid-answer."""


@dataclass(frozen=True)
class Routes:
    """This server's routes, to call from inside it: `app` is what they find as request.app, `dispatch` the routes
    with their error handlers (no middleware: the caller's own request was authenticated and counted)."""

    app: ASGIApp
    dispatch: ASGIApp

    async def post(
        self, path: str, body: dict[str, Any], outer: Receive | None = None, caller: Caller = NOBODY
    ) -> tuple[int, Any]:
        """`caller`: whose stored objects the request makes and sees, and whose usage it is (middleware.Caller)."""
        return await post_json(self.app, self.dispatch, path, body, outer, caller)

    async def post_stream(
        self, path: str, body: dict[str, Any], caller: Caller = NOBODY
    ) -> tuple[int, Any, AsyncGenerator[Any, None] | None]:
        return await post_json_stream(self.app, self.dispatch, path, body, caller)
