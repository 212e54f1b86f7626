"""Chat templates: compiled in jinja2's immutable sandbox as transformers compiles them, and rendered within limits.

A template is code from the model's files (or, with --trust-request-chat-template, from a request). The sandbox
keeps it from reaching Python's internals; these limits keep it from holding a thread or the memory: a render that
runs past `RENDER_TIMEOUT_S` is stopped, and `*` and `**` may not build strings, lists or integers past
`MAX_PRODUCT` items or bits (a loop has jinja's own bound of 100,000 items per range, but not nested ones).
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cake_py.errors import ModelError, RequestError

RENDER_TIMEOUT_S = 5.0  # a long chat renders in milliseconds
MAX_PRODUCT = 1 << 20  # items of a repeated string or list, bits of an integer power or product


class _TemplateTimeout(BaseException):
    """Raised in the rendering thread at the deadline; a BaseException, so no `except Exception` swallows it."""


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

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
        return super().call_binop(context, operator, left, right)


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
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ModelError(f"{what} does not compile: line {error.lineno}: {error.message}") from error
    except jinja2.TemplateError as error:
        raise ModelError(f"{what} does not compile: {error}") from error


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
        return template.render(**variables)
    finally:
        with lock:
            state["rendering"] = False
        timer.cancel()
        if state["fired"]:  # set just as the render ended and not raised yet: it must not reach the caller's code
            ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, None)
