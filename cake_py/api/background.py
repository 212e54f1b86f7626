"""Responses still being answered: what GET /v1/responses/{id} reads before the stored response exists, and the runs
of background responses (`background: true`, OpenAI's background mode).

A background response is answered by a task of the server's own, not by the request that created it: that request
returns at once (status `queued`), and the answer goes on whether or not anyone listens. Its events are kept, so
`GET /v1/responses/{id}?stream=true&starting_after=N` can replay them from any point and follow the rest, and a
poll reads the response as far as it has come (its output items with their text so far). `POST …/cancel` stops it:
its sequence leaves the engine and the response ends `cancelled`, with the output it had (its stream's last event is
then `response.cancelled`, this server's own: OpenAI's stream has no event for it).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from cake_py.api.include import without_logprobs
from cake_py.api.response_store import ResponseStore, StoredResponse
from cake_py.api.streaming import EventStream, sse

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})


def sse_event(event: dict[str, Any]) -> str:
    """A Responses event as its SSE lines: `event:` names its type, as OpenAI's stream does."""
    return f"event: {event['type']}\n" + sse(event)


def apply_event(response: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """`response` (the object as far as the stream has come) after `event`, much as the official client's accumulator
    builds it (a done item replaces the added one, and reasoning text accumulates); a new object where the event
    carries a whole response, else `response` changed in place."""
    if "response" in event:  # created, queued, in_progress and the terminal events: the whole object
        return copy.deepcopy(event["response"])
    kind, output = event["type"], response["output"]
    index = event.get("output_index", 0)
    if kind in ("response.output_item.added", "response.output_item.done"):
        output.extend({} for _ in range(index + 1 - len(output)))
        output[index] = copy.deepcopy(event["item"])
    elif kind == "response.content_part.added":
        output[index]["content"].append(copy.deepcopy(event["part"]))
    elif kind == "response.output_text.delta":
        output[index]["content"][event["content_index"]]["text"] += event["delta"]
    elif kind == "response.reasoning_text.delta":
        content = output[index]["content"]
        if not content:
            content.append({"type": "reasoning_text", "text": ""})
        content[0]["text"] += event["delta"]
    elif kind == "response.function_call_arguments.delta":
        output[index]["arguments"] += event["delta"]
    return response


def cancelled(response: dict[str, Any]) -> dict[str, Any]:
    """The response object of a run cancelled at `response`: what it had, its unfinished items incomplete."""
    return {**unfinished(response), "status": "cancelled"}


def unfinished(response: dict[str, Any]) -> dict[str, Any]:
    """`response` with the items still being written marked incomplete (a run that ended early)."""
    output = [
        {**item, "status": "incomplete"} if item.get("status") == "in_progress" else item for item in response["output"]
    ]
    return {**response, "output": output}


def keeping_output(live: LiveResponse, event: dict[str, Any]) -> dict[str, Any]:
    """`event` as it is recorded and sent: a `response.failed` (the engine's failure, which knows nothing of the
    output) carries what the run had written, its unfinished items incomplete."""
    if event["type"] != "response.failed":
        return event
    return {**event, "response": {**event["response"], "output": unfinished(live.response)["output"]}}


def line_without_logprobs(line: str) -> str:
    """An event's SSE lines as the store keeps them: rewritten without logprobs where it holds some."""
    if '"logprobs":[{' not in line:
        return line
    return sse_event(without_logprobs(json.loads(line[line.index("data: ") + len("data: ") :])))


class LiveResponse:
    """A response being answered: its object so far (`response`) and, for a background run, its events (SSE lines
    by sequence number) and the task answering it."""

    def __init__(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], *, background: bool, owner: str = ""
    ) -> None:
        self.response = response
        self.input_items = input_items
        self.background = background
        self.owner = owner  # the API key's owner that asked for it: only it sees it
        self.lines: list[str] = []
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()  # set, and replaced, at every new line: followers wait on the one they saw
        self._ended = asyncio.Event()  # set by `finish`, once the end is stored

    @property
    def id(self) -> str:
        return str(self.response["id"])

    def record(self, event: dict[str, Any]) -> None:
        self.response = apply_event(self.response, event)
        if self.background:
            self.lines.append(sse_event(event))
            self._notify()

    def record_end(self, kind: str, response: dict[str, Any]) -> None:
        """A last event of this server's own (the run did not end by its events): `kind` carrying `response`."""
        self.record({"type": kind, "sequence_number": len(self.lines), "response": response})

    def finish(self) -> None:
        self.finished = True
        self._ended.set()
        self._notify()

    def _notify(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def follow(self, starting_after: int, logprobs: bool = True) -> AsyncIterator[str]:
        """Every event after sequence number `starting_after`, then each new one as it comes, to the end (without
        their logprobs when not `logprobs`)."""
        index = max(starting_after + 1, 0)
        while True:
            wake = self._wake
            while index < len(self.lines):
                line = self.lines[index]
                yield line if logprobs else line_without_logprobs(line)
                index += 1
            if self.finished:
                return
            await wake.wait()

    async def cancel(self) -> None:
        """Stop the run (its sequence leaves the engine) and wait until it has stored its end: a task already done
        may not have yet (its done callback stores it a loop iteration later; a delete in between came back)."""
        if self.task is not None:
            if not self.task.done():
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
            await self._ended.wait()

    def cancel_soon(self) -> None:
        """Cancel from any thread, a signal handler included (the server stopping)."""
        if self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)


