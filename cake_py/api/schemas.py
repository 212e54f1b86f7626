"""Request parsing and validation shared by the routes: each bad field is named in the error."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from cake_py.api.errors import ApiError
from cake_py.errors import RequestError
from cake_py.models.sampling import SamplingParams

MAX_CHOICES = 8


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def number(body: dict[str, Any], key: str, default: float, *, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {kind}, got {value!r}")
    return value


def flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, got {value!r}")
    return value


def stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ApiError(400, f"stop must be a string or a list of strings, got {value!r}")


def openai_sampling(body: dict[str, Any], *, default_max_tokens: int = 2048) -> SamplingParams:
    """Sampling fields of the OpenAI chat and completion routes."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    logprobs_value = body.get("logprobs")
    top_logprobs = number(body, "top_logprobs", 0, integer=True)
    if isinstance(logprobs_value, int) and not isinstance(logprobs_value, bool):  # legacy completions: an int
        if logprobs_value < 0:
            raise ApiError(400, f"logprobs must be true/false or a count of at least 0, got {logprobs_value}")
        logprobs, top_logprobs = True, max(top_logprobs, logprobs_value)
    else:
        logprobs = flag(body, "logprobs", False)
    seed = number(body, "seed", 0, integer=True) if body.get("seed") is not None else None
    try:
        return SamplingParams(
            max_tokens=number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, integer=True),
            temperature=float(number(body, "temperature", 1.0)),
            top_p=float(number(body, "top_p", 1.0)),
            top_k=int(number(body, "top_k", 0, integer=True)),
            repetition_penalty=float(number(body, "repetition_penalty", 1.0)),
            seed=seed,
            stop=stop_strings(body.get("stop")),
            logprobs=logprobs,
            top_logprobs=int(top_logprobs),
        )
    except RequestError as error:
        raise ApiError(400, str(error)) from error


def choice_count(body: dict[str, Any]) -> int:
    n = number(body, "n", 1, integer=True)
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n must be between 1 and {MAX_CHOICES}, got {n}")
    return int(n)


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI messages → [{role, content: str}]; content parts of type text are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{index}] must be an object, got {message!r}")
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise ApiError(400, f"messages[{index}].role {role!r} is not one of system, user, assistant, tool")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else part
                    raise ApiError(400, f"messages[{index}] has a {kind!r} part; this model only reads text")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{index}].content must be a string, got {content!r}")
        result.append({"role": "system" if role == "developer" else role, "content": content})
    return result
