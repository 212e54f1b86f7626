"""Stored chat completions: a stream folded back into the blocking object (content, reasoning, tool calls in
pieces, logprobs, usage), messages given ids, and the store's bounds."""

from __future__ import annotations

from typing import Any

from cake_py.api.chat_store import ChatFold, ChatStore, stored_messages


def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "finish_reason": finish, **extra}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m", "choices": [choice]}


def test_a_stream_folds_back_into_the_completion() -> None:
    fold = ChatFold()
    fold.add(chunk(0, {"role": "assistant", "content": ""}))
    fold.add(chunk(1, {"role": "assistant", "content": ""}))
    fold.add(chunk(0, {"reasoning_content": "Think"}))
    fold.add(chunk(0, {"content": "Hel"}, logprobs={"content": [{"token": "Hel", "logprob": -0.1}]}))
    fold.add(
        chunk(
            1,
            {
                "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}
                ]
            },
        )
    )
    fold.add(chunk(1, {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}))
    fold.add(chunk(0, {"content": "lo"}, logprobs={"content": [{"token": "lo", "logprob": -0.2}]}))
    fold.add(chunk(0, {}, "stop"))
    fold.add(chunk(1, {}, "tool_calls"))
    fold.add({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    completion = fold.completion()
    assert (completion["id"], completion["object"], completion["model"]) == ("chatcmpl-1", "chat.completion", "m")
    first, second = completion["choices"]
    assert first["message"] == {"role": "assistant", "content": "Hello", "reasoning_content": "Think"}
    assert [entry["token"] for entry in first["logprobs"]["content"]] == ["Hel", "lo"]
    assert first["finish_reason"] == "stop" and second["finish_reason"] == "tool_calls"
    assert second["message"]["content"] is None
    assert second["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert completion["usage"]["total_tokens"] == 7


def test_messages_get_ids_and_their_parts_joined() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    stored = stored_messages("chatcmpl-9", messages)
    assert [m["id"] for m in stored] == ["chatcmpl-9-0", "chatcmpl-9-1"]
    assert stored[0]["content_parts"] is None and stored[1]["content"] == "Hi there"
    assert stored[1]["content_parts"] == messages[1]["content"]


def test_the_store_drops_the_oldest_past_its_bounds() -> None:
    store = ChatStore(max_completions=2)
    for index in range(3):
        store.put({"id": f"c{index}", "model": "m"}, [{"role": "user", "content": "x"}], {"i": str(index)})
    assert [s.completion["id"] for s in store.all()] == ["c1", "c2"]
    assert store.get("c0") is None and store.get("c2").completion["metadata"] == {"i": "2"}  # type: ignore[union-attr]
    small = ChatStore(max_characters=400)
    small.put({"id": "a", "text": "y" * 100}, [], None)
    small.put({"id": "b", "text": "y" * 300}, [], None)
    assert [s.completion["id"] for s in small.all()] == ["b"]
    assert small.update("b", {"k": "v"}).completion["metadata"] == {"k": "v"}  # type: ignore[union-attr]
    assert small.delete("b") and not small.delete("b") and len(small) == 0


def test_one_key_filling_the_store_evicts_its_own_not_another_keys() -> None:
    store = ChatStore(max_completions=3)
    store.put({"id": "alices", "model": "m"}, [], None, owner="alice")
    for index in range(10):
        store.put({"id": f"bob{index}", "model": "m"}, [], None, owner="bob")
    assert store.get("alices") is not None and store.get("bob9") is not None and len(store) == 3


def test_the_completion_just_stored_is_kept_when_its_owner_becomes_the_largest() -> None:
    store = ChatStore(max_characters=1500)
    for index in range(4):
        store.put({"id": f"alice{index}", "text": "x" * 200}, [], None, owner="alice")
    store.put({"id": "bobs", "text": "y" * 800}, [], None, owner="bob")
    assert store.get("bobs") is not None and store.get("alice0") is None and store.get("alice3") is not None
    store.put({"id": "huge", "text": "z" * 5000}, [], None, owner="carol")  # alone larger than the store: not kept
    assert store.get("huge") is None


def test_a_completion_larger_than_the_store_clears_no_other_keys_entries() -> None:
    store = ChatStore(max_characters=2000)
    for index in range(5):
        store.put({"id": f"bob{index}", "text": "y" * 100}, [], None, owner="bob")
    store.put({"id": "alices", "text": "x" * 3000}, [], None, owner="alice")
    assert store.get("alices") is None and all(store.get(f"bob{index}") is not None for index in range(5))