def start_in_background(
    live: LiveResponse,
    events: AsyncIterator[dict[str, Any]],
    store: ResponseStore,
    stand_in: StoredResponse,
    streams: list[EventStream],
    on_end: Callable[[], None] | None = None,
) -> None:
    """Answer a background response in a task of its own. `stand_in` (the conversation before the answer) is what
    is stored for a run that does not complete; `on_end` is called once the run is over, however it ended."""
    store.start_live(live)
    live.task = asyncio.create_task(_run(live, events))
    # A done callback, not the coroutine's own `finally`: a task cancelled before its first step never runs that.
    live.task.add_done_callback(lambda _: _end(live, store, stand_in, streams, on_end))


async def _run(live: LiveResponse, events: AsyncIterator[dict[str, Any]]) -> None:
    try:
        async for event in events:
            live.record(keeping_output(live, event))
    except Exception:  # a bug: into the log, and the response ends failed rather than in_progress for ever
        log.exception("background response %s failed", live.id)
        error = {"code": "server_error", "message": "the server failed while answering this response"}
        live.record_end("response.failed", {**unfinished(live.response), "status": "failed", "error": error})


def _end(
    live: LiveResponse,
    store: ResponseStore,
    stand_in: StoredResponse,
    streams: list[EventStream],
    on_end: Callable[[], None] | None = None,
) -> None:
    """The run is over, however it ended: its sequence leaves the engine, its end is stored with its events, and its
    followers are told (a cancelled run ends with a `response.cancelled` event of this server's own)."""
    if live.finished:
        return
    try:
        for stream in streams:
            stream.cancel()
        if live.response["status"] not in TERMINAL:
            live.record_end("response.cancelled", cancelled(live.response))
        # A completed run stored itself, with its conversation, before its last event.
        answered = store.get(live.id, live.owner)
        if answered is not None and answered.response["status"] == live.response["status"]:
            final = answered
        else:
            final = StoredResponse(
                without_logprobs(live.response), stand_in.input_items, stand_in.conversation, owner=live.owner
            )
        store.put(final.with_events(line_without_logprobs(line) for line in live.lines))
        store.end_live(live)
    finally:  # whatever happened, those waiting on its end (a cancel, a delete, followers) are let go
        if on_end is not None:
            on_end()
        live.finish()
