"""Structured output and tool calling on a cake_py master through the official OpenAI Python client.

    python examples/openai_structured.py

1. A JSON answer parsed into a pydantic model (`response_format` with a JSON schema).
2. One of a few choices (vLLM's `structured_outputs`, through `extra_body`).
3. A tool call the model must make (`tool_choice="required"`), answered with the tool's result.

Environment: CAKE_BASE_URL (default http://127.0.0.1:8080), CAKE_API_KEY (when the server runs with --api-key),
CAKE_MAX_TOKENS (default 64). Needs `pip install openai pydantic`.
"""

from __future__ import annotations

import json
import os
import sys

from openai import APIConnectionError, LengthFinishReasonError, OpenAI
from pydantic import BaseModel


class Capital(BaseModel):
    country: str
    capital: str


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


def main() -> int:
    base_url = os.environ.get("CAKE_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    max_tokens = int(os.environ.get("CAKE_MAX_TOKENS", "64"))
    client = OpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("CAKE_API_KEY") or "unused", max_retries=0)
    model = client.models.list().data[0].id

    # 1. JSON valid against the pydantic model's schema; the client parses it.
    try:
        parsed = client.beta.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
            response_format=Capital,
            temperature=0,
            max_tokens=max_tokens,
        )
        print(f"json: {parsed.choices[0].message.parsed!r}")
    except LengthFinishReasonError:  # max_tokens came before the object closed
        print("json: cut at max_tokens")

    # 2. Exactly one of the choices.
    choice = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        max_tokens=max_tokens,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    print(f"choice: {choice.choices[0].message.content}")

    # 3. A tool call, then the tool's result sent back for the final answer.
    messages: list = [{"role": "user", "content": "What's the weather in Paris?"}]
    called = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER_TOOL], tool_choice="required", temperature=0, max_tokens=200
    )
    message = called.choices[0].message
    if not message.tool_calls:
        print(f"no tool call ({called.choices[0].finish_reason}): {message.content}")
        return 1
    call = message.tool_calls[0]
    print(
        f"tool call: {call.function.name}({call.function.arguments}), finish_reason: {called.choices[0].finish_reason}"
    )
    arguments = json.loads(call.function.arguments)
    result = {"city": arguments["city"], "temperature": 21, "unit": arguments["unit"], "sky": "sunny"}
    messages += [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    final = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=max_tokens
    )
    print(f"answer: {final.choices[0].message.content}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except APIConnectionError as error:
        sys.exit(f"cannot reach the cake server: {error}\nStart one (`cake serve`) or point CAKE_BASE_URL at it.")
