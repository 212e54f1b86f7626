"""The Responses API's stored responses (`store: true`, its default), those still being answered, and the routes
that read them: GET and DELETE /v1/responses/{id} (GET also replays a background response's events with
`stream=true`), POST /v1/responses/{id}/cancel, GET /v1/responses/{id}/input_items (`previous_response_id` reads
them too). In memory, least recently used first, bounded by count and by the JSON it holds; a restart forgets them
(as vLLM's store does)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.errors import ApiError
from cake_py.api.eviction import victim
from cake_py.api.include import LOGPROBS_INCLUDE, query_values, without_logprobs
from cake_py.api.keepalive import KeepAliveResponse
from cake_py.api.listing import list_page
from cake_py.api.middleware import request_owner

if TYPE_CHECKING:
    from cake_py.api.background import LiveResponse
    from cake_py.api.state import ServerState

MAX_RESPONSES = 1024
MAX_CHARACTERS = 64 * 1024 * 1024  # of JSON over every stored response, its input items and conversation


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as it was answered
    input_items: list[dict[str, Any]]  # this request's own input items (ids included)
    conversation: list[dict[str, Any]]  # chat messages up to and including this response's output
    events: tuple[str, ...] = ()  # a background response's events, as SSE lines by sequence number
    owner: str = ""  # the API key's owner that made it (middleware.request_owner): only it sees it

    def with_events(self, lines: Iterable[str]) -> StoredResponse:
        return replace(self, events=tuple(lines))


def _size(stored: StoredResponse) -> int:
    """What an entry holds, as JSON characters (its Python objects take a few times more)."""
    held = [stored.response, stored.input_items, stored.conversation, stored.events]
    return len(json.dumps(held, ensure_ascii=False))


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, max_characters: int = MAX_CHARACTERS) -> None:
        self.max_responses = max_responses
        self.max_characters = max_characters
        self._entries: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        self._characters = 0
        self._lock = threading.Lock()  # routes run on the event loop, but tests and threads may read it too
        self._live: dict[str, LiveResponse] = {}  # responses being answered (stored ones and background runs)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, stored: StoredResponse) -> None:
        size = _size(stored)
        new = stored.response["id"]
        with self._lock:
            self._drop(new)
            self._entries[new] = (stored, size)
            self._characters += size
            while len(self._entries) > self.max_responses or (
                self._characters > self.max_characters and len(self._entries) > 1
            ):
                by_size = len(self._entries) <= self.max_responses
                # Larger than the whole store alone: kept (a next turn may chain on it), room made among its own
                # owner's entries only, never by clearing every other key's.
                only = stored.owner if by_size and size > self.max_characters else None
                key = victim(self._entries, lambda entry: entry.owner, by_size, new, only)
                if key is None:
                    break
                self._drop(key)

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The stored response, if `owner` made it (another key's is not found)."""
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry[0].owner != owner:
                return None
            self._entries.move_to_end(response_id)
            return entry[0]

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._drop(response_id)

    def start_live(self, live: LiveResponse) -> None:
        self._live[live.id] = live

    def end_live(self, live: LiveResponse) -> None:
        if self._live.get(live.id) is live:
            del self._live[live.id]

    def live(self, response_id: str, owner: str) -> LiveResponse | None:
        live = self._live.get(response_id)
        return live if live is not None and live.owner == owner else None

    async def stop_background(self) -> None:
        """Cancel every background run (the server is stopping): each stores itself as cancelled."""
        runs = [live for live in list(self._live.values()) if live.background]
        await asyncio.gather(*(live.cancel() for live in runs))

    def stop_background_soon(self) -> None:
        """The same from a signal handler: each run is cancelled on its event loop, before the engine's stop
        reaches it (that is scheduled after)."""
        for live in list(self._live.values()):
            if live.background:
                live.cancel_soon()

    def _drop(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._characters -= entry[1]
        return True


def _stored(state: ServerState, response_id: str, owner: str) -> StoredResponse:
    stored = state.responses.get(response_id, owner)
    if stored is None:
        raise ApiError(404, f"no stored response has the id {response_id!r}"[:300])
    return stored


async def get_response(request: Request) -> Response:
    """The response as far as it has come (`queued`/`in_progress` while it is answered); with `stream=true`, a
    background response's events after `starting_after` (default: all), then the rest as they come. As on
    POST /v1/responses, `include` may hold any value, and `message.output_text.logprobs` keeps the logprobs a response
    still being answered has (the store keeps none: a stored response's are empty either way)."""
    state: ServerState = request.app.state.cake
    response_id, owner = request.path_params["response_id"], request_owner(request)
    stream = request.query_params.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise ApiError(400, f"stream must be true or false, got {stream!r}"[:300])
    logprobs = LOGPROBS_INCLUDE in query_values(request.query_params)
    live = state.responses.live(response_id, owner)
    if stream == "false":
        response = live.response if live is not None else _stored(state, response_id, owner).response
        return JSONResponse(response if logprobs else without_logprobs(response))
    raw = request.query_params.get("starting_after", "-1")
    try:
        after = int(raw)
    except ValueError:
        raise ApiError(
            400, f"starting_after must be an integer (an event's sequence_number), got {raw!r}"[:300]
        ) from None
    lines: AsyncIterator[str]
    if live is not None and live.background:
        lines = live.follow(after, logprobs)
    else:
        stored = state.responses.get(response_id, owner) if live is None else None
        if stored is None and live is None:
            raise ApiError(404, f"no stored response has the id {response_id!r}"[:300])
        if stored is None or not stored.events:
            raise ApiError(
                400,
                f"response {response_id!r} was not created with background: true, so it cannot be streamed again"[:300],
            )
        lines = _replay(stored.events[max(after + 1, 0) :])
    return KeepAliveResponse(  # a background response followed live may be silent (a long prefill)
        lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def _replay(lines: tuple[str, ...]) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def cancel_response(request: Request) -> Response:
    """Stop a background response: it ends `cancelled` with what it had. Cancelling it again returns it as it is;
    one that ended otherwise, or one created without `background`, is a 400 (as in OpenAI's API)."""
    state: ServerState = request.app.state.cake
    response_id, owner = request.path_params["response_id"], request_owner(request)
    live = state.responses.live(response_id, owner)
    if live is not None and live.background:
        await live.cancel()
        return JSONResponse(_stored(state, response_id, owner).response)
    stored = _stored(state, response_id, owner) if live is None else None
    if stored is None or not stored.response.get("background"):
        raise ApiError(
            400, f"response {response_id!r} was not created with background: true, so it cannot be cancelled"
        )
    status = stored.response["status"]
    if status != "cancelled":
        raise ApiError(400, f"response {response_id!r} is {status}: only a queued or in_progress one can be cancelled")
    return JSONResponse(stored.response)


async def delete_response(request: Request) -> Response:
    """Forget a response; one still being answered in the background is cancelled first."""
    response_id, owner = request.path_params["response_id"], request_owner(request)
    state: ServerState = request.app.state.cake
    live = state.responses.live(response_id, owner)
    if live is not None and live.background:
        await live.cancel()
    elif live is not None:
        raise ApiError(400, f"response {response_id!r} is still being answered; delete it once it has ended")
    _stored(state, response_id, owner)
    state.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(request: Request) -> Response:
    """OpenAI's listing: `order` (desc by default), `limit` (20, at most 100), `after` (an item id)."""
    state: ServerState = request.app.state.cake
    response_id, owner = request.path_params["response_id"], request_owner(request)
    live = state.responses.live(response_id, owner)
    items = list(live.input_items if live is not None else _stored(state, response_id, owner).input_items)
    return JSONResponse(list_page(request.query_params, items, what="input item of this response"))


ROUTES = [
    Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
    Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
]
