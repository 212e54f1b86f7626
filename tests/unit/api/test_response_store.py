"""The Responses API's in-memory store: least recently used first, bounded by count and by the JSON it holds."""

from __future__ import annotations

from cake_py.api.response_store import ResponseStore, StoredResponse


def stored(response_id: str, text: str = "") -> StoredResponse:
    return StoredResponse({"id": response_id, "output": [{"text": text}]}, [], [{"role": "user", "content": "hi"}])


def test_the_least_recently_used_go_first_past_the_count() -> None:
    store = ResponseStore(max_responses=2)
    store.put(stored("a"))
    store.put(stored("b"))
    assert store.get("a", "") is not None  # a is used: b is now the oldest
    store.put(stored("c"))
    assert (store.get("a", "") is not None, store.get("b", ""), store.get("c", "") is not None) == (True, None, True)


def test_the_size_counts_the_whole_response_not_only_its_text() -> None:
    store = ResponseStore(max_characters=5000)
    store.put(stored("big", "x" * 3000))
    store.put(stored("bigger", "y" * 3000))
    assert store.get("big", "") is None and store.get("bigger", "") is not None  # 6000 characters do not fit
    store.put(stored("huge", "z" * 10_000))
    assert len(store) == 1 and store.get("huge", "") is not None  # the newest stays even alone past the limit
    assert store.delete("huge") and not store.delete("huge") and len(store) == 0


def test_a_response_is_only_its_owners() -> None:
    store = ResponseStore()
    store.put(StoredResponse({"id": "r"}, [], [], owner="alice"))
    assert store.get("r", "alice") is not None
    assert store.get("r", "bob") is None and store.get("r", "") is None  # another key's is not found


def test_one_key_filling_the_store_evicts_its_own_not_another_keys() -> None:
    """A batch of 1,100 stored responses from one key evicted another key's only response."""
    store = ResponseStore(max_responses=4, max_characters=10**9)
    store.put(StoredResponse({"id": "alices"}, [], [], owner="alice"))
    for index in range(10):
        store.put(StoredResponse({"id": f"bob{index}"}, [], [], owner="bob"))
    assert store.get("alices", "alice") is not None and len(store) == 4
    sized = ResponseStore(max_responses=100, max_characters=3000)
    sized.put(StoredResponse({"id": "alices", "output": ["x" * 500]}, [], [], owner="alice"))
    for index in range(10):
        sized.put(StoredResponse({"id": f"bob{index}", "output": ["y" * 500]}, [], [], owner="bob"))
    assert sized.get("alices", "alice") is not None and sized.get("bob9", "bob") is not None


def test_the_response_just_stored_is_kept_when_its_owner_becomes_the_largest() -> None:
    """A key's first, large response made it the largest owner and was evicted at once: its client had been told it
    was stored, and then could not read it."""
    store = ResponseStore(max_responses=100, max_characters=3000)
    for index in range(4):
        store.put(StoredResponse({"id": f"alice{index}", "output": ["x" * 500]}, [], [], owner="alice"))
    store.put(StoredResponse({"id": "bobs", "output": ["y" * 1700]}, [], [], owner="bob"))
    assert store.get("bobs", "bob") is not None
    assert store.get("alice0", "alice") is None and store.get("alice3", "alice") is not None  # alice's oldest went


def test_a_response_larger_than_the_store_clears_no_other_keys_entries() -> None:
    store = ResponseStore(max_responses=100, max_characters=2000)
    for index in range(5):
        store.put(StoredResponse({"id": f"bob{index}", "output": ["y" * 100]}, [], [], owner="bob"))
    store.put(StoredResponse({"id": "alices", "output": ["x" * 3000]}, [], [], owner="alice"))
    assert all(store.get(f"bob{index}", "bob") is not None for index in range(5))  # every one was evicted
    assert store.get("alices", "alice") is not None  # kept alone past the limit, as with one key
