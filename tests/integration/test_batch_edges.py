"""Edges of the Batch API that its main tests (test_api_batches.py) do not reach: a cancel that lands while a run
validates its input file or in the moments between that and its first request, and a batch failing on a full disk
while its next request was about to start, through the official `openai` client against a real uvicorn server on
the tiny Llama."""

from __future__ import annotations

import errno
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from cake_py.api import batch_runner
from cake_py.api.file_store import FileStore
from tests.fixtures.server import running_server, tiny_settings


def chat_line(custom_id: str) -> dict[str, Any]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": custom_id}], "max_tokens": 4}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(client: OpenAI, lines: list[dict[str, Any]]) -> str:
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch").id


def started(client: OpenAI, count: int) -> str:
    """The id of a new batch of `count` chat requests (custom ids r0, r1, …)."""
    return client.batches.create(
        input_file_id=upload(client, [chat_line(f"r{i}") for i in range(count)]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    ).id


def wait_ended(client: OpenAI, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in batch_runner.TERMINAL:
        assert time.monotonic() < deadline, f"batch {batch_id} is still {batch.status} after {timeout} s"
        time.sleep(0.05)
    return batch


def test_a_batch_cancelled_while_its_answers_so_far_are_counted_sends_nothing(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run counts what an earlier run answered (reading its result lines, slow for a big resumed batch) after it
    is in_progress and before it may be cancelled where it is: a cancel then was only seen at the end, after every
    request had been sent and answered."""
    counting, counted = threading.Event(), threading.Event()
    recount = batch_runner._recount

    def held_recount(*paths: Path) -> Any:
        counting.set()
        counted.wait(30)
        return recount(*paths)

    monkeypatch.setattr(batch_runner, "_recount", held_recount)
    settings = tiny_settings(tiny_llama, model_name="tiny", files_dir=tmp_path)
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        batch_id = started(client, 3)
        assert counting.wait(30)
        try:
            assert client.batches.cancel(batch_id).status == "cancelling"
        finally:
            counted.set()
        cancelled = wait_ended(client, batch_id)
        assert cancelled.status == "cancelled" and cancelled.request_counts is not None
        assert (cancelled.request_counts.completed, cancelled.request_counts.failed) == (0, 0)
        assert cancelled.output_file_id is None
        engine = server.state.engine
        assert engine is not None and engine.stats.requests_total == 0  # none of its requests was sent


@pytest.mark.parametrize("input_file", ["with a bad line", "deleted"])
def test_a_batch_cancelled_while_its_input_file_is_validated_ends_cancelled(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, input_file: str
) -> None:
    """OpenAI's cancel answers `cancelling`, then the batch is `cancelled`. One cancelled while its input file was
    looked up or read ended `failed` when that file turned out bad or gone: the validation overrode the cancel."""
    validating, go_on = threading.Event(), threading.Event()

    def held(real: Any) -> Any:
        def hook(*args: Any) -> Any:
            validating.set()
            assert go_on.wait(30)
            return real(*args)

        return hook

    if input_file == "deleted":  # held as the run looks the file up; the test deletes it meanwhile
        monkeypatch.setattr(FileStore, "path", held(FileStore.path))
    else:  # held as the run reads it (the bad line is found after the cancel)
        monkeypatch.setattr(batch_runner, "read_requests", held(batch_runner.read_requests))
    settings = tiny_settings(tiny_llama, model_name="tiny", files_dir=tmp_path)
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        lines = [chat_line("r0"), {"custom_id": "r1", "method": "GET"}]  # r1: a bad line (method must be POST)
        file_id = upload(client, lines)
        batch_id = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        assert validating.wait(30)
        try:
            cancelling = client.batches.cancel(batch_id)
            assert (cancelling.status, cancelling.cancelling_at is not None) == ("cancelling", True)
            if input_file == "deleted":
                assert client.files.delete(file_id).deleted
        finally:
            go_on.set()
        cancelled = wait_ended(client, batch_id)
        assert cancelled.status == "cancelled", cancelled.errors
        assert cancelled.cancelled_at is not None and cancelled.failed_at is None and cancelled.errors is None
        assert cancelled.output_file_id is None and cancelled.error_file_id is None
        engine = server.state.engine
        assert engine is not None and engine.stats.requests_total == 0  # none of its requests was sent


def test_a_batch_failing_on_a_full_disk_leaves_its_slots_to_the_next_batch(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose answer cannot be written fails the batch, and the run's task group cancels its other
    requests: one started just then, not yet running, never gave back its slot. With one slot (batch_concurrency
    1), every later batch waited in_progress for ever."""
    append = batch_runner._append
    full = threading.Event()
    full.set()

    def append_once_full(path: Path, lines: list[dict[str, Any]]) -> None:
        if full.is_set():
            full.clear()
            raise OSError(errno.ENOSPC, "No space left on device")
        append(path, lines)

    monkeypatch.setattr(batch_runner, "_append", append_once_full)
    settings = tiny_settings(tiny_llama, model_name="tiny", files_dir=tmp_path, batch_concurrency=1)
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        first = started(client, 3)
        failed = wait_ended(client, first)
        assert failed.status == "failed" and failed.errors is not None and failed.errors.data is not None
        assert "disk is full" in (failed.errors.data[0].message or "")
        second = client.batches.create(
            input_file_id=upload(client, [chat_line("again")]), endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        done = wait_ended(client, second, timeout=30)
        assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 1
