"""The Responses API's stored responses (`store: true`, its default): what `previous_response_id`,
GET /v1/responses/{id} and its input_items read. In memory, least recently used first, bounded by count and by the
text it holds; a restart forgets them (as vLLM's store does)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_RESPONSES = 1024
MAX_CHARACTERS = 64 * 1024 * 1024  # of JSON over every stored response, its input items and conversation


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as it was answered
    input_items: list[dict[str, Any]]  # this request's own input items (ids included)
    conversation: list[dict[str, Any]]  # chat messages up to and including this response's output


def _size(stored: StoredResponse) -> int:
    """What an entry holds, as JSON characters (its Python objects take a few times more)."""
    return len(json.dumps([stored.response, stored.input_items, stored.conversation], ensure_ascii=False))


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, max_characters: int = MAX_CHARACTERS) -> None:
        self.max_responses = max_responses
        self.max_characters = max_characters
        self._entries: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        self._characters = 0
        self._lock = threading.Lock()  # routes run on the event loop, but tests and threads may read it too

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, stored: StoredResponse) -> None:
        size = _size(stored)
        with self._lock:
            self._drop(stored.response["id"])
            self._entries[stored.response["id"]] = (stored, size)
            self._characters += size
            while len(self._entries) > self.max_responses or (
                self._characters > self.max_characters and len(self._entries) > 1
            ):
                self._drop(next(iter(self._entries)))

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None:
                return None
            self._entries.move_to_end(response_id)
            return entry[0]

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._drop(response_id)

    def _drop(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._characters -= entry[1]
        return True
