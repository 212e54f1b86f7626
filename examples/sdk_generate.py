"""The cake_py Python SDK (`cake_py.client`) against a running master: health, chat, streaming, topology, and the
typed errors it raises.

    python examples/sdk_generate.py ["your prompt"]

Environment: CAKE_BASE_URL (default http://127.0.0.1:8080), CAKE_API_KEY (when the server runs with --api-key),
CAKE_UI_AUTH=USER:PASS (when it runs with --ui-auth, which guards the topology), CAKE_MAX_TOKENS (default
64). The SDK needs only httpx: it imports no torch.
"""

from __future__ import annotations

import os
import sys

from cake_py.client import (
    AuthenticationError,
    CakeAPIError,
    CakeClient,
    CakeConnectionError,
    NotFoundError,
    TextChunk,
)


def main(argv: list[str]) -> int:
    base_url = os.environ.get("CAKE_BASE_URL", "http://127.0.0.1:8080")
    prompt = argv[1] if len(argv) > 1 else "What is the capital of France?"
    max_tokens = int(os.environ.get("CAKE_MAX_TOKENS", "64"))

    user, _, password = os.environ.get("CAKE_UI_AUTH", "").partition(":")
    ui_auth = (user, password) if user else None
    with CakeClient(base_url, api_key=os.environ.get("CAKE_API_KEY"), ui_auth=ui_auth, timeout=600.0) as client:
        health = client.health()
        print(f"health: {health['status']} (model {health.get('model')})")

        # Blocking: multipart POST /generate. Keyword arguments are the model's model_kwargs; None values are dropped.
        result = client.chat(prompt, max_output_tokens=max_tokens, temperature=0.7, seed=42, top_k=None)
        print(f"chat: {result.text}")
        print(f"finish_reason: {result.finish_reason}, usage: {result.usage}, request_id: {result.request_id}")

        # Streaming: NDJSON events as they arrive; the last one is done=True with finish_reason and usage.
        print("stream: ", end="", flush=True)
        with client.stream(text=prompt, max_output_tokens=max_tokens, request_id="sdk-example") as events:
            for event in events:
                if isinstance(event, TextChunk):
                    print(event.text, end="", flush=True)
                    if event.done:
                        print(f"\nstream done: {event.metadata['finish_reason']}, request_id: {event.request_id}")

        # Greedy decoding (do_sample=False) is deterministic: the same prompt gives the same text.
        first = client.generate(text=prompt, max_output_tokens=8, do_sample=False).text
        second = client.generate(text=prompt, max_output_tokens=8, do_sample=False).text
        print(f"greedy repeatable: {first == second}")

        try:
            topology = client.topology()
            nodes = [f"master {len(topology['master']['layers'])} layer(s)"]
            nodes += [f"{worker['name']} {len(worker['layers'])} layer(s)" for worker in topology["workers"]]
            print(f"topology: {topology['model']} with {topology['num_layers']} layers on {', '.join(nodes)}")
        except AuthenticationError as error:
            print(f"topology: {error.status_code} {error.message} (set CAKE_UI_AUTH=USER:PASS)")

        # Errors are typed and carry the server's status and message.
        try:
            client.generate_image("a cake in the shape of a cluster")
        except NotFoundError as error:
            print(f"generate_image: {error.status_code} {error.message}")
        try:
            client.tts("hello there", voice="tara")
        except NotFoundError as error:
            print(f"tts: {error.status_code} {error.message}")
        try:
            client.generate(text=prompt, unknown_knob=1)
        except CakeAPIError as error:
            print(f"bad request: {type(error).__name__} {error.status_code}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except CakeConnectionError as error:
        sys.exit(f"{error}\nStart a server (`cake serve`) or point CAKE_BASE_URL at one.")
