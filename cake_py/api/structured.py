"""Structured output on the OpenAI routes: OpenAI's `response_format` and vLLM's `structured_outputs` (and its
older `guided_*` fields) → one grammar for the sampler (models/grammar.py).

- `response_format`: `{"type": "text"}` (nothing), `{"type": "json_object"}` (any JSON object),
  `{"type": "json_schema", "json_schema": {"name": …, "schema": {…}, "strict": …}}`.
- `structured_outputs`: exactly one of `json` (a schema, as an object or its JSON text), `json_object: true`,
  `regex`, `choice` (a list of strings), `grammar` (llguidance's Lark syntax, or GBNF).
  Beside it, `whitespace_pattern` or `disable_any_whitespace` set how JSON may be spaced.
- `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`: the same, as vLLM named them before 0.12, and
  `guided_whitespace_pattern` beside `guided_json` or a JSON `response_format` (vLLM spaces both with it).
- llama.cpp's forms: `response_format: {"type": "json_object", "schema": {…}}`, top-level `json_schema` and
  `grammar` (GBNF, which llguidance converts; Lark too; an empty one is none, as llama.cpp reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from cake_py.api.errors import ApiError
from cake_py.api.json_body import strict_loads
from cake_py.errors import RequestError
from cake_py.models.grammar import (
    CompiledGrammar,
    choice_grammar,
    compiler_for,
    json_grammar,
    lark_grammar,
    regex_grammar,
)
from cake_py.models.tokenizer import Tokenizer

_STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# vLLM's options beside the kind: how JSON may be spaced; its backend fallback means nothing here.
_STRUCTURED_OPTIONS = (
    "whitespace_pattern",
    "disable_any_whitespace",
    "disable_fallback",
    "disable_additional_properties",
)
_GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "json_schema": "json",  # llama.cpp's top-level fields
    "grammar": "grammar",
}
_DEFAULT_WHITESPACE = object()


def _schema(value: Any, where: str) -> Any:
    """A JSON schema given as an object (or true) or as its JSON text."""
    if isinstance(value, str):
        try:
            value = strict_loads(value)
        except (ValueError, RecursionError) as error:
            raise ApiError(400, f"{where} is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(value, dict) and value is not True:
        raise ApiError(400, f"{where} must be a JSON schema object, got {value!r}"[:300])
    return value


def _from_response_format(value: Any, whitespace: Any = _DEFAULT_WHITESPACE) -> Callable[[], str] | None:
    """`whitespace`: vLLM's guided_whitespace_pattern, which spaces response_format's JSON as it does guided_json's."""
    kind = value.get("type") if isinstance(value, dict) else None
    spacing: dict[str, Any] = {} if whitespace is _DEFAULT_WHITESPACE else {"whitespace": whitespace}
    if kind == "text":
        return None
    if kind == "json_object":
        if value.get("schema") is not None:  # llama.cpp's form: a JSON object of this schema
            schema = _schema(value["schema"], "response_format.schema")
            return lambda: json_grammar(schema, **spacing)
        return lambda: json_grammar(None, **spacing)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, "response_format json_schema needs a json_schema object, with its 'schema'")
        if spec.get("schema") is None:  # OpenAI's schema is optional: then any JSON object
            return lambda: json_grammar(None, **spacing)
        schema = _schema(spec["schema"], "response_format.json_schema.schema")
        return lambda: json_grammar(schema, **spacing)
    shown = repr(kind if isinstance(value, dict) else value)[:200]
    raise ApiError(400, f"response_format type {shown} is not supported; use text, json_object or json_schema")


def _from_structured(kind: str, value: Any, where: str, whitespace: Any = _DEFAULT_WHITESPACE) -> Callable[[], str]:
    spacing: dict[str, Any] = {} if whitespace is _DEFAULT_WHITESPACE else {"whitespace": whitespace}
    if kind == "json":
        schema = _schema(value, where)
        return lambda: json_grammar(schema, **spacing)
    if kind == "json_object":
        if value is not True:
            raise ApiError(400, f"{where} must be true, got {value!r}"[:300])
        return lambda: json_grammar(None, **spacing)
    if kind == "regex":
        return lambda: regex_grammar(value)
    if kind == "choice":
        return lambda: choice_grammar(value)
    return lambda: lark_grammar(value)


