"""Structured output: a grammar every generated token must keep valid (a JSON schema, a regex, a list of choices or
a Lark grammar), compiled and matched by llguidance.

At each step a `GrammarMatcher` says which tokens may come next and the sampler draws only from those; the drawn
token then advances it. Once the grammar is complete (nothing more may follow), the sequence ends as if it had drawn
an end token. Grammars are text (llguidance's JSON form), so sampling parameters stay plain, hashable values; the
first compile of each grammar is kept, and every sequence that uses it gets a copy of that matcher.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import torch

from cake_py.errors import RequestError
from cake_py.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

MAX_CHOICES = 256
MAX_GRAMMAR_CHARS = 100_000  # a schema, regex or grammar longer than this is refused before compiling
_COMPILED_KEPT = 64  # compiled grammars kept per tokenizer, most recently used first
# JSON may hold whitespace between tokens, up to this much at each place: unbounded whitespace lets a small model
# fill max_tokens with newlines, a known failure of JSON modes.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,16}"}


def json_grammar(schema: Mapping[str, Any] | bool | None) -> str:
    """The grammar of JSON text matching `schema`; None: any JSON object (OpenAI's `json_object` mode).
    RequestError when the schema is not a JSON object (or true), or cannot be serialized."""
    if schema is None:
        schema = {"type": "object"}
    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise RequestError(f"a JSON schema must be an object, got {_shown(schema)}")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as error:
        raise RequestError(f"the JSON schema cannot be read: {error}") from None
    _check_size("JSON schema", text)
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(text, overrides=_JSON_OPTIONS))
    except ValueError as error:
        raise RequestError(f"the JSON schema is invalid: {error}") from None


def regex_grammar(pattern: str) -> str:
    """The grammar of text matching `pattern` whole."""
    if not isinstance(pattern, str) or not pattern:
        raise RequestError(f"a regex must be a non-empty string, got {_shown(pattern)}")
    _check_size("regex", pattern)
    return str(llguidance.LLMatcher.grammar_from_regex(pattern))


def choice_grammar(choices: Sequence[str]) -> str:
    """The grammar of exactly one of `choices`."""
    if (
        isinstance(choices, str)
        or not isinstance(choices, Sequence)
        or not choices
        or not all(isinstance(choice, str) and choice for choice in choices)
    ):
        raise RequestError(f"choices must be a non-empty list of non-empty strings, got {_shown(choices)}")
    if len(choices) > MAX_CHOICES:
        raise RequestError(f"at most {MAX_CHOICES} choices are allowed, got {len(choices)}")
    # Lark string literals with JSON escapes: any text is taken literally.
    lark = "start: " + " | ".join(json.dumps(choice) for choice in dict.fromkeys(choices))
    _check_size("choice list", lark)
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


def lark_grammar(text: str) -> str:
    """A grammar in llguidance's Lark syntax (`start: …` rules, regexes as /…/, `%json {schema}`)."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"a grammar must be a non-empty string, got {_shown(text)}")
    _check_size("grammar", text)
    return str(llguidance.LLMatcher.grammar_from_lark(text))


class GrammarMatcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's; logits may be wider (padded embeddings), never allowed

    def allowed(self, width: int) -> torch.Tensor:
        """(width,) bool: the tokens that keep the output valid."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8) != 0
        if width > self.vocab_size:
            return torch.cat([allowed, torch.zeros(width - self.vocab_size, dtype=torch.bool)])
        return allowed[:width]

    def consume(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"the grammar does not allow token {token_id}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Nothing more may follow: the output is complete."""
        return bool(self.matcher.is_stopped())


class GrammarCompiler:
    """Compiles grammars for one tokenizer. Thread-safe: the API checks grammars on worker threads, the engine
    makes matchers when it takes a sequence."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._llg_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def _grammar_tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (a quarter of a second for a 49k vocabulary), under the lock: once per tokenizer.
        if self._llg_tokenizer is None:
            end_ids = sorted(self.tokenizer.eos_token_ids)
            if not end_ids:
                raise RequestError("structured output needs the model's end token, and this model names none")
            try:
                self._llg_tokenizer = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), eos_token=end_ids)
            except Exception as error:  # llguidance raises plain exceptions for tokenizers it cannot read
                raise RequestError(f"structured output cannot use this model's tokenizer: {error}") from None
        return self._llg_tokenizer

    def matcher(self, grammar: str) -> GrammarMatcher:
        """A fresh matcher at the start of `grammar`; RequestError naming the problem when it does not compile."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                tokenizer = self._grammar_tokenizer()
                compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
                if compiled.is_error():
                    raise RequestError(f"the structured output grammar is invalid: {compiled.get_error()}")
                self._compiled[grammar] = compiled
                while len(self._compiled) > _COMPILED_KEPT:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(grammar)
            vocab_size = int(self._grammar_tokenizer().vocab_size)
            return GrammarMatcher(compiled.deep_copy(), vocab_size)

    def check(self, grammar: str) -> None:
        """RequestError when `grammar` does not compile (and it is kept compiled for the sequences that use it)."""
        self.matcher(grammar)


_compilers: weakref.WeakKeyDictionary[Tokenizer, GrammarCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer) -> GrammarCompiler:
    """The one GrammarCompiler of `tokenizer` (made on first use)."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = GrammarCompiler(tokenizer)
        return compiler


def _check_size(what: str, text: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise RequestError(f"the {what} is {len(text)} characters long; at most {MAX_GRAMMAR_CHARS} are allowed")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
