"""Streaming an answer that may hold tool calls (see tools.py for how calls are asked for and read).

- `tool_choice` `auto`: text goes out as it comes until a call may be starting (a `<tool_call>` tag, or an answer
  that opens as JSON); from there it is held, and read when the choice finishes (the model may not have written a
  call after all, and what was streamed cannot be taken back).
- Forced calls (`required`, a named function): the grammar guarantees the shape, `{"name": …, "arguments": {…}}`
  or a list of those, so each call goes out as it is written, as OpenAI streams calls: its id and name once the
  name is complete, then its arguments' JSON piece by piece (spaced as `json.dumps` spaces it).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from cake_py.api.tools import JSON_CALL_PREFIXES, OPEN_TAG, ToolRequest, parse_answer, text_around_blocks


@dataclass
class CallDelta:
    """A piece of a streamed call: its header (`id` and `name`, arguments still empty) or more `arguments` text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class StreamedCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)

    def as_call(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


class ForcedCalls:
    """Reads forced calls' JSON character by character as it is generated, keeping only what a call needs: the
    depth of the call objects, which key a value belongs to, and the arguments' text (whitespace outside strings
    dropped, `: ` and `, ` as json.dumps writes them)."""

    def __init__(self, listed: bool) -> None:
        self.call_depth = 2 if listed else 1  # [ {call}, … ] or {call}
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.string: list[str] = []  # the string being read at the call's depth
        self.expecting_key = False
        self.key: str | None = None  # the call object's key whose value comes next
        self.capturing = False  # inside a call's arguments value
        self.named = False  # the current call object's name has been read
        self.unordered = False  # a call wrote its arguments first: nothing streams, the calls go whole at the end
        self.calls: list[StreamedCall] = []
        self.deltas: list[CallDelta] = []

    def feed(self, text: str) -> list[CallDelta]:
        """The call deltas `text` completes."""
        for char in text:
            if self.capturing:
                self._argument_char(char)
            else:
                self._frame_char(char)
        deltas, self.deltas = self.deltas, []
        return [] if self.unordered else _merged(deltas)

    def _argument_char(self, char: str) -> None:
        call = self.calls[-1]
        piece = char
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
        elif char.isspace():
            return
        elif char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
        elif char in ":,":
            piece += " "
        call.arguments.append(piece)
        self.deltas.append(CallDelta(len(self.calls) - 1, arguments=piece))
        if self.depth == self.call_depth:  # the arguments' value closed
            self.capturing = False

    def _frame_char(self, char: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
                self.string.append(char)
            elif char == "\\":
                self.escaped = True
                self.string.append(char)
            elif char == '"':
                self.in_string = False
                self._string_read(json.loads('"' + "".join(self.string) + '"'))
            else:
                self.string.append(char)
            return
        if char == '"':
            self.in_string, self.string = True, []
        elif char in "{[":
            if self.depth == self.call_depth and self.key == "arguments" and not self.expecting_key:
                if not self.named:  # arguments before the name: nothing to announce them under
                    self.unordered = True
                else:
                    self.capturing = True
                    self._argument_char(char)
                    return
            self.depth += 1
            if self.depth == self.call_depth and char == "{":  # a new call object
                self.expecting_key, self.key, self.named = True, None, False
        elif char in "}]":
            self.depth -= 1
        elif self.depth == self.call_depth and char == ",":
            self.expecting_key, self.key = True, None
        elif self.depth == self.call_depth and char == ":":
            self.expecting_key = False

    def _string_read(self, value: str) -> None:
        if self.depth != self.call_depth:
            return
        if self.expecting_key:
            self.key = value
        elif self.key == "name" and not self.named:
            self.named = True
            self.calls.append(StreamedCall(f"call_{uuid.uuid4().hex[:24]}", value))
            self.deltas.append(CallDelta(len(self.calls) - 1, id=self.calls[-1].id, name=value))


def _merged(deltas: list[CallDelta]) -> list[CallDelta]:
    """Consecutive argument pieces of one call as one delta."""
    merged: list[CallDelta] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if last is not None and delta.id is None and last.index == delta.index:
            last.arguments += delta.arguments
        else:
            merged.append(CallDelta(delta.index, delta.arguments, delta.id, delta.name))
    return merged


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
        self.forced = ForcedCalls(listed=request.choice == "required") if request.forced else None
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
            calls = parse_answer(self.text, self.request).tool_calls
            if self.forced.unordered:
                return Finished("", calls, calls)
            # A complete answer holds every streamed call; one cut short (max_tokens) holds none, whatever streamed.
            return Finished("", [], [call.as_call() for call in self.forced.calls] if calls else [])
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
