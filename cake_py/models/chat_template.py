"""Chat templates: compiled in jinja2's immutable sandbox as transformers compiles them, and rendered within limits.

A template is code from the model's files (or, with --trust-request-chat-template, from a request). The sandbox
keeps it from reaching Python's internals; these limits keep it from holding a thread or the memory: a render that
runs past `RENDER_TIMEOUT_S` is stopped, and the operations that build large values from small ones (`*`, `**`,
`%`, `+`, `~`, widths and indents, join, replace, format) are checked before they run: at most `MAX_PRODUCT` items,
bits or characters of width, `MAX_TEXT` characters in one result (a list counting its strings' characters) and in
the whole output. These guard against accidents and runaway
templates; a template stays code its author controls (the model's, or a client trusted with
--trust-request-chat-template).
"""

from __future__ import annotations

import ctypes
import json
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

from cake_py.errors import ModelError, RequestError

RENDER_TIMEOUT_S = 5.0  # a long chat renders in milliseconds
MAX_PRODUCT = 1 << 20  # items of a repeated string or list, bits of an integer power or product, widths
MAX_TEXT = 1 << 25  # characters (or items) one operation may build: a prompt of millions of tokens fits
_BIG_NUMBER = re.compile(r"[0-9]{7,}")
# A template's output comes in pieces of a few characters, each a string object of ~60 bytes: kept apart until the
# end, the MAX_TEXT characters a loop can write in RENDER_TIMEOUT_S held 750 MB per request. Joined as they come,
# the output costs about a byte per character.
JOINED_PIECES = 4096


class _TemplateTimeout(BaseException):
    """Raised in the rendering thread at the deadline; a BaseException, so no `except Exception` swallows it."""


