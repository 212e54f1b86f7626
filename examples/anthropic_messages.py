"""Talk to a cake_py master through Anthropic's Python SDK (its Messages API): one blocking answer, then a streamed
one, and the prompt's token count.

    python examples/anthropic_messages.py ["your question"]

Environment: CAKE_BASE_URL (default http://127.0.0.1:8080), CAKE_API_KEY (when the server runs with --api-key; the
SDK sends it as x-api-key), CAKE_MAX_TOKENS (default 64). Needs `pip install anthropic`.
"""

from __future__ import annotations

import os
import sys

import anthropic


def main(argv: list[str]) -> int:
    base_url = os.environ.get("CAKE_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    question = argv[1] if len(argv) > 1 else "What is the capital of France?"
    max_tokens = int(os.environ.get("CAKE_MAX_TOKENS", "64"))
    # The SDK insists on a key; any string does when the server has no --api-key.
    client = anthropic.Anthropic(base_url=base_url, api_key=os.environ.get("CAKE_API_KEY") or "unused", max_retries=0)
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": question}]
    system = "You are a helpful assistant. Answer in one sentence."

    message = client.messages.create(model="any", system=system, messages=messages, max_tokens=max_tokens)
    text = "".join(block.text for block in message.content if block.type == "text")
    print(f"blocking: {text}")
    print(f"stop_reason: {message.stop_reason}, output_tokens: {message.usage.output_tokens}")

    print("streaming: ", end="", flush=True)
    with client.messages.stream(model="any", system=system, messages=messages, max_tokens=max_tokens) as stream:
        for piece in stream.text_stream:
            print(piece, end="", flush=True)
        final = stream.get_final_message()
    print()
    print(f"stop_reason: {final.stop_reason}, output_tokens: {final.usage.output_tokens}")
    counted = client.messages.count_tokens(model="any", system=system, messages=messages)
    print(f"input_tokens: {counted.input_tokens}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except anthropic.APIConnectionError as error:
        sys.exit(f"cannot reach the cake server: {error}\nStart one (`cake serve`) or point CAKE_BASE_URL at it.")
