"""Streaming an answer that may hold tool calls (see tools.py for how calls are asked for and read).

- `tool_choice` `auto`: text goes out as it comes until a call may be starting (a `<tool_call>` tag, or an answer
  that opens as JSON); from there it is held, and read when the choice finishes (the model may not have written a
  call after all, and what was streamed cannot be taken back).
- Forced calls (`required`, a named function): the grammar guarantees the shape, so each call goes out as it is
  written (api/forced_calls.py), as OpenAI streams calls: its id and name once the name is complete, then its
  arguments' JSON piece by piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cake_py.api.forced_calls import CallDelta, ForcedCalls
from cake_py.api.tools import JSON_CALL_PREFIXES, OPEN_TAG, ToolRequest, parse_answer, text_around_blocks


@dataclass
class Finished:
    content: str  # content not sent yet
    unsent: list[dict[str, Any]]  # calls to send whole now (auto); streamed ones went out already
    calls: list[dict[str, Any]]  # every call of the answer, as OpenAI's tool_calls


class ToolStream:
    """One choice's answer as it streams: `feed` gives the content to send and `deltas` the call pieces to send."""

    def __init__(self, request: ToolRequest) -> None:
        self.request = request
        self.text = ""  # the whole answer so far
        self.sent = 0  # how much of it went out as content
        self.holding = request.forced  # forced calls: nothing is content
        self.forced = ForcedCalls(request.choice == "required", request.id_length) if request.forced else None
        self.deltas: list[CallDelta] = []  # call pieces of the last feed

    def feed(self, delta: str) -> str:
        """Content to send now (and, for forced calls, `deltas`)."""
        self.text += delta
        if self.forced is not None:
            self.deltas = self.forced.feed(delta)
            return ""
        if not self.request.active:
            self.sent = len(self.text)
            return delta
        if self.holding:
            return ""
        start = self.text.lstrip()
        if self.sent == 0 and (not start or start[0] in "{[<" and _could_open_json(start)):
            return ""  # it may be a JSON call (or only whitespace so far): wait
        tag = self.text.find(OPEN_TAG, self.sent)
        if tag >= 0:
            self.holding = True
            return self._send_until(tag)
        return self._send_until(len(self.text) - _partial_tag(self.text))

    def _send_until(self, end: int) -> str:
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def finish(self) -> Finished:
        """What is left to send once the answer is complete, and all its calls."""
        if self.forced is not None:
            if self.forced.unordered:
                calls = parse_answer(self.text, self.request).tool_calls
                return Finished("", calls, calls)
            # Cut short (max_tokens), the last call's arguments are what was written of them, as the blocking answer's.
            return Finished("", [], self.forced.tool_calls())
        parsed = parse_answer(self.text, self.request)
        if not parsed.tool_calls:
            return Finished(self._send_until(len(self.text)), [], [])
        # What was sent is text before the first call; what is left of the content is the text around the calls.
        around = text_around_blocks(self.text, self.request)
        rest = (parsed.content or "") if self.sent == 0 else around[self.sent :].rstrip()
        self.sent = len(self.text)
        return Finished(rest, parsed.tool_calls, parsed.tool_calls)


def _could_open_json(start: str) -> bool:
    """Whether an answer starting with `start` may still turn out to be a JSON call or a tag."""
    if start[0] in "{[":
        return True
    prefixes = (*JSON_CALL_PREFIXES, OPEN_TAG)
    return any(prefix.startswith(start[: len(prefix)]) or start.startswith(prefix) for prefix in prefixes)


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could be the start of a `<tool_call>` tag."""
    for size in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if OPEN_TAG.startswith(text[-size:]):
            return size
    return 0
