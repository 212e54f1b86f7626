"""Streaming an answer that may hold tool calls (see tools.py for how calls are asked for and read).

- `tool_choice` `auto`: text goes out as it comes. A Hermes `<tool_call>` block streams as a call once its JSON
  object is complete and reads as a call of one of the tools (its id, name and arguments then; the model writes it
  freely, and pieces of JSON that then broke made the OpenAI SDK's partial parser raise), then text again after
  `</tool_call>`. A block that is not a call of a given tool (another name, arguments before the name, a list, JSON
  that breaks, a call cut short), and an answer that opens as JSON (Llama 3's and Mistral's whole-answer calls), are
  held and read when the choice finishes, as the blocking answer reads them.
- Forced calls (`required`, a named function): the grammar guarantees the shape, so each call goes out as it is
  written (api/forced_calls.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cake_py.api.forced_calls import CallDelta, ForcedCalls, StreamedCall, merged
from cake_py.api.tools import (
    CLOSE_TAG,
    JSON_CALL_PREFIXES,
    OPEN_TAG,
    ToolRequest,
    blocks_and_calls,
    json_calls,
    parse_answer,
)


@dataclass
class Finished:
    content: str  # content not sent yet
    unsent: list[dict[str, Any]]  # calls to send whole now; the first's index is `len(calls) - len(unsent)`
    calls: list[dict[str, Any]]  # every call of the answer, as OpenAI's tool_calls
    deltas: list[CallDelta] = field(default_factory=list)  # the last pieces of calls that streamed


class ToolStream:
    """One choice's answer as it streams: `feed` gives the content to send, and `pieces` what to send in order
    (content and call pieces)."""

    def __init__(self, request: ToolRequest) -> None:
        self.request = request
        self.text = ""  # the whole answer so far
        self.sent = 0  # where the text not yet sent as content starts (or, in a block, where the block's tag is)
        self.pieces: list[str | CallDelta] = []  # what the last feed gives, content and call pieces, in order
        self.forced = ForcedCalls(request.choice == "required", request.id_length) if request.forced else None
        self.holding = False  # auto: the rest of the answer is read when it finishes
        self.streamed: list[StreamedCall] = []  # auto: calls that went out as they were written
        self.after_block = False  # auto: whitespace right after a streamed call is held until text follows it
        self.block: _Block | None = None  # auto: the `<tool_call>` block being read

    def feed(self, delta: str) -> str:
        """Content to send now (and, in `pieces`, the call pieces among it)."""
        self.text += delta
        self.pieces = []
        if self.forced is not None:
            self.pieces = list(self.forced.feed(delta))
            return ""
        if not self.request.active:
            self.sent = len(self.text)
            self.pieces = [delta] if delta else []
            return delta
        out: list[str] = []
        while not self.holding:
            if self.block is not None and not self._read_block():
                break
            if self.sent == 0 and not self.streamed and _may_be_json_call(self.text.lstrip()):
                break  # it may be a JSON call (or only whitespace so far): wait
            tag = self.text.find(OPEN_TAG, self.sent)
            if tag < 0:
                out.append(self._send_until(len(self.text) - _partial(self.text, OPEN_TAG)))
                break
            out.append(self._send_until(tag))
            if self.sent < tag:  # only whitespace since the last call: it goes nowhere
                self.sent = tag
            self.block = _Block(tag + len(OPEN_TAG), self.request, len(self.streamed))
        return "".join(out)

    @property
    def deltas(self) -> list[CallDelta]:
        """The call pieces of the last feed."""
        return [piece for piece in self.pieces if isinstance(piece, CallDelta)]

    def _send_until(self, end: int) -> str:
        out = self.text[self.sent : end] if end > self.sent else ""
        if self.after_block and not out.strip():
            return ""
        self.after_block = False
        self.sent = max(self.sent, end)
        if out:
            self.pieces.append(out)
        return out

    def _read_block(self) -> bool:
        """Read the open block as far as the text goes; True once it closed as a streamed call."""
        block = self.block
        assert block is not None
        allow_call = self.request.parallel or not self.streamed
        while True:
            close = self.text.find(CLOSE_TAG, block.search_from)
            end = close if close >= 0 else len(self.text) - _partial(self.text, CLOSE_TAG)
            self._take(block.read(self.text, end, allow_call))
            if close < 0 or block.rejected or not block.in_string:
                break
            block.search_from = close + 1  # the tag is text inside one of the JSON's strings (an argument's value)
        if block.rejected or close >= 0 and block.call is None:  # not a call of a given tool: read at the end
            self.holding, self.block = True, None
            return False
        following = self.text.find(OPEN_TAG, block.complete_at) if block.complete_at is not None else -1
        if following >= 0 and (close < 0 or following < close):  # a whole call, left open: the next block closes it
            close = ended_at = following
        elif close < 0:
            return False
        else:
            ended_at = close + len(CLOSE_TAG)
        self._take(block.finish(self.text[block.start : close]))
        self.block, self.sent, self.after_block = None, ended_at, True
        return True

    def _take(self, deltas: list[CallDelta]) -> None:
        block = self.block
        assert block is not None
        if block.call is not None and (not self.streamed or self.streamed[-1] is not block.call):
            self.streamed.append(block.call)
        self.pieces += deltas

    def finish(self) -> Finished:
        """What is left to send once the answer is complete, and all its calls."""
        self.pieces = []
        if self.forced is not None:
            if self.forced.unordered:
                calls = parse_answer(self.text, self.request).tool_calls
                return Finished("", calls, calls)
            # Cut short (max_tokens), the last call's arguments are what was written of them, as the blocking answer's.
            return Finished("", [], self.forced.tool_calls())
        block, self.block = self.block, None
        if block is not None and block.call is not None:  # the answer ended inside a streamed call
            deltas = block.read(self.text, len(self.text), allow_call=True)
            deltas += block.finish(self.text[block.start :])
            self.sent = len(self.text)
            return Finished("", [], self._streamed_calls(), deltas)
        if self.sent == 0 and not self.streamed:  # nothing went out: the answer is read whole, as a blocking one is
            parsed = parse_answer(self.text, self.request)
            if not parsed.tool_calls:
                return Finished(self._send_until(len(self.text)), [], [])
            self.sent = len(self.text)
            return Finished(parsed.content or "", parsed.tool_calls, parsed.tool_calls)
        around, unsent = blocks_and_calls(self.text[self.sent :], self.request)
        if not self.request.parallel:
            unsent = [] if self.streamed else unsent[:1]
        content = around.rstrip()
        if self.after_block and not content.strip():
            content = ""
        self.sent = len(self.text)
        return Finished(content, unsent, [*self._streamed_calls(), *unsent])

    def _streamed_calls(self) -> list[dict[str, Any]]:
        return [call.as_call() for call in self.streamed]


class _Block:
    """A `<tool_call>` block of an auto answer, read by a ForcedCalls reader as it is written (from `start`, just
    after its tag): `call` once its JSON named one of the tools before anything else."""

    def __init__(self, start: int, request: ToolRequest, index: int) -> None:
        self.start = start
        self.read_to = start
        self.request = request
        self.index = index  # the call's index in the answer
        self.reader = ForcedCalls(listed=False, id_length=request.id_length)
        self.call: StreamedCall | None = None  # once its JSON object closed and reads as a call of a given tool
        self._candidate: StreamedCall | None = None  # what the reader made of it so far
        self._held: list[CallDelta] = []  # its pieces, sent once it is known to be a call
        self.rejected = False
        self.complete_at: int | None = None  # where its call's JSON object closed
        self.search_from = start  # where its closing tag is looked for (past tags inside the JSON's strings)

    @property
    def in_string(self) -> bool:
        """Whether what was read so far ends inside one of the JSON's strings."""
        return self.complete_at is None and self.reader.in_string

    def read(self, text: str, end: int, allow_call: bool) -> list[CallDelta]:
        if end <= self.read_to or self.rejected or self.complete_at is not None:
            return []
        if self.call is None and text[self.start : end].lstrip()[:1] not in ("", "{"):
            self.rejected = True  # a list of calls, or not JSON: read whole at the end
            return []
        deltas = []
        for position in range(self.read_to, end):  # up to where the call's object closes: the rest is not its JSON
            deltas += self.reader.feed(text[position])
            if self.reader.depth == 0 and self.reader.calls:
                self.complete_at = position + 1
                break
        self.read_to = end
        deltas = [delta for delta in merged(deltas) if delta.index == 0]  # one call per block
        if self.reader.unordered:
            self.rejected = self.call is None
            return []
        for delta in deltas:
            if delta.id is not None:
                if delta.name not in self.request.names or not allow_call:
                    self.rejected = True
                    return []
                self._candidate = self.reader.calls[0]
            self._held.append(CallDelta(self.index, delta.arguments, delta.id, delta.name))
        if self.complete_at is None:
            return []
        # Its object closed: a call only if its JSON reads as one, as the blocking answer reads it (pieces of JSON
        # that then broke made the SDK's partial parser raise, and the blocking answer had no call).
        found = json_calls(text[self.start : self.complete_at].strip(), self.request)
        if self._candidate is None or len(found) != 1 or found[0]["function"]["name"] != self._candidate.name:
            self.rejected = True
            return []
        self.call, held, self._held = self._candidate, self._held, []
        return held

    def finish(self, block_text: str) -> list[CallDelta]:
        """The block is complete: arguments the reader could not stream (written as JSON text, or under Llama's
        "parameters") go out whole."""
        if self.call is None or self.call.arguments:
            return []
        found = json_calls(block_text.strip(), self.request)
        if len(found) == 1 and found[0]["function"]["name"] == self.call.name:
            arguments = found[0]["function"]["arguments"]
        else:  # none that any parser reads (null, say): the call still needs arguments that are JSON
            arguments = "{}"
        self.call.arguments.append(arguments)
        return [CallDelta(self.index, arguments)]


def _may_be_json_call(start: str) -> bool:
    """Whether an answer starting with `start` may still turn out to be a whole-answer JSON call."""
    if not start:
        return True
    if start.startswith(OPEN_TAG):
        return False  # a block: read as it comes
    if start[0] in "{[":
        return True
    prefixes = (*JSON_CALL_PREFIXES, OPEN_TAG)
    return any(prefix.startswith(start[: len(prefix)]) or start.startswith(prefix) for prefix in prefixes)


def _partial(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
