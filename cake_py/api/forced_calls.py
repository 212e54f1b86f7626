"""Forced tool calls read as they are generated (`tool_choice` `required` or a named function): the grammar holds
the output to `{"name": …, "arguments": {…}}` or a list of those, so a call's name and arguments can be told apart
character by character, before the answer is complete. The streaming and the blocking answers both read calls
here, so they give the same ids' calls the same text: the arguments' JSON as written, without the whitespace
outside strings and spaced as `json.dumps` spaces it (`: `, `, `).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_call_id(length: int | None = None) -> str:
    """A tool call's id: OpenAI's form (`call_` and 24 hex digits), or `length` alphanumerics where the model's
    template requires that (Mistral's: 9)."""
    return uuid.uuid4().hex[:length] if length else f"call_{uuid.uuid4().hex[:24]}"


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

    def __init__(self, listed: bool, id_length: int | None = None) -> None:
        self.id_length = id_length  # the ids the template requires (new_call_id)
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
        return [] if self.unordered else merged(deltas)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls read so far, as OpenAI's tool_calls (the last one's arguments partial if the text was cut)."""
        return [call.as_call() for call in self.calls]

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
            self.calls.append(StreamedCall(new_call_id(self.id_length), value))
            self.deltas.append(CallDelta(len(self.calls) - 1, id=self.calls[-1].id, name=value))


def merged(deltas: list[CallDelta]) -> list[CallDelta]:
    """Consecutive argument pieces of one call as one delta."""
    merged: list[CallDelta] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if last is not None and delta.id is None and last.index == delta.index:
            last.arguments += delta.arguments
        else:
            merged.append(CallDelta(delta.index, delta.arguments, delta.id, delta.name))
    return merged
