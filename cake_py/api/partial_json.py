"""JSON cut short, read as far as it goes: a tool call's arguments that max_tokens stopped mid-way, as Anthropic's
`/v1/messages` gives them (anthropic.py). The rules are those of the parser the `anthropic` SDK reads a streamed
tool_use block's `input_json_delta` pieces with (`jiter.from_json(..., partial_mode=True)`), so a blocking answer's
`input` is what a client accumulating the same answer's stream gets: a container cut short keeps what it holds, a
scalar cut short (a string, a literal, a number that cannot end there) is dropped with its key. JSON that is wrong,
not just short, is a ValueError, as is a document that is nothing but a cut scalar."""

from __future__ import annotations

import json
import re
from typing import Any

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = re.compile(r"[-+0-9.eE]*")
_LITERALS = {"true": True, "false": False, "null": None}
_SPACE = re.compile(r"[ \t\n\r]*")


class _Cut(Exception):
    """The text ended inside a scalar: the scalar (and its key) is dropped."""


def loads_partial(text: str) -> Any:
    """The value `text` holds, read as far as it goes (see the module's docstring); ValueError when it is wrong."""
    try:
        value, _, _ = _Reader(text).value(0)  # what follows a whole value is not read (as in jiter's partial mode)
    except _Cut:
        raise ValueError("the text ends before its first value does") from None
    except RecursionError:  # a model's output nested thousands deep: refused, as the SDK's parser refuses it
        raise ValueError("the text nests too deep to read") from None
    return value


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text

    def _skip(self, at: int) -> int:
        match = _SPACE.match(self.text, at)
        assert match is not None  # `*` matches the empty string
        return match.end()

    def value(self, at: int) -> tuple[Any, int, bool]:
        """The value at `at`, where it ends, and whether it is whole; _Cut when the text ends inside a scalar."""
        at = self._skip(at)
        if at >= len(self.text):
            raise _Cut
        first = self.text[at]
        if first == "{":
            return self._object(at + 1)
        if first == "[":
            return self._array(at + 1)
        if first == '"':
            text, end = self._string(at)
            return text, end, True
        if first == "-" or first.isdigit():
            return self._number(at)
        for word, literal in _LITERALS.items():
            if self.text.startswith(word, at):
                return literal, at + len(word), True
            if word.startswith(self.text[at:]):
                raise _Cut
        raise ValueError(f"unexpected {first!r} at character {at}")

    def _string(self, at: int) -> tuple[str, int]:
        end = at + 1
        while True:
            end = self.text.find('"', end)
            if end < 0:
                raise _Cut
            backslashes = len(self.text[at + 1 : end]) - len(self.text[at + 1 : end].rstrip("\\"))
            if backslashes % 2 == 0:  # a quote no backslash escapes ends the string
                text: str = json.loads(self.text[at : end + 1])
                return text, end + 1
            end += 1

    def _number(self, at: int) -> tuple[Any, int, bool]:
        match = _NUMBER_CHARS.match(self.text, at)
        assert match is not None
        end = match.end()
        if not _NUMBER.fullmatch(self.text, at, end):
            if end >= len(self.text):  # "1.", "-", "1e+": a number that cannot end there
                raise _Cut
            raise ValueError(f"invalid number {self.text[at:end]!r} at character {at}")
        return json.loads(self.text[at:end]), end, True

    def _array(self, at: int) -> tuple[list[Any], int, bool]:
        items: list[Any] = []
        at = self._skip(at)
        if self.text.startswith("]", at):
            return items, at + 1, True
        while True:
            try:
                item, at, whole = self.value(at)
            except _Cut:
                return items, len(self.text), False
            items.append(item)
            at = self._skip(at)
            if not whole or at >= len(self.text):
                return items, len(self.text), False
            if self.text[at] == "]":
                return items, at + 1, True
            if self.text[at] != ",":
                raise ValueError(f"expected ',' or ']' at character {at}")
            at += 1

    def _object(self, at: int) -> tuple[dict[str, Any], int, bool]:
        members: dict[str, Any] = {}
        at = self._skip(at)
        if self.text.startswith("}", at):
            return members, at + 1, True
        while True:
            if at >= len(self.text):
                return members, at, False
            if self.text[at] != '"':
                raise ValueError(f"expected a key (a string) at character {at}")
            try:
                key, at = self._string(at)
                at = self._skip(at)
                if at >= len(self.text):
                    return members, at, False
                if self.text[at] != ":":
                    raise ValueError(f"expected ':' at character {at}")
                value, at, whole = self.value(at + 1)
            except _Cut:
                return members, len(self.text), False
            members[key] = value
            at = self._skip(at)
            if not whole or at >= len(self.text):
                return members, len(self.text), False
            if self.text[at] == "}":
                return members, at + 1, True
            if self.text[at] != ",":
                raise ValueError(f"expected ',' or '}}' at character {at}")
            at = self._skip(at + 1)
