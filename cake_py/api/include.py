"""OpenAI's `include` (its ResponseIncludable values): the extra outputs a Responses request (a JSON list) and a
conversation's item routes (`include`, or `include[]` as the openai SDK sends it, in the query) ask for. One check
for all of them: a value OpenAI does not define is a 400 naming it. This server makes one of those outputs,
`message.output_text.logprobs`; the others name what it never makes (reasoning's encrypted content, built-in tools'
results, input images' URLs) and are accepted, changing nothing. The Responses routes (POST /v1/responses and
GET /v1/responses/{id}) take any value instead, as Codex sends ones newer than this list; `without_logprobs` is a
response or item as it reads without the logprobs value (and as the store keeps it)."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import QueryParams

from cake_py.api.errors import ApiError

LOGPROBS_INCLUDE = "message.output_text.logprobs"
INCLUDABLE = (  # OpenAI's ResponseIncludable, in its order
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    LOGPROBS_INCLUDE,
)


def include_values(value: Any) -> list[str]:
    """A request's `include` (absent or null: none); a 400 naming what is not a list of OpenAI's values."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ApiError(400, f"include must be a list of strings, got {value!r}"[:300])
    for item in value:
        if item not in INCLUDABLE:
            raise ApiError(400, f"include: {item[:100]!r} is not one of {', '.join(INCLUDABLE)}")
    return value


def query_values(query: QueryParams) -> list[str]:
    """`include` given in a query, repeated as `include=…` or `include[]=…` (the openai SDK's form), unchecked."""
    return [*query.getlist("include"), *query.getlist("include[]")]


def query_include(query: QueryParams) -> list[str]:
    """`query_values`, each one checked (`include_values`)."""
    return include_values(query_values(query))


def without_logprobs(value: Any) -> Any:
    """`value` with every `logprobs` list emptied: what the store keeps (20 alternatives a token would take most of
    it for little use), and what a response reads without `message.output_text.logprobs`."""
    if isinstance(value, dict):
        return {key: [] if key == "logprobs" else without_logprobs(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_logprobs(item) for item in value]
    return value
