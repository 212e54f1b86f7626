"""The Conversations API's stored conversations: each an id (`conv_…`), its `metadata`, its creation time and its
items in order (messages, function calls and their outputs, reasoning), added by POST /v1/conversations/{id}/items
or by a response created with `conversation` (its input and output items, once it has ended with an answer). In
memory, least recently used first out, bounded by count and by the JSON the items hold, as the response store is
(response_store.py); each belongs to the API key's owner that created it. A restart forgets them."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cake_py.api.eviction import victim
from cake_py.api.responses_input import new_id

MAX_CONVERSATIONS = 1024
MAX_CHARACTERS = 64 * 1024 * 1024  # of JSON over every stored conversation's items and metadata
# The id prefix of a new id for each item type (an item added with an id its conversation already holds).
ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


@dataclass(frozen=True)
class StoredConversation:
    id: str
    created_at: int
    metadata: dict[str, str] = field(default_factory=dict)
    items: tuple[dict[str, Any], ...] = ()  # oldest first
    owner: str = ""  # the API key's owner that made it (middleware.request_owner): only it sees it

    @property
    def body(self) -> dict[str, Any]:
        """The conversation object OpenAI answers with (its items are read through their own routes)."""
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}

    def item(self, item_id: str) -> dict[str, Any] | None:
        return next((item for item in self.items if item["id"] == item_id), None)


def _size(value: Any) -> int:
    """What a value holds, as JSON characters (its Python objects take a few times more)."""
    return len(json.dumps(value, ensure_ascii=False))


def _items_size(items: Iterable[dict[str, Any]]) -> int:
    return sum(_size(item) for item in items)


class ConversationStore:
    def __init__(self, max_conversations: int = MAX_CONVERSATIONS, max_characters: int = MAX_CHARACTERS) -> None:
        self.max_conversations = max_conversations
        self.max_characters = max_characters
        # id → (conversation, its size): a size kept, not measured again, so adding an item costs that item's size
        self._entries: OrderedDict[str, tuple[StoredConversation, int]] = OrderedDict()
        self._characters = 0
        self._lock = threading.Lock()  # routes run on the event loop, but tests and threads may read it too
        self._held: set[str] = set()  # conversations a response is being answered in (hold)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, conversation: StoredConversation) -> None:
        with self._lock:
            size = _size(conversation.body) + _items_size(conversation.items)
            self._set(conversation, size)

    def get(self, conversation_id: str, owner: str) -> StoredConversation | None:
        """The conversation, if `owner` made it (another key's is not found)."""
        with self._lock:
            entry = self._entries.get(conversation_id)
            if entry is None or entry[0].owner != owner:
                return None
            self._entries.move_to_end(conversation_id)
            return entry[0]

    def update(self, conversation_id: str, owner: str, metadata: dict[str, str]) -> StoredConversation | None:
        with self._lock:
            entry = self._owned(conversation_id, owner)
            if entry is None:
                return None
            old, size = entry
            new = replace(old, metadata=metadata)
            self._set(new, size - _size(old.metadata) + _size(metadata))
            return new

    def add_items(
        self, conversation_id: str, owner: str, items: Iterable[dict[str, Any]]
    ) -> list[dict[str, Any]] | None:
        """Append `items` (None when the conversation is gone: deleted while a response ran, say). An item whose id
        the conversation already holds gets a new one: the routes refuse such ids, so this is a response's input
        that raced an item added under the same id, and ids must stay unique to be read back."""
        with self._lock:
            entry = self._owned(conversation_id, owner)
            if entry is None:
                return None
            old, size = entry
            seen = {item["id"] for item in old.items}
            added = []
            for item in items:
                if item["id"] in seen:
                    item = {**item, "id": new_id(ID_PREFIXES.get(item["type"], "item"))}
                seen.add(item["id"])
                added.append(item)
            self._set(replace(old, items=(*old.items, *added)), size + _items_size(added))
            return added

    def delete_item(self, conversation_id: str, owner: str, item_id: str) -> StoredConversation | None:
        """The conversation without the item (None when either is not found)."""
        with self._lock:
            entry = self._owned(conversation_id, owner)
            if entry is None:
                return None
            old, size = entry
            item = old.item(item_id)
            if item is None:
                return None
            new = replace(old, items=tuple(kept for kept in old.items if kept["id"] != item_id))
            self._set(new, size - _size(item))
            return new

    def hold(self, conversation_id: str) -> bool:
        """Mark the conversation as one a response is being answered in; False when one already is. A response
        reads the items and adds its own when it ends, so two at once would each answer without the other's turn
        and add both in the order they finish."""
        with self._lock:
            if conversation_id in self._held:
                return False
            self._held.add(conversation_id)
            return True

    def let_go(self, conversation_id: str) -> None:
        with self._lock:
            self._held.discard(conversation_id)

    def delete(self, conversation_id: str, owner: str) -> bool:
        with self._lock:
            return self._owned(conversation_id, owner) is not None and self._drop(conversation_id)

    def _owned(self, conversation_id: str, owner: str) -> tuple[StoredConversation, int] | None:
        entry = self._entries.get(conversation_id)
        return entry if entry is not None and entry[0].owner == owner else None

    def _set(self, conversation: StoredConversation, size: int) -> None:
        """Store `conversation` (the most recently used now) and make room, as the response store does: another
        owner's entries are kept while the owner holding the most has others, and a conversation larger than the
        whole store stays, room made among its own owner's entries only."""
        new = conversation.id
        self._drop(new)
        self._entries[new] = (conversation, size)
        self._characters += size
        while len(self._entries) > self.max_conversations or (
            self._characters > self.max_characters and len(self._entries) > 1
        ):
            by_size = len(self._entries) <= self.max_conversations
            only = conversation.owner if by_size and size > self.max_characters else None
            key = victim(self._entries, lambda entry: entry.owner, by_size, new, only)
            if key is None:
                break
            self._drop(key)

    def _drop(self, conversation_id: str) -> bool:
        entry = self._entries.pop(conversation_id, None)
        if entry is None:
            return False
        self._characters -= entry[1]
        return True
