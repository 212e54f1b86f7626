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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import llguidance
import torch

from cake_py.errors import RequestError
from cake_py.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

T = TypeVar("T")

MAX_CHOICES = 256
MAX_GRAMMAR_CHARS = 100_000  # a schema, regex or grammar longer than this is refused before compiling
_COMPILED_KEPT = 64  # compiled grammars kept per tokenizer, most recently used first
# ... and at most this much grammar text: a compiled 100 kB schema holds about 30 MB, so the cache stays well under a
# gigabyte however large the grammars sent.
_COMPILED_CHARS_KEPT = 1_000_000
# JSON may hold whitespace between tokens, up to this much at each place: unbounded whitespace lets a small model
# fill max_tokens with newlines, a known failure of JSON modes.
_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
# lenient: keywords llguidance does not implement (uniqueItems, which pydantic writes for sets; not; contains;
# if/then) are not enforced, rather than refusing the schema.


def json_grammar(schema: Mapping[str, Any] | bool | None, *, whitespace: str | None = _WHITESPACE) -> str:
    """The grammar of JSON text matching `schema`; None: any JSON object (OpenAI's `json_object` mode).
    `whitespace`: the regex of what may stand between JSON tokens (None: nothing). RequestError when the schema is
    not a JSON object (or true), or cannot be serialized."""
    if schema is None:
        schema = {"type": "object"}
    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise RequestError(f"a JSON schema must be an object, got {_shown(schema)}")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError, RecursionError) as error:
        raise RequestError(f"the JSON schema cannot be read: {error}") from None
    _check_size("JSON schema", text)
    try:
        options: JsonCompileOptions = {"lenient": True}
        if whitespace is None:
            options["whitespace_flexible"] = False
        else:
            options["whitespace_pattern"] = whitespace
        return str(llguidance.LLMatcher.grammar_from_json_schema(text, overrides=options))
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
    """A grammar in llguidance's Lark syntax (`start: …` rules, regexes as /…/, `%json {schema}`), or in llama.cpp's
    GBNF (`root ::= …`), which llguidance converts."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"a grammar must be a non-empty string, got {_shown(text)}")
    _check_size("grammar", text)
    try:
        return str(llguidance.grammar_from("grammar", text))
    except ValueError as error:
        raise RequestError(f"the grammar cannot be read: {str(error)[:500]}") from None


class GrammarMatcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, on_error: Callable[[], None]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's; logits may be wider (padded embeddings), never allowed
        self.on_error = on_error

    def allowed(self, width: int) -> torch.Tensor:
        """(width,) bool: the tokens that keep the output valid."""
        bias = self.matcher.compute_logit_bias()
        self._check()
        allowed = torch.frombuffer(bytearray(bias), dtype=torch.uint8) != 0
        if width > self.vocab_size:
            return torch.cat([allowed, torch.zeros(width - self.vocab_size, dtype=torch.bool)])
        return allowed[:width]

    def consume(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)
        self._check()

    def _check(self) -> None:
        """A parser limit reached mid-output (a grammar too large for its input) ends the request, named; the
        compiled grammar is dropped, since copies of it share the exhausted state."""
        if self.matcher.is_error():
            self.on_error()
            raise RequestError(f"the structured output grammar failed: {_reason(self.matcher.get_error())}")

    @property
    def finished(self) -> bool:
        """Nothing more may follow: the output is complete."""
        return bool(self.matcher.is_stopped()) and not self.matcher.is_error()


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A grammar compiled for one tokenizer (sampling parameters carry it); `start()` gives each sequence its own
    matcher, a copy, never a compile: sequences are made on the event loop."""

    text: str
    prototype: llguidance.LLMatcher
    vocab_size: int
    compiler: GrammarCompiler

    def start(self) -> GrammarMatcher:
        return GrammarMatcher(self.prototype.deep_copy(), self.vocab_size, lambda: self.compiler.forget(self.text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompiledGrammar) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


class GrammarCompiler:
    """Compiles grammars for one tokenizer, keeping the most recent. Thread-safe: compiles run on a big-stack thread
    of their own (llguidance recurses once per level of a grammar: a deep one overflows a normal thread's stack and
    kills the process) and hold no lock, so one slow compile delays nobody else."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # the cache and the llguidance tokenizer
        self._llg_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._chars = 0  # the kept grammars' text

    def _grammar_tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (a quarter of a second for a 49k vocabulary), under the lock: once per tokenizer.
        with self._lock:
            if self._llg_tokenizer is None:
                vocab = self.tokenizer.vocab_size
                end_ids = sorted(token for token in self.tokenizer.eos_token_ids if token < vocab)
                if not end_ids:
                    raise RequestError("structured output needs the model's end token, and this model names none")
                try:
                    self._llg_tokenizer = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), eos_token=end_ids)
                except Exception as error:  # llguidance raises plain exceptions for tokenizers it cannot read
                    raise RequestError(f"structured output cannot use this model's tokenizer: {error}") from None
            return self._llg_tokenizer

    def compile(self, grammar: str) -> CompiledGrammar:
        """`grammar` compiled (or taken from the cache); RequestError naming the problem when it does not compile.
        Blocks for as long as the compile takes: call it off the event loop."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled
        tokenizer = self._grammar_tokenizer()
        prototype = _on_big_stack(lambda: llguidance.LLMatcher(tokenizer, grammar, log_level=0))
        if prototype.is_error():
            raise RequestError(f"the structured output grammar is invalid: {_reason(prototype.get_error())}")
        probe = prototype.deep_copy()  # the first token's mask: a grammar no text can match fails here, not later
        probe.compute_logit_bias()
        if probe.is_error():
            raise RequestError(
                "the structured output grammar matches no text (a rule that only refers to itself never ends): "
                f"{_reason(probe.get_error())}"
            )
        compiled = CompiledGrammar(grammar, prototype, int(tokenizer.vocab_size), self)
        with self._lock:
            if grammar not in self._compiled:
                self._compiled[grammar] = compiled
                self._chars += len(grammar)
            while len(self._compiled) > 1 and (
                len(self._compiled) > _COMPILED_KEPT or self._chars > _COMPILED_CHARS_KEPT
            ):
                self._chars -= len(self._compiled.popitem(last=False)[0])
        return compiled

    def forget(self, grammar: str) -> None:
        with self._lock:
            if self._compiled.pop(grammar, None) is not None:
                self._chars -= len(grammar)


_STACK_BYTES = 256 << 20  # virtual: only the pages a deep grammar touches are ever committed
_stack_lock = threading.Lock()


def _on_big_stack(work: Callable[[], T]) -> T:
    """`work()` on a fresh thread with a 256 MiB stack (a 100 kB grammar nests at most a few thousand levels)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    with _stack_lock:  # stack_size is process-wide: set it only around this thread's creation
        previous = threading.stack_size(_STACK_BYTES)
        try:
            thread = threading.Thread(target=run, name="cake-grammar-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


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


def _reason(error: object) -> str:
    """llguidance's error on one line: its first line and, from a regex parser's report (the pattern, a caret line,
    then `error: …`), the line that says what is wrong, which the first line ("regex parse error:") leaves out."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return "unknown"
    first = lines[0] if len(lines[0]) <= 300 else lines[0][:297] + "..."  # it may quote the whole pattern
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    return f"{first} {detail.removeprefix('error:').strip()[:200]}" if detail else first


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
