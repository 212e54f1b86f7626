"""Chat with a cake_py master through the official OpenAI Python client: one blocking answer, then a streamed one.

    python examples/openai_chat.py ["your question"]

Environment: CAKE_BASE_URL (default http://127.0.0.1:8080), CAKE_API_KEY (when the server runs with --api-key),
CAKE_MAX_TOKENS (default 64). Needs `pip install openai`.
"""

from __future__ import annotations

import os
import sys

from openai import APIConnectionError, OpenAI


def main(argv: list[str]) -> int:
    base_url = os.environ.get("CAKE_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    question = argv[1] if len(argv) > 1 else "What is the capital of France?"
    max_tokens = int(os.environ.get("CAKE_MAX_TOKENS", "64"))
    # The OpenAI client insists on a key; any string does when the server has no --api-key.
    client = OpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("CAKE_API_KEY") or "unused", max_retries=0)

    model = client.models.list().data[0].id  # the served model (the server answers with it whatever you name)
    print(f"model: {model}")
    messages = [
        {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
        {"role": "user", "content": question},
    ]

    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.7)
    choice = reply.choices[0]
    print(f"blocking: {choice.message.content}")
    if reply.usage is not None:
        print(
            f"finish_reason: {choice.finish_reason}, prompt_tokens: {reply.usage.prompt_tokens}, "
            f"completion_tokens: {reply.usage.completion_tokens}"
        )

    print("streaming: ", end="", flush=True)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True)
    finish_reason, completion_tokens = None, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.content
        if delta:
            print(delta, end="", flush=True)
        finish_reason = chunk.choices[0].finish_reason or finish_reason
        if chunk.usage is not None:  # the last chunk carries the usage of the whole answer
            completion_tokens = chunk.usage.completion_tokens
    print()
    print(f"finish_reason: {finish_reason}, completion_tokens: {completion_tokens}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except APIConnectionError as error:
        sys.exit(f"cannot reach the cake server: {error}\nStart one (`cake serve`) or point CAKE_BASE_URL at it.")
