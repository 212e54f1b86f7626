"""The Conversations API's in-memory store: each conversation its owner's, items appended in order with unique ids,
least recently used first out past the count or the characters, and a size kept right through every change."""

from __future__ import annotations

from typing import Any

from cake_py.api.conversation_store import ConversationStore, StoredConversation


def message(item_id: str, text: str = "hi") -> dict[str, Any]:
    content = [{"type": "input_text", "text": text}]
    return {"type": "message", "id": item_id, "role": "user", "content": content, "status": "completed"}


def conversation(conversation_id: str, *items: dict[str, Any], owner: str = "") -> StoredConversation:
    return StoredConversation(conversation_id, 0, {}, tuple(items), owner)


def test_items_are_appended_in_order_and_read_by_id() -> None:
    store = ConversationStore()
    store.put(conversation("c", message("m1")))
    added = store.add_items("c", "", [message("m2"), message("m3")])
    assert added is not None and [item["id"] for item in added] == ["m2", "m3"]
    found = store.get("c", "")
    assert found is not None and [item["id"] for item in found.items] == ["m1", "m2", "m3"]
    assert found.item("m2") == message("m2") and found.item("nope") is None


def test_an_item_id_the_conversation_holds_is_given_a_new_one() -> None:
    """A response's input that raced an item added under its id: both are kept, each readable by its own id."""
    store = ConversationStore()
    store.put(conversation("c", message("m1")))
    added = store.add_items("c", "", [message("m1", "again")])
    assert added is not None and added[0]["id"].startswith("msg_") and added[0]["content"][0]["text"] == "again"
    found = store.get("c", "")
    assert found is not None and len({item["id"] for item in found.items}) == 2


def test_a_conversation_is_only_its_owners() -> None:
    store = ConversationStore()
    store.put(conversation("c", message("m1"), owner="alice"))
    assert store.get("c", "alice") is not None
    assert store.get("c", "bob") is None and store.get("c", "") is None
    assert store.add_items("c", "bob", [message("m2")]) is None
    assert store.update("c", "bob", {"k": "v"}) is None
    assert store.delete_item("c", "bob", "m1") is None
    assert not store.delete("c", "bob")
    kept = store.get("c", "alice")
    assert kept is not None and kept.metadata == {} and [item["id"] for item in kept.items] == ["m1"]


def test_metadata_is_replaced_and_items_deleted() -> None:
    store = ConversationStore()
    store.put(StoredConversation("c", 7, {"a": "1"}, (message("m1"), message("m2"))))
    updated = store.update("c", "", {"b": "2"})
    assert updated is not None
    assert updated.body == {"id": "c", "object": "conversation", "created_at": 7, "metadata": {"b": "2"}}
    without = store.delete_item("c", "", "m1")
    assert without is not None and [item["id"] for item in without.items] == ["m2"]
    assert store.delete_item("c", "", "m1") is None  # gone already
    assert store.delete("c", "") and not store.delete("c", "") and len(store) == 0


def test_the_least_recently_used_go_first_past_the_count() -> None:
    store = ConversationStore(max_conversations=2)
    store.put(conversation("a"))
    store.put(conversation("b"))
    assert store.get("a", "") is not None  # a is used: b is now the oldest
    store.put(conversation("c"))
    assert (store.get("a", "") is not None, store.get("b", ""), store.get("c", "") is not None) == (True, None, True)


def test_items_added_count_toward_the_characters_and_evict_others() -> None:
    store = ConversationStore(max_characters=5000)
    store.put(conversation("old", message("m", "x" * 2000)))
    store.put(conversation("new"))
    store.add_items("new", "", [message("n1", "y" * 2000)])
    assert store.get("old", "") is not None  # 4000 and some: it fits
    store.add_items("new", "", [message("n2", "z" * 2000)])
    assert store.get("old", "") is None and store.get("new", "") is not None  # the growing one stays, the older goes


def test_the_size_shrinks_as_items_are_deleted() -> None:
    """A size only ever grown would evict conversations the store has room for."""
    store = ConversationStore(max_characters=5000)
    store.put(conversation("big", message("m1", "x" * 3000)))
    assert store.delete_item("big", "", "m1") is not None
    store.put(conversation("other", message("m2", "y" * 3000)))
    assert store.get("big", "") is not None and store.get("other", "") is not None


def test_one_key_filling_the_store_evicts_its_own_not_another_keys() -> None:
    store = ConversationStore(max_conversations=3)
    store.put(conversation("bobs", owner="bob"))
    for index in range(5):
        store.put(conversation(f"alice{index}", owner="alice"))
    assert store.get("bobs", "bob") is not None
    assert [store.get(f"alice{index}", "alice") is not None for index in range(5)] == [False] * 3 + [True] * 2
