"""OpenAI's stored chat completions: a chat completion created with `store: true` (streamed or not) is kept with
its request's messages and `metadata`, and these routes read it: GET /v1/chat/completions (`model`,
`metadata[key]=value`, `order` (asc by default), `limit` (20, at most 100), `after`), GET, POST (new `metadata`) and
DELETE /v1/chat/completions/{id}, GET /v1/chat/completions/{id}/messages. In memory, least recently stored first
out, bounded by count and by the JSON they hold; a restart forgets them (as vLLM's Responses store does)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.errors import ApiError
from cake_py.api.eviction import victim
from cake_py.api.json_body import json_body
from cake_py.api.listing import list_page
from cake_py.api.middleware import request_owner
from cake_py.api.schemas import metadata_field

if TYPE_CHECKING:
    from cake_py.api.state import ServerState

MAX_COMPLETIONS = 4096
MAX_CHARACTERS = 64 * 1024 * 1024  # of JSON over every stored completion and its messages


@dataclass(frozen=True)
class StoredCompletion:
    """One kept completion: its JSON text (Python objects of the same would take ~6× the memory), and what the
    listing filters on."""

    id: str
    model: str
    metadata: dict[str, str]
    completion_text: str  # the chat completion as answered, without its metadata
    messages_text: str  # the request's messages, each with an id
    owner: str = ""  # the API key's owner that made it (middleware.request_owner): only it sees it

    @property
    def completion(self) -> dict[str, Any]:
        return {**json.loads(self.completion_text), "metadata": self.metadata}

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = json.loads(self.messages_text)
        return messages


def stored_messages(completion_id: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's messages as OpenAI lists them: an id each; text parts joined into `content`, and the parts
    themselves in `content_parts` when the message had parts."""
    stored = []
    for index, message in enumerate(messages):
        content = message.get("content")
        entry = {**message, "id": f"{completion_id}-{index}", "content_parts": None}
        if isinstance(content, list):
            entry["content"] = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            entry["content_parts"] = content
        stored.append(entry)
    return stored


