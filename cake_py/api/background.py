"""Responses still being answered: what GET /v1/responses/{id} reads before the stored response exists, and the runs
of background responses (`background: true`, OpenAI's background mode).

A background response is answered by a task of the server's own, not by the request that created it: that request
returns at once (status `queued`), and the answer goes on whether or not anyone listens. Its events are kept, so
`GET /v1/responses/{id}?stream=true&starting_after=N` can replay them from any point and follow the rest, and a
poll reads the response as far as it has come (its output items with their text so far). `POST …/cancel` stops it:
its sequence leaves the engine and the response ends `cancelled`, with the output it had.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator
from typing import Any

from cake_py.api.response_store import ResponseStore, StoredResponse
from cake_py.api.streaming import EventStream, sse

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})


def sse_event(event: dict[str, Any]) -> str:
    """A Responses event as its SSE lines: `event:` names its type, as OpenAI's stream does."""
    return f"event: {event['type']}\n" + sse(event)


def apply_event(response: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """`response` (the object as far as the stream has come) after `event`, as the official client's accumulator
    builds it; a new object where the event carries a whole response, else `response` changed in place."""
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
    output = [
        {**item, "status": "incomplete"} if item.get("status") == "in_progress" else item for item in response["output"]
    ]
    return {**response, "status": "cancelled", "output": output}


class LiveResponse:
    """A response being answered: its object so far (`response`) and, for a background run, its events (SSE lines
    by sequence number) and the task answering it."""

    def __init__(self, response: dict[str, Any], input_items: list[dict[str, Any]], *, background: bool) -> None:
        self.response = response
        self.input_items = input_items
        self.background = background
        self.lines: list[str] = []
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # set, and replaced, at every new line: followers wait on the one they saw

    @property
    def id(self) -> str:
        return str(self.response["id"])

    def record(self, event: dict[str, Any]) -> None:
        self.response = apply_event(self.response, event)
        if self.background:
            self.lines.append(sse_event(event))
            self._notify()

    def finish(self) -> None:
        self.finished = True
        self._notify()

    def _notify(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def follow(self, starting_after: int) -> AsyncIterator[str]:
        """Every event after sequence number `starting_after`, then each new one as it comes, to the end."""
        index = max(starting_after + 1, 0)
        while True:
            wake = self._wake
            while index < len(self.lines):
                yield self.lines[index]
                index += 1
            if self.finished:
                return
            await wake.wait()

    async def cancel(self) -> None:
        """Stop the run (its sequence leaves the engine) and wait until it has stored its end."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def run_in_background(
    live: LiveResponse,
    events: AsyncIterator[dict[str, Any]],
    store: ResponseStore,
    stored: StoredResponse,
    streams: list[EventStream],
) -> None:
    """Answer a background response: record its events, then keep them with the stored response (its `stored`
    stand-in, the conversation before the answer, is what a cancelled or broken run leaves)."""
    try:
        async for event in events:
            live.record(event)
    except asyncio.CancelledError:
        _end(live, store, stored, cancelled(live.response))
        raise
    except Exception:  # a bug: into the log, and the response ends failed rather than in_progress for ever
        log.exception("background response %s failed", live.id)
        error = {"code": "server_error", "message": "the server failed while answering this response"}
        _end(live, store, stored, {**live.response, "status": "failed", "error": error})
    else:
        final = store.get(live.id)  # the run stored its answer (or its failure) before its last event
        if final is None or final.response["status"] not in TERMINAL:
            final = StoredResponse(live.response, stored.input_items, stored.conversation)
        store.put(final.with_events(live.lines))
    finally:
        for stream in streams:  # cancelled before `events` began, its sequence would stay in the engine
            stream.cancel()
        store.end_live(live)
        live.finish()


def _end(live: LiveResponse, store: ResponseStore, stored: StoredResponse, response: dict[str, Any]) -> None:
    live.response = response
    store.put(StoredResponse(response, stored.input_items, stored.conversation).with_events(live.lines))
