"""OpenAI's Responses API and embeddings on a cake_py master, through the official OpenAI Python client.

    python examples/openai_responses.py

1. A conversation kept by the server: the second turn sends only `previous_response_id` and its new question.
2. A stored conversation (the Conversations API): each response in it reads its items and adds its own turn; the
   input tokens of a turn are counted before it is sent.
3. A streamed answer, printed as its `response.output_text.delta` events arrive.
4. A background response: the server answers on its own; the client polls it until it has ended.
5. Embeddings of three sentences, and which one is nearest the first (unit vectors: the dot product is the cosine).

Environment: CAKE_BASE_URL (default http://127.0.0.1:8080), CAKE_API_KEY (when the server runs with --api-key),
CAKE_MAX_TOKENS (default 64). Needs `pip install openai`.
"""

from __future__ import annotations

import os
import sys
import time

from openai import APIConnectionError, OpenAI


def main() -> int:
    base_url = os.environ.get("CAKE_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    max_tokens = int(os.environ.get("CAKE_MAX_TOKENS", "64"))
    client = OpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("CAKE_API_KEY") or "unused", max_retries=0)
    model = client.models.list().data[0].id

    # 1. Two turns; the server keeps the first (store defaults to true).
    first = client.responses.create(
        model=model,
        instructions="Answer in one sentence.",
        input="What is the capital of France?",
        temperature=0,
        max_output_tokens=max_tokens,
    )
    print(f"first ({first.status}): {first.output_text}")
    second = client.responses.create(
        model=model,
        instructions="Answer in one sentence.",  # not carried over from the first turn: sent again
        previous_response_id=first.id,
        input="And what language is spoken there?",
        temperature=0,
        max_output_tokens=max_tokens,
    )
    assert second.usage is not None
    print(f"second ({second.status}): {second.output_text}")
    cached = second.usage.input_tokens_details.cached_tokens  # the first turn's caches, kept by the server
    print(f"second turn: {second.usage.input_tokens} input tokens, {cached} cached")

    # 2. A stored conversation: no ids to chain, the server adds each turn to it.
    conversation = client.conversations.create(metadata={"topic": "France"})
    question = "What is the capital of France?"
    counted = client.responses.input_tokens.count(model=model, conversation=conversation.id, input=question)
    turn = client.responses.create(
        model=model, conversation=conversation.id, input=question, temperature=0, max_output_tokens=max_tokens
    )
    assert turn.usage is not None
    print(f"conversation turn: {counted.input_tokens} input tokens counted, {turn.usage.input_tokens} used")
    client.responses.create(
        model=model, conversation=conversation.id, input="And its river?", temperature=0, max_output_tokens=max_tokens
    )
    items = client.conversations.items.list(conversation.id, order="asc")
    print(f"conversation items: {', '.join(getattr(item, 'role', item.type) for item in items)}")
    client.conversations.delete(conversation.id)

    # 3. Streamed.
    print("streamed: ", end="", flush=True)
    with client.responses.stream(
        model=model, input="Write a haiku about cake.", max_output_tokens=max_tokens
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
            elif event.type in ("response.completed", "response.incomplete"):
                print(f"\nstream ended: {event.type}")

    # 4. In the background: the create call returns at once (queued); poll (or client.responses.cancel(job.id)).
    job = client.responses.create(
        model=model, input="Name three French cheeses.", max_output_tokens=max_tokens, background=True
    )
    while job.status in ("queued", "in_progress"):
        time.sleep(0.2)
        job = client.responses.retrieve(job.id)
    print(f"background ({job.status}): {job.output_text}")

    # 5. Embeddings.
    texts = ["Paris is the capital of France.", "The French capital is Paris.", "I like to eat bananas."]
    vectors = [item.embedding for item in client.embeddings.create(model=model, input=texts).data]
    similarity = [sum(a * b for a, b in zip(vectors[0], other, strict=True)) for other in vectors[1:]]
    nearest = texts[1 + similarity.index(max(similarity))]
    print(f"embeddings: {len(vectors)} of {len(vectors[0])} dimensions; nearest to the first: {nearest!r}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except APIConnectionError as error:
        sys.exit(f"cannot reach the cake server: {error}\nStart one (`cake serve`) or point CAKE_BASE_URL at it.")
