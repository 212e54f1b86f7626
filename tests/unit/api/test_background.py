"""The response object a poll reads while a background response is answered: its events folded as the official
client's accumulator folds them; a cancelled run's unfinished items."""

from __future__ import annotations

from typing import Any

from cake_py.api.background import apply_event, cancelled


def response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "status": status, "output": output}


def test_events_fold_into_the_response_so_far() -> None:
    thinking = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [], "status": "in_progress"}
    message = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
    call = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "c",
        "name": "f",
        "arguments": "",
        "status": "in_progress",
    }
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    events: list[dict[str, Any]] = [
        {"type": "response.in_progress", "response": response("in_progress", [])},
        {"type": "response.output_item.added", "output_index": 0, "item": thinking},
        {"type": "response.reasoning_text.delta", "output_index": 0, "content_index": 0, "delta": "Hm"},
        {"type": "response.reasoning_text.delta", "output_index": 0, "content_index": 0, "delta": "m."},
        {"type": "response.output_item.added", "output_index": 1, "item": message},
        {"type": "response.content_part.added", "output_index": 1, "content_index": 0, "part": part},
        {"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "delta": "Par"},
        {"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "delta": "is"},
        {"type": "response.output_item.added", "output_index": 2, "item": call},
        {"type": "response.function_call_arguments.delta", "output_index": 2, "delta": '{"a":'},
    ]
    state: dict[str, Any] = response("queued", [])
    for event in events:
        state = apply_event(state, event)
    assert state["status"] == "in_progress"
    reasoning, answer, partial = state["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Hmm."}]
    assert answer["content"][0]["text"] == "Paris" and partial["arguments"] == '{"a":'
    assert message["content"] == [] and part["text"] == "" and call["arguments"] == ""  # the events are not changed
    stopped = cancelled(state)
    assert stopped["status"] == "cancelled"
    assert [item["status"] for item in stopped["output"]] == ["incomplete"] * 3
    done = {**answer, "status": "completed"}
    state = apply_event(state, {"type": "response.output_item.done", "output_index": 1, "item": done})
    assert state["output"][1] == done and cancelled(state)["output"][1]["status"] == "completed"
    final = response("completed", [done])
    assert apply_event(state, {"type": "response.completed", "response": final}) == final


def test_a_delete_right_as_a_run_ends_waits_for_its_end_and_the_response_stays_deleted() -> None:
    """A run's end is stored by its task's done callback, a loop iteration after the task is done. A delete in
    between found the task done, deleted the entry, and the callback then stored the response again."""
    import asyncio

    from cake_py.api.background import LiveResponse, start_in_background
    from cake_py.api.response_store import ResponseStore, StoredResponse

    async def scenario() -> ResponseStore:
        store = ResponseStore()
        live = LiveResponse(response("queued", []), [], background=True)
        deleting: list[asyncio.Task[None]] = []

        async def delete() -> None:
            await live.cancel()
            store.delete(live.id)

        async def events() -> Any:
            final = response("completed", [])
            store.put(StoredResponse(final, [], []))  # a completed run stores itself before its last event
            yield {"type": "response.completed", "sequence_number": 0, "response": final}
            deleting.append(asyncio.create_task(delete()))  # runs before the task's done callbacks

        start_in_background(live, events(), store, StoredResponse(response("queued", []), [], []), [])
        await asyncio.sleep(0.05)
        await deleting[0]
        await asyncio.sleep(0.05)
        return store

    store = asyncio.run(scenario())
    assert store.get("resp_1", "") is None and store.live("resp_1", "") is None