class _CodeGenerator(CodeGenerator):
    """Joins `a ~ b` through the environment's size check (jinja2 joins them with str.join directly)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with every operation that can build a large value checked before it runs: jinja2 folds
    constant expressions while compiling, outside any deadline, so filters are wrapped to take the context (which
    jinja2 never folds) and `%` and `+` are intercepted like `*` and `**`."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            if abs(left) > 1 and max(abs(left).bit_length(), 1) * right > MAX_PRODUCT:
                raise jinja2.TemplateError(f"{left} ** {right} is too large")
        if operator == "*":
            for items, times in ((left, right), (right, left)):
                if isinstance(items, str | list | tuple) and _is_int(times) and len(items) * times > MAX_PRODUCT:
                    raise jinja2.TemplateError(f"repeating {len(items)} items {times} times makes too many")
            if _is_int(left) and _is_int(right) and abs(left).bit_length() + abs(right).bit_length() > MAX_PRODUCT:
                raise jinja2.TemplateError("the product of these integers is too large")
        if operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            _check_size(_weight(left) + _weight(right), "+")
        if operator == "%" and isinstance(left, str):
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format to format safely
        owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        _check_arguments(name or "a call", args, kwargs)
        if isinstance(owner, str):  # the string methods that can build a large string from a small one
            if name in ("format", "format_map"):
                _check_format(owner)
            elif name == "join" and args:
                _check_size(_joined_size(args[0], owner), "join")
            elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                _check_size(_replaced_size(owner, args[0], args[1]), "replace")
        return super().call(__context, __obj, *args, **kwargs)

    def checked_concat(self, parts: tuple[Any, ...]) -> str:
        texts = [str(part) for part in parts]
        _check_size(sum(map(len, texts)), "~")
        return "".join(texts)


def _guarded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` behind the checks its arguments need, taking the context (so never folded at compile time)."""
    passes = _PassArg.from_obj(function)

    @jinja2.pass_context
    def guarded(context: jinja2.runtime.Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_arguments(f"the {name} filter", args, kwargs)
        if name == "sum" and not isinstance(kwargs.get("start", args[1] if len(args) > 1 else 0), int | float):
            raise jinja2.TemplateError("the sum filter adds numbers: its start must be a number")
        if name == "join" and isinstance(value, list | tuple):
            _check_size(_joined_size(value, args[0] if args and isinstance(args[0], str) else ""), "join")
        if name == "replace" and isinstance(value, str) and len(args) >= 2:
            _check_size(_replaced_size(value, str(args[0]), str(args[1])), "replace")
        if name == "format" and isinstance(value, str):
            _check_format(value)
        if passes is _PassArg.context:
            return function(context, value, *args, **kwargs)
        if passes is _PassArg.eval_context:
            return function(context.eval_ctx, value, *args, **kwargs)
        if passes is _PassArg.environment:
            return function(context.environment, value, *args, **kwargs)
        return function(value, *args, **kwargs)

    return guarded


def _check_arguments(what: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Widths, counts and indents (center, ljust, zfill, indent, wordwrap, tojson's indent …) past MAX_PRODUCT."""
    for value in (*args, *kwargs.values()):
        if _is_int(value) and abs(value) > MAX_PRODUCT:
            raise jinja2.TemplateError(f"{what}: {value} is too large")


def _check_format(text: str) -> None:
    if _BIG_NUMBER.search(text):  # a width or precision of millions of characters, as in "%0400000000d"
        raise jinja2.TemplateError("a format with a width or precision past 999999 characters")


def _check_size(size: int, what: str) -> None:
    if size > MAX_TEXT:
        raise jinja2.TemplateError(f"{what} would make {size} characters or items, past {MAX_TEXT}")


def _weight(value: str | list[Any] | tuple[Any, ...]) -> int:
    """A string's characters; a list's items, each counting its characters if a string: a list grown item by item
    (`ns.items = ns.items + [big ~ i]`) holds the characters of all of them."""
    if isinstance(value, str):
        return len(value)
    return sum(len(item) if isinstance(item, str) else 1 for item in value)


def _joined_size(items: Any, separator: str) -> int:
    if not isinstance(items, list | tuple):
        return 0  # an iterator: its items are joined as they come (each bounded)
    return sum(len(item) if isinstance(item, str) else 16 for item in items) + len(separator) * len(items)


def _replaced_size(text: str, old: str, new: str) -> int:
    count = text.count(old) if old else len(text) + 1
    return len(text) + count * (len(new) - len(old))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def compile_template(source: str, what: str) -> jinja2.Template:
    """`source` compiled with the helpers transformers gives chat templates; ModelError naming `what` and the line
    if it does not compile."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)

    def strftime_now(format_: str) -> str:
        return datetime.now().strftime(format_)

    environment = _Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.filters = {name: _guarded_filter(name, function) for name, function in environment.filters.items()}
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ModelError(f"{what} does not compile: line {error.lineno}: {error.message}") from error
    except jinja2.TemplateError as error:
        raise ModelError(f"{what} does not compile: {error}") from error
    except (ArithmeticError, RecursionError, MemoryError) as error:  # what is left of compile-time folding
        raise ModelError(f"{what} does not compile: {type(error).__name__}: {error}") from error


def reads_variable(source: str, name: str) -> bool:
    """Whether the template reads variable `name` (not the word in a comment or a string)."""
    if name not in source:
        return False
    try:
        environment = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
        return name in meta.find_undeclared_variables(environment.parse(source))
    except jinja2.TemplateSyntaxError:
        return False


def render(template: jinja2.Template, variables: Mapping[str, Any], what: str) -> str:
    """The template rendered with `variables`; RequestError naming `what` if it refuses them, fails in any way, or
    takes longer than RENDER_TIMEOUT_S."""
    try:
        return _render_within(template, variables, RENDER_TIMEOUT_S)
    except _TemplateTimeout:
        raise RequestError(f"{what} took longer than {RENDER_TIMEOUT_S:g} s to render, and was stopped") from None
    except jinja2.TemplateError as error:
        raise RequestError(f"{what} rejected the messages: {error}") from error
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as error:
        # Values a request controls (message fields, chat_template_kwargs) of a type the template cannot use.
        raise RequestError(f"{what} cannot render these messages: {error}") from error
    except (ArithmeticError, RecursionError, MemoryError) as error:  # 1/0, a macro calling itself for ever, …
        raise RequestError(f"{what} failed: {type(error).__name__}: {error}") from error


def _render_within(template: jinja2.Template, variables: Mapping[str, Any], seconds: float) -> str:
    """Render on this thread; past `seconds`, a timer raises _TemplateTimeout in it (Python checks for such an
    exception between bytecodes, so a loop in the template's code stops; one long C call finishes first)."""
    thread_id = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"rendering": True, "fired": False}

    def expire() -> None:
        with lock:
            if state["rendering"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, ctypes.py_object(_TemplateTimeout))

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        chunks: list[str] = []  # the output so far, joined every JOINED_PIECES pieces
        pieces: list[str] = []
        total = 0
        for piece in template.generate(**variables):  # the output too is bounded, not only each operation
            total += len(piece)
            if total > MAX_TEXT:
                raise jinja2.TemplateError(f"the rendered prompt passed {MAX_TEXT} characters")
            pieces.append(piece)
            if len(pieces) == JOINED_PIECES:
                chunks.append("".join(pieces))
                pieces.clear()
        return "".join(chunks + pieces)
    finally:
        with lock:
            state["rendering"] = False
        timer.cancel()
        if state["fired"]:  # set just as the render ended and not raised yet: it must not reach the caller's code
            ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, None)
