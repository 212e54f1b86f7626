"""Reasoning models' thinking, apart from their answer: `<think>…</think>` (Qwen3, QwQ, DeepSeek-R1 and their
distills) goes to a chat message's `reasoning_content` (DeepSeek's and vLLM's field), the rest is its `content`.

A model is taken for a reasoning model when its chat template writes `</think>`. Its answer thinks first when it
opens with `<think>`, or when the prompt itself ends with `<think>` (templates that open the thinking for the
model, as DeepSeek-R1's does): then everything up to `</think>` is reasoning, all of it if the answer stops before.
Qwen3's `enable_thinking: false` (chat_template_kwargs) writes an empty, closed thinking block in the prompt: the
answer is content only.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def is_reasoning_template(template: str | None) -> bool:
    return template is not None and CLOSE in template


def opens_thinking(prompt: str, continued: str | None = None) -> bool:
    """Whether the prompt leaves the model inside a thinking block: it ends with `<think>`, or the final message it
    continues (`continued`: continue_final_message) opened one it did not close."""
    if continued is not None and continued.rfind(OPEN) > continued.rfind(CLOSE):
        return True
    return prompt.rstrip().endswith(OPEN)


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer; `thinking`: the prompt left the model inside a block."""
    stream = ReasoningStream(thinking)
    reasoning, content = stream.feed(text, last=True)
    if not stream.thought:
        return None, text
    return reasoning or None, content or None  # an empty block is no thinking


class ReasoningStream:
    """Splits an answer as it streams: `feed` gives (reasoning, content) to send now, holding back what may be the
    start of a tag."""

    def __init__(self, thinking: bool) -> None:
        self.state = "reasoning" if thinking else "start"  # start → reasoning → content, or start → content
        self.thought = thinking  # whether the answer had a thinking part
        self.held = ""
        self.trim = False  # the answer after </think> starts at its first non-space
        self.trim_reasoning = thinking  # so does the thinking after <think>; its end's spaces are held until more comes

    def feed(self, delta: str, *, last: bool = False) -> tuple[str, str]:
        """(reasoning, content) to send now; `last`: the answer ends with `delta`, nothing is held back."""
        reasoning, content = self._split(delta)
        if last:
            held_reasoning, held_content = self.finish()
            reasoning, content = reasoning + held_reasoning, content + held_content
        return reasoning, content

    def _split(self, delta: str) -> tuple[str, str]:
        text = self.held + delta
        self.held = ""
        reasoning, content = "", ""
        if self.state == "start":
            stripped = text.lstrip()
            if OPEN.startswith(stripped):  # whitespace, or part of the tag so far: wait
                self.held = text
                return "", ""
            if stripped.startswith(OPEN):
                self.state, self.thought, self.trim_reasoning = "reasoning", True, True
                text = stripped[len(OPEN) :]
            else:
                self.state = "content"
        if self.state == "reasoning":
            if self.trim_reasoning:
                text = text.lstrip()
                self.trim_reasoning = not text
            end = text.find(CLOSE)
            if end < 0:
                keep = _partial(text, CLOSE)
                sendable = text[: len(text) - keep]
                kept = len(sendable) - len(sendable.rstrip())  # trailing spaces wait: they may end the thinking
                self.held = text[len(sendable) - kept :]
                return sendable[: len(sendable) - kept], ""
            reasoning, text = text[:end].rstrip(), text[end + len(CLOSE) :]
            self.state, self.trim = "content", True
        if self.state == "content":
            if self.trim:
                text = text.lstrip()
                self.trim = not text
            content = text
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back, once the answer is complete."""
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return held.rstrip(), ""
        return "", held


def _partial(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
