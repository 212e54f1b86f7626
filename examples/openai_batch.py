"""Run a file of chat requests as one batch through OpenAI's Batch API, with the official OpenAI Python client:
upload the JSONL file, create the batch, wait for it, print each answer by its custom_id.

    python examples/openai_batch.py ["question" ...]

The batch's requests run behind interactive traffic (priority 1), a few at a time; a server restarted meanwhile
goes on with the batch. Environment: CAKE_BASE_URL (default http://127.0.0.1:8080), CAKE_API_KEY (when the server
runs with --api-key), CAKE_MAX_TOKENS (default 64). Needs `pip install openai`.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

from openai import APIConnectionError, OpenAI

FINAL = ("completed", "failed", "expired", "cancelled")


def main(argv: list[str]) -> int:
    base_url = os.environ.get("CAKE_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    questions = argv[1:] or ["What is the capital of France?", "What is the capital of Spain?"]
    max_tokens = int(os.environ.get("CAKE_MAX_TOKENS", "64"))
    client = OpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("CAKE_API_KEY") or "unused", max_retries=0)

    lines = [
        {
            "custom_id": f"question-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "any", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens},
        }
        for index, q in enumerate(questions)
    ]
    jsonl = "".join(json.dumps(line) + "\n" for line in lines).encode()
    batch_input = client.files.create(file=("questions.jsonl", io.BytesIO(jsonl)), purpose="batch")
    batch = client.batches.create(
        input_file_id=batch_input.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    print(f"batch: {batch.id}")
    while batch.status not in FINAL:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    counts = batch.request_counts
    completed, failed = (counts.completed, counts.failed) if counts is not None else (0, 0)
    print(f"status: {batch.status}, completed: {completed}, failed: {failed}")
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is None:
            continue
        for raw in client.files.content(file_id).text.splitlines():
            line = json.loads(raw)
            response = line["response"] or {}
            body = response.get("body") or {}
            answer = body["choices"][0]["message"]["content"] if "choices" in body else body.get("error", line["error"])
            print(f"{line['custom_id']}: {answer}")
    return 0 if batch.status == "completed" else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except APIConnectionError as error:
        sys.exit(f"cannot reach the cake server: {error}\nStart one (`cake serve`) or point CAKE_BASE_URL at it.")