class ChatFold:
    """A streamed chat completion folded back into the object a blocking request gets, chunk by chunk."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {key: chunk[key] for key in ("id", "created", "model")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for piece in chunk.get("choices", []):
            choice = self.choices.setdefault(
                piece["index"],
                {
                    "index": piece["index"],
                    "message": {"role": "assistant", "content": None},
                    "finish_reason": None,
                    "logprobs": None,
                },
            )
            delta, message = piece.get("delta", {}), choice["message"]
            if delta.get("content") is not None:  # the first chunk's "" too: an empty answer is "", not null
                message["content"] = (message["content"] or "") + delta["content"]
            if delta.get("reasoning_content"):
                message["reasoning_content"] = message.get("reasoning_content", "") + delta["reasoning_content"]
            for call in delta.get("tool_calls", []):
                calls = message.setdefault("tool_calls", [])
                while len(calls) <= call["index"]:
                    calls.append({"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
                known = calls[call["index"]]
                known["id"] = call.get("id") or known["id"]
                function = call.get("function", {})
                known["function"]["name"] = function.get("name") or known["function"]["name"]
                known["function"]["arguments"] += function.get("arguments", "")
            if piece.get("logprobs"):
                logprobs = choice["logprobs"] = choice["logprobs"] or {"content": []}
                logprobs["content"] += piece["logprobs"].get("content") or []
            if piece.get("finish_reason"):
                choice["finish_reason"] = piece["finish_reason"]
                choice["stop_reason"] = piece.get("stop_reason")

    def completion(self) -> dict[str, Any]:
        choices = [self.choices[index] for index in sorted(self.choices)]
        for choice in choices:  # calls with no text: null content, as the blocking answer has it
            if choice["message"].get("tool_calls") and not choice["message"]["content"]:
                choice["message"]["content"] = None
        return {**self.head, "object": "chat.completion", "choices": choices, "usage": self.usage}


class ChatStore:
    def __init__(self, max_completions: int = MAX_COMPLETIONS, max_characters: int = MAX_CHARACTERS) -> None:
        self.max_completions, self.max_characters = max_completions, max_characters
        self._entries: OrderedDict[str, tuple[StoredCompletion, int]] = OrderedDict()
        self._characters = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self,
        completion: dict[str, Any],
        messages: list[dict[str, Any]],
        metadata: dict[str, str] | None,
        owner: str = "",
    ) -> None:
        stored = StoredCompletion(
            completion["id"],
            completion.get("model", ""),
            metadata or {},
            json.dumps(completion, ensure_ascii=False),
            json.dumps(stored_messages(completion["id"], messages), ensure_ascii=False),
            owner,
        )
        size = len(stored.completion_text) + len(stored.messages_text)
        new = completion["id"]
        with self._lock:
            self._drop(new)
            if size > self.max_characters:  # larger than the whole store: not kept, and nothing else dropped for it
                return
            self._entries[new] = (stored, size)
            self._characters += size
            while self._entries and (
                len(self._entries) > self.max_completions or self._characters > self.max_characters
            ):
                by_size = len(self._entries) <= self.max_completions
                self._drop(victim(self._entries, lambda entry: entry.owner, by_size, new) or new)

    def get(self, completion_id: str) -> StoredCompletion | None:
        with self._lock:
            entry = self._entries.get(completion_id)
        return entry[0] if entry is not None else None

    def all(self) -> list[StoredCompletion]:
        """In the order they were stored."""
        with self._lock:
            return [stored for stored, _ in self._entries.values()]

    def update(self, completion_id: str, metadata: dict[str, str] | None) -> StoredCompletion | None:
        with self._lock:
            entry = self._entries.get(completion_id)
            if entry is None:
                return None
            stored = replace(entry[0], metadata=metadata or {})
            self._entries[completion_id] = (stored, entry[1])
            return stored

    def delete(self, completion_id: str) -> bool:
        with self._lock:
            return self._drop(completion_id)

    def _drop(self, completion_id: str) -> bool:
        entry = self._entries.pop(completion_id, None)
        if entry is not None:
            self._characters -= entry[1]
        return entry is not None


def _store(request: Request) -> ChatStore:
    state: ServerState = request.app.state.cake
    return state.chat_completions


def _stored(request: Request) -> StoredCompletion:
    completion_id = request.path_params["completion_id"]
    stored = _store(request).get(completion_id)
    if stored is None or stored.owner != request_owner(request):  # another key's is not found
        raise ApiError(404, f"no stored chat completion with id {completion_id!r} (create it with store: true)"[:300])
    return stored


async def list_completions(request: Request) -> Response:
    query = request.query_params
    model = query.get("model")
    prefix = "metadata["
    wanted = {key[len(prefix) : -1]: value for key, value in query.items() if key.startswith(prefix) and key[-1] == "]"}
    owner = request_owner(request)
    found = {
        stored.id: stored
        for stored in _store(request).all()
        if stored.owner == owner
        and (model is None or stored.model == model)
        and all(stored.metadata.get(key) == value for key, value in wanted.items())
    }
    # OpenAI's default order here is oldest first (asc), unlike its other lists. Only the page is read back.
    page = list_page(query, [{"id": key} for key in found], what="stored chat completion", default_order="asc")
    page["data"] = [found[item["id"]].completion for item in page["data"]]
    return JSONResponse(page)


async def retrieve_completion(request: Request) -> Response:
    return JSONResponse(_stored(request).completion)


async def update_completion(request: Request) -> Response:
    body = await json_body(request)
    if "metadata" not in body:
        raise ApiError(400, "send the new metadata (an object of up to 16 strings, or null to clear it)")
    metadata = metadata_field(body["metadata"])
    stored = _store(request).update(_stored(request).completion["id"], metadata)
    if stored is None:  # deleted meanwhile
        raise ApiError(404, f"no stored chat completion with id {request.path_params['completion_id']!r}"[:300])
    return JSONResponse(stored.completion)


async def delete_completion(request: Request) -> Response:
    completion_id = _stored(request).completion["id"]
    _store(request).delete(completion_id)
    return JSONResponse({"id": completion_id, "object": "chat.completion.deleted", "deleted": True})


async def list_messages(request: Request) -> Response:
    messages = _stored(request).messages
    page = list_page(request.query_params, messages, what="message of this completion", default_order="asc")
    return JSONResponse(page)


ROUTES = [
    Route("/v1/chat/completions", list_completions, methods=["GET"]),
    Route("/v1/chat/completions/{completion_id}", retrieve_completion, methods=["GET"]),
    Route("/v1/chat/completions/{completion_id}", update_completion, methods=["POST"]),
    Route("/v1/chat/completions/{completion_id}", delete_completion, methods=["DELETE"]),
    Route("/v1/chat/completions/{completion_id}/messages", list_messages, methods=["GET"]),
]
