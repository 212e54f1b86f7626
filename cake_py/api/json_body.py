"""Request bodies read as JSON: strictly (RFC 8259's numbers, no NaN or Infinity; the text decoded in the
encoding JSON detects, never with surrogates passed through) and checked for lone UTF-16 surrogates, which are no
text and would fail the tokenizer as a 500. Each failure is a 400 saying what is wrong. A large body is read in a
thread: megabytes of JSON are a tenth of a second or more of parsing, which on the event loop stalls every stream."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from starlette.requests import Request

from cake_py.api.errors import ApiError

LARGE_BODY_BYTES = 64 * 1024  # about a millisecond of parsing: above it, the thread's handoff costs less
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff, escaped in JSON text


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is past the range of a number")
    return value


def strict_loads(text: str | bytes) -> Any:
    """JSON as RFC 8259 has it: Python's reader also takes NaN and Infinity (and reads 1e999 as infinity), which a
    request could then have echoed back or stored, where no JSON writer can put them. ValueError, as json.loads."""
    return json.loads(text, parse_constant=_not_a_number, parse_float=_finite)


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > LARGE_BODY_BYTES:
        return await asyncio.to_thread(parse_body, raw)
    return parse_body(raw)


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or the 400 saying why it is none."""
    try:
        # Decoded here, strictly: json.loads decodes bytes with "surrogatepass", so a UTF-8 body holding an encoded
        # surrogate (ED A0 80) read as a lone one. The encoding is JSON's own guess (UTF-8, UTF-16 or UTF-32).
        text = raw.decode(json.detect_encoding(raw))
        body = strict_loads(text) if raw else None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, over-long integers, deep nesting
        raise ApiError(400, f"request body is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    no_lone_surrogates(text, body, "request body")
    return body


def no_lone_surrogates(raw: str, value: Any, where: str) -> None:
    """400 when the JSON text `raw`, read as `value`, escapes half a UTF-16 surrogate pair (a pair makes one
    character; a lone half is no text at all, and the tokenizer fails on it as a 500)."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        bad = error.object[error.start : error.end].encode("unicode_escape").decode()
        raise ApiError(400, f"{where} holds a lone UTF-16 surrogate ({bad}), which is not text") from None