def _whitespace(structured: dict[str, Any]) -> Any:
    """vLLM's spacing options: `whitespace_pattern` (a regex), `disable_any_whitespace` (none at all)."""
    if structured.get("disable_additional_properties") is True:
        raise ApiError(400, "structured_outputs.disable_additional_properties is not supported; set it in the schema")
    pattern = structured.get("whitespace_pattern")
    if structured.get("disable_any_whitespace") is True:
        return None
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ApiError(400, f"structured_outputs.whitespace_pattern must be a regex string, got {pattern!r}"[:300])
        return pattern
    return _DEFAULT_WHITESPACE


def _requested(body: dict[str, Any]) -> list[tuple[str, Callable[[], str] | None]]:
    """(field, how to build its grammar) for every structured-output field the request sets."""
    found: list[tuple[str, Callable[[], str] | None]] = []
    # vLLM's spacing of the JSON that guided_json or response_format ask for (its GuidedDecodingParams take both from
    # the one field), as whitespace_pattern is beside structured_outputs' kinds
    guided_spacing = body.get("guided_whitespace_pattern")
    if guided_spacing is None:
        guided_spacing = _DEFAULT_WHITESPACE
    elif not isinstance(guided_spacing, str):
        raise ApiError(400, f"guided_whitespace_pattern must be a regex string, got {guided_spacing!r}"[:300])
    if body.get("response_format") is not None:
        found.append(("response_format", _from_response_format(body["response_format"], guided_spacing)))
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise ApiError(400, f"structured_outputs must be an object, got {structured!r}"[:300])
        unknown = sorted(set(structured) - set(_STRUCTURED_KINDS) - set(_STRUCTURED_OPTIONS))
        if unknown:
            kinds = ", ".join(_STRUCTURED_KINDS)
            raise ApiError(400, f"structured_outputs field {unknown[0]!r} is not supported; use one of {kinds}")
        whitespace = _whitespace(structured)
        for kind in _STRUCTURED_KINDS:
            if structured.get(kind) is not None:
                where = f"structured_outputs.{kind}"
                found.append((where, _from_structured(kind, structured[kind], where, whitespace)))
    for field, kind in _GUIDED_FIELDS.items():
        # llama.cpp reads an empty grammar as none (clients such as SillyTavern always send one), beside a schema too
        if body.get(field) is not None and not (field == "grammar" and body[field] == ""):
            spacing = guided_spacing if field == "guided_json" else _DEFAULT_WHITESPACE
            found.append((field, _from_structured(kind, body[field], field, spacing)))
    return found


async def structured_grammar(
    body: dict[str, Any], tokenizer: Tokenizer, shown_as: dict[str, str] | None = None
) -> CompiledGrammar | None:
    """The grammar the request's output must match, compiled once (off the event loop) so a bad schema, regex or
    grammar is a 400 naming the problem (a field by its `shown_as` name: the one the client sent); None when the
    output is free text."""
    requested = [(field, build) for field, build in _requested(body) if build is not None]
    if not requested:
        return None
    if len(requested) > 1:
        fields = ", ".join(field for field, _ in requested)
        raise ApiError(400, f"send one kind of structured output at a time, not {fields}")
    field, build = requested[0]
    return await compiled_grammar(build, tokenizer, (shown_as or {}).get(field, field))


async def compiled_grammar(build: Callable[[], str], tokenizer: Tokenizer, field: str) -> CompiledGrammar:
    """`build()`'s grammar, compiled on a worker thread; a 400 naming `field` when it does not compile."""

    def compile_() -> CompiledGrammar:
        return compiler_for(tokenizer).compile(build())

    try:
        return await run_in_threadpool(compile_)
    except RequestError as error:
        raise ApiError(400, f"{field}: {error}"[:1000]) from None
