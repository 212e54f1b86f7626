"""Tokenizer, chat template and streaming detokenization.

Wraps the `tokenizers` library on a tokenizer.json (from a HF folder, or built from GGUF metadata) and renders the
model's own chat template (models/chat_template.py) the way transformers does. `IncrementalDecoder` turns a token
stream into UTF-8-safe text deltas while decoding only a small window per token.
"""

from __future__ import annotations

import copy as _copy
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer as HFTokenizer

from cake_py.errors import ContextLengthError, ModelError, RequestError
from cake_py.models import chat_template

_KEPT_TEMPLATES = 8  # requests' own chat templates kept compiled
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' own mark, so both cut prompts at the same place


# A template that refuses tool call ids of another length: `tool_call.id|length != 9` (Mistral's templates).
_ID_LENGTH_CHECK = re.compile(r"tool_call(?:\.id|_id)\s*\|\s*length\s*[!=]=\s*(\d+)")


class Tokenizer:
    """Text ↔ token ids, the chat template, and the set of token ids that end a generation."""

    def __init__(
        self,
        backend: HFTokenizer,
        tokenizer_config: dict[str, Any] | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        # As transformers does for a plain encode: padding or truncation a tokenizer.json asks for would pad every
        # prompt (a fixed length of 10^9 allocated gigabytes and aborted the process) or cut it silently.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.config = tokenizer_config or {}
        self.chat_template: str | None = _template_text(self.config.get("chat_template"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        eos = set(eos_token_ids)
        if self.eos_token is not None and (eos_id := backend.token_to_id(self.eos_token)) is not None:
            eos.add(eos_id)
        self.eos_token_ids = frozenset(eos)
        self._template: jinja2.Template | None = None
        self._added = {token.content for token in backend.get_added_tokens_decoder().values()}
        self._byte_level: bool | None = None  # whether the decoder is byte-level: looked up on first use
        self._literal: HFTokenizer | None = None  # for encode_literal, made on first use
        self._template_name = "the model's chat template"  # for error messages
        self._variants: dict[str, Tokenizer] = {}  # with_chat_template's copies, by template
        self._lock = threading.Lock()
        # The context a served engine holds (set when it is built): a text too long for it by its length alone is
        # refused before it is encoded (a 7.5 MB prompt took 8 s and 1.6 GB to count, only to be refused).
        self.max_tokens: int | None = None
        self._longest_token: int | None = None

    @classmethod
    def from_folder(cls, folder: Path, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and generation_config.json from a HF model folder."""
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"no tokenizer.json in model folder {str(folder)!r}")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises plain Exception subclasses
            raise ModelError(f"cannot read tokenizer {str(path)!r}: {error}") from error
        config = _read_json(folder / "tokenizer_config.json")
        # Where transformers ≥ 4.43 saves the template; like transformers, it wins over tokenizer_config.json's.
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            try:
                config["chat_template"] = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ModelError(f"cannot read chat template {str(template_file)!r}: {error}") from error
        processor_file = folder / "chat_template.json"
        if config.get("chat_template") is None and processor_file.is_file():
            # A multimodal model's processor keeps it there (transformers' legacy file), its tokenizer's config
            # maybe none: left unread, its chat was rendered in the ChatML fallback, not the model's own format.
            config["chat_template"] = _read_json(processor_file).get("chat_template")
        generation = folder / "generation_config.json"
        eos = set(eos_token_ids) | _eos_ids(_read_json(generation).get("eos_token_id"), generation)
        return cls(backend, config, eos)

    @classmethod
    def from_json(cls, tokenizer_json: str, tokenizer_config: dict[str, Any], eos_token_ids: Iterable[int] = ()):
        try:
            backend = HFTokenizer.from_str(tokenizer_json)
        except Exception as error:
            raise ModelError(f"cannot build tokenizer from model metadata: {error}") from error
        return cls(backend, tokenizer_config, eos_token_ids)

    def set_chat_template(self, template: str) -> None:
        """Render chats with `template` instead of the model's own (`cake serve --chat-template`); ModelError, with
        the line, if it does not compile."""
        self._template = chat_template.compile_template(template, "the chat template")
        self.chat_template = template

    def template_error(self) -> str | None:
        """Why the chat template does not compile, or None (it does, or there is none): asked when a model loads, so
        the server says so then, not only to every chat request."""
        if not self.chat_template:
            return None
        try:
            if self._template is None:
                self._template = chat_template.compile_template(self.chat_template, self._template_name)
        except ModelError as error:
            return str(error)
        return None

    def with_chat_template(self, template: str) -> Tokenizer:
        """This tokenizer rendering chats with `template` (a request's own, vLLM's `chat_template` field): a copy
        sharing everything else, kept for the next request sending the same template; RequestError, with the line,
        if it does not compile."""
        with self._lock:
            copy = self._variants.pop(template, None)
        if copy is None:
            try:
                compiled = chat_template.compile_template(template, "the request's chat_template")
            except ModelError as error:
                raise RequestError(str(error)) from error
            copy = _copy.copy(self)
            copy._template, copy.chat_template, copy._variants = compiled, template, {}
            copy._template_name = "the request's chat_template"
        copy.max_tokens = self.max_tokens  # the context now: a load or a failover may have changed it since the copy
        with self._lock:
            self._variants[template] = copy  # the most recently used last
            while len(self._variants) > _KEPT_TEMPLATES:
                del self._variants[next(iter(self._variants))]
        return copy

    @property
    def reads_tools(self) -> bool:
        """Whether the chat template renders a `tools` variable (tool definitions in the prompt)."""
        if self.chat_template is None:
            return False
        return chat_template.reads_variable(self.chat_template, "tools")

    @property
    def tool_call_id_length(self) -> int | None:
        """The length the chat template requires of tool call ids (Mistral's raise unless it is 9), if any."""
        match = _ID_LENGTH_CHECK.search(self.chat_template or "")
        return int(match.group(1)) if match else None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode_literal(self, text: str) -> list[int]:
        """`text` as plain text, special tokens' names in it included (no special tokens added either)."""
        if not text:
            return []
        if self._literal is None:  # a copy: the flag is the backend's, and encode runs on several threads
            self._literal = HFTokenizer.from_str(self.backend.to_str())
            self._literal.encode_special_tokens = True
        # encode_batch lets go of the GIL while it works, as in `encode`.
        return list(self._literal.encode_batch([text], add_special_tokens=False)[0].ids)

    def added_id(self, name: str) -> int | None:
        """The id of `name` when it is an added token of the vocabulary (a special token), else None."""
        token = self.backend.token_to_id(name) if name in self._added else None
        return None if token is None else int(token)

    def encode(self, text: str, *, add_special_tokens: bool = True, check: bool = True) -> list[int]:
        """`text`'s token ids; `check`: refuse first a text no context could hold (`check_length`). A caller that cuts
        the ids to the context itself (truncate_prompt_tokens) passes False: the request body's limit bounds it."""
        if check:
            self.check_length(text)
        # encode_batch lets go of the GIL while it works (encode holds it): a long text does not stop the server.
        return list(self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def check_length(self, text: str) -> None:
        """ContextLengthError for a text more characters long than `max_tokens` tokens can ever be
        (`most_characters`)."""
        if self.max_tokens is None:
            return
        limit = self.most_characters(self.max_tokens)
        # A normalizer may drop whitespace (BERT's): a run of it may be no token at all, so it counts as one character.
        if len(text) > limit and (folded := len(_WHITESPACE_RUN.sub(" ", text))) > limit:
            raise ContextLengthError(
                f"the text has {folded} characters (a run of whitespace counted as one), more than the context of "
                f"{self.max_tokens} tokens can hold (at most {limit} characters with this vocabulary)"
            )

    def most_characters(self, n_tokens: int) -> int:
        """The most characters `n_tokens` tokens can stand for: twice the longest token's each (twice: a normalizer
        may drop characters before they are matched)."""
        if self._longest_token is None:
            self._longest_token = max(
                (len(token) for token in self.backend.get_vocab(with_added_tokens=True)), default=1
            )
        return n_tokens * 2 * self._longest_token

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for logprobs)."""
        return self.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (OpenAI's logprob `bytes`): a token holding part of a UTF-8 character gives
        that part, where its text alone is only U+FFFD."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if piece in self._added:  # special tokens: their text
            return piece.encode("utf-8")
        byte_fallback = _BYTE_FALLBACK.fullmatch(piece)  # SentencePiece's <0xNN> tokens
        if byte_fallback:
            return bytes([int(byte_fallback.group(1), 16)])
        if self._byte_level is None:  # serializes the whole tokenizer: only for the first logprob asked for
            self._byte_level = _uses_byte_level(self.backend)
        if self._byte_level and all(char in _UNICODE_TO_BYTE for char in piece):  # GPT-2 style byte-level BPE
            return bytes(_UNICODE_TO_BYTE[char] for char in piece)
        return self.token_text(token_id).encode("utf-8")

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The model's chat template applied to `messages`, as transformers' apply_chat_template renders it.

        `continue_final_message` leaves the last message open, cut right after its content, for the model to go
        on writing it; `template_kwargs` are extra variables for the template (e.g. enable_thinking).
        """
        messages = [dict(message) for message in messages]  # the caller's messages stay untouched
        final = ""
        if continue_final_message:
            if not messages:
                raise RequestError("continue_final_message needs at least one message")
            # transformers' rule: mark the end of the final content, render, then cut at the mark.
            final = str(messages[-1].get("content") or "")
            messages[-1]["content"] = final + _CONTINUE_TAG
        if self.chat_template is None:
            rendered = _fallback_chat(messages, add_generation_prompt)
        else:
            rendered = self._render_template(messages, add_generation_prompt, template_kwargs or {})
        if not continue_final_message:
            return rendered
        mark = _CONTINUE_TAG.strip()
        if final.strip() not in rendered or mark not in rendered:
            raise RequestError(
                f"continue_final_message: {self._template_name} does not write the final message's content as "
                "it is, so there is no place to continue it from"
            )
        cut = rendered.rindex(mark)
        if rendered[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return rendered[:cut]
        return rendered[:cut].rstrip()  # the template trimmed the content's trailing space: so does the prompt

    def _render_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, template_kwargs: Mapping[str, Any]
    ) -> str:
        if self._template is None:
            self._template = chat_template.compile_template(self.chat_template or "", self._template_name)
        # transformers passes tools and documents (None here) and lets extra variables override the special tokens.
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "tools": None,
            "documents": None,
            **template_kwargs,
        }
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
        return chat_template.render(self._template, variables, self._template_name)

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        return self.chat_prompt(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            template_kwargs=template_kwargs,
        )[1]

    def chat_prompt(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
        check: bool = True,
    ) -> tuple[str, list[int]]:
        """The rendered chat prompt and its token ids (encode_chat's, with the text it encoded); `check` as encode's."""
        # The template writes any BOS itself, so special tokens are not added again.
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            template_kwargs=template_kwargs,
        )
        return text, self.encode(text, add_special_tokens=False, check=check)


def _fallback_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    """ChatML, for models that ship no template."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _template_text(value: Any) -> str | None:
    if isinstance(value, list):  # a list of named templates: use "default"
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if not named:  # left out, the model rendered with the ChatML fallback instead, without a word
            raise ModelError(f"the model's chat_template list holds no named template: {value!r}"[:300])
        value = named.get("default") or next(iter(named.values()), None)
    if value is not None and not isinstance(value, str):
        raise ModelError(f"the model's chat_template must be a string, got {value!r}"[:300])
    return value


_WHITESPACE_RUN = re.compile(r"\s{2,}")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's table of the printable character that stands for each byte in a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {char: byte for byte, char in _byte_to_unicode().items()}


def _uses_byte_level(backend: HFTokenizer) -> bool:
    """Whether the tokenizer's decoder is (or contains) a ByteLevel decoder."""
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, TypeError):
        return False
    parts = decoder.get("decoders", [decoder]) if isinstance(decoder, dict) else []
    return any(isinstance(part, dict) and part.get("type") == "ByteLevel" for part in parts)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(value: Any, source: Path) -> set[int]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelError(f"{str(source)!r}: eos_token_id must be a token id or a list of them, got {value!r}")
    return set(values)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: not JSON or UTF-8, an integer past 4300 digits; RecursionError: nested past Python's stack
    except (OSError, ValueError, RecursionError) as error:
        raise ModelError(f"cannot read {str(path)!r}: {type(error).__name__}: {error}") from error
    if not isinstance(data, dict):  # dropped silently, it took the model's chat template and special tokens with it
        raise ModelError(f"{str(path)!r} must hold a JSON object, not a {type(data).__name__}")
    return data
