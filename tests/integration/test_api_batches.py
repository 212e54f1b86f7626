"""The Files and Batch APIs through the official `openai` client against a real uvicorn server on the tiny Llama:
files uploaded, listed, read and deleted; batches of chat, completions and embeddings requests answered into
output and error files as the routes answer them; bad input files failing with their lines named; cancelling; and
a batch that a stopped server had not finished going on after a restart without sending any request twice."""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from cake_py.api import batches
from cake_py.api.file_store import FileStore
from cake_py.api.inprocess import Routes
from tests.fixtures.server import ServerHandle, running_server, tiny_settings

MAX_FILE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def server(tiny_llama: Path, files_dir: Path) -> Iterator[ServerHandle]:
    settings = tiny_settings(tiny_llama, model_name="tiny", files_dir=files_dir, max_file_bytes=MAX_FILE_BYTES)
    with running_server(settings) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60) as openai_client:
        yield openai_client


@contextlib.contextmanager
def refused(kind: type[openai.APIStatusError], pattern: str) -> Iterator[pytest.ExceptionInfo[Any]]:
    """An error of `kind` whose body (the client unwraps `{"error": …}` to the message) matches `pattern`."""
    with pytest.raises(kind) as caught:
        yield caught
    assert re.search(pattern, str(caught.value.body)), caught.value.body


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def request_line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat_body(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 8, **extra}


def upload(client: OpenAI, lines: list[dict[str, Any]], name: str = "requests.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch").id


def wait_for(client: OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} is {batch.status}, not one of {statuses}, after {timeout} s")


def result_lines(client: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A result file's lines by custom_id (none when the file is not there)."""
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id answered twice"
    return by_id


# --- files -----------------------------------------------------------------------------------------------------


def test_a_file_is_uploaded_listed_read_and_deleted(client: OpenAI) -> None:
    content = b'{"hello": "world"}\n' * 100
    stored = client.files.create(file=("notes.jsonl", io.BytesIO(content)), purpose="user_data")
    assert (stored.object, stored.bytes, stored.filename, stored.purpose) == (
        "file",
        len(content),
        "notes.jsonl",
        "user_data",
    )
    assert stored.expires_at is None  # only batch files expire by default
    assert client.files.retrieve(stored.id).model_dump() == stored.model_dump()
    assert client.files.content(stored.id).content == content
    assert stored.id in [f.id for f in client.files.list(purpose="user_data")]
    assert stored.id not in [f.id for f in client.files.list(purpose="batch")]
    deleted = client.files.delete(stored.id)
    assert (deleted.id, deleted.deleted) == (stored.id, True)
    with refused(openai.NotFoundError, stored.id):
        client.files.retrieve(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(stored.id)


def test_files_list_in_pages_newest_first(client: OpenAI) -> None:
    ids = [client.files.create(file=(f"{i}.txt", io.BytesIO(b"x")), purpose="vision").id for i in range(3)]
    listed = [f.id for f in client.files.list(purpose="vision", order="asc")]
    assert listed[-3:] == ids
    first = client.files.list(purpose="vision", limit=2, order="asc", after=ids[0])
    assert [f.id for f in first.data] == ids[1:] and not first.has_more
    page = client.files.list(purpose="vision", limit=1, order="desc")
    assert [f.id for f in page.data] == [ids[-1]] and page.has_more


def test_batch_files_expire_after_30_days_unless_told(client: OpenAI) -> None:
    default = client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert default.expires_at == default.created_at + 30 * 24 * 3600
    told = client.files.create(
        file=("b.txt", io.BytesIO(b"x")),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert told.expires_at == told.created_at + 3600


def test_bad_uploads_are_refused_naming_why(client: OpenAI, server: ServerHandle) -> None:
    with refused(openai.BadRequestError, "purpose must be one of"):
        client.files.create(file=("a.txt", io.BytesIO(b"x")), purpose="homework")  # type: ignore[arg-type]
    with refused(openai.BadRequestError, r"expires_after\[seconds\] must be an integer from 3600"):
        client.files.create(
            file=("a.txt", io.BytesIO(b"x")), purpose="user_data", expires_after={"anchor": "created_at", "seconds": 5}
        )
    for seconds in ("\u00b2", "9" * 5000, "-3600", " 3600"):  # "²" passes str.isdigit(), which int() refuses
        fields = {"purpose": "user_data", "expires_after[anchor]": "created_at", "expires_after[seconds]": seconds}
        answer = httpx.post(f"{server.openai_url}/files", data=fields, files={"file": ("a.txt", b"x")})
        assert answer.status_code == 400 and "expires_after[seconds] must be" in answer.json()["error"], answer.text
    answer = httpx.post(f"{server.openai_url}/files", data={"purpose": "batch"}, files={"other": ("a", b"x")})
    assert answer.status_code == 400 and "the field file" in answer.json()["error"]
    plain = {"purpose": "user_data", "expires_after": "3600"}  # ignored before: the file never expired
    answer = httpx.post(f"{server.openai_url}/files", data=plain, files={"file": ("a.txt", b"x")})
    assert answer.status_code == 400 and "expires_after[anchor] and expires_after[seconds]" in answer.json()["error"]
    twice = {"purpose": ["user_data", "batch"]}
    answer = httpx.post(f"{server.openai_url}/files", data=twice, files={"file": ("a.txt", b"x")})
    assert answer.status_code == 400 and "purpose was sent more than once" in answer.json()["error"]
    answer = httpx.post(f"{server.openai_url}/files", json={"purpose": "batch"})
    assert answer.status_code == 400 and "multipart/form-data" in answer.json()["error"]
    before = sorted(p.name for p in (server.state.files.directory).iterdir())
    too_big = b"x" * (MAX_FILE_BYTES + 1)
    with refused(openai.APIStatusError, "over the 262144-byte limit") as caught:
        client.files.create(file=("big.bin", io.BytesIO(too_big)), purpose="user_data")
    assert caught.value.status_code == 413
    assert sorted(p.name for p in server.state.files.directory.iterdir()) == before  # nothing of it was kept
    far_too_big = b"x" * (MAX_FILE_BYTES + 128 * 1024)  # past the body limit of the upload route itself
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.bin", io.BytesIO(far_too_big)), purpose="user_data")
    assert caught.value.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("../../etc/passwd")


# --- batches ---------------------------------------------------------------------------------------------------


def test_a_chat_batch_answers_each_request_as_the_route_does(client: OpenAI, server: ServerHandle) -> None:
    questions = {"france": "What is the capital of France?", "sky": "Why is the sky blue?"}
    lines = [request_line(key, chat_body(question, temperature=0)) for key, question in questions.items()]
    lines.append(request_line("bad", chat_body("hi", temperature=-1)))
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert (batch.object, batch.status, batch.endpoint, batch.metadata) == (
        "batch",
        "validating",
        "/v1/chat/completions",
        {"job": "nightly"},
    )
    assert batch.expires_at == batch.created_at + 24 * 3600 and batch.model == "tiny"
    done = wait_for(client, batch.id, ("completed",))
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    outputs, errors = result_lines(client, done.output_file_id), result_lines(client, done.error_file_id)
    assert sorted(outputs) == ["france", "sky"] and sorted(errors) == ["bad"]
    for key, question in questions.items():
        response = outputs[key]["response"]
        assert response["status_code"] == 200 and outputs[key]["error"] is None
        direct = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0
        )
        assert response["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert response["request_id"].startswith("req_") and outputs[key]["id"].startswith("batch_req_")
    assert errors["bad"]["response"]["status_code"] == 400
    assert "temperature" in errors["bad"]["response"]["body"]["error"]
    assert done.usage is not None
    bodies = [outputs[key]["response"]["body"]["usage"] for key in questions]
    assert done.usage.input_tokens == sum(usage["prompt_tokens"] for usage in bodies)
    assert done.usage.output_tokens == sum(usage["completion_tokens"] for usage in bodies)
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    output_file = client.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert (output_file.purpose, output_file.filename) == ("batch_output", f"{batch.id}_output.jsonl")
    assert client.batches.retrieve(batch.id).model_dump() == done.model_dump()
    assert batch.id in [b.id for b in client.batches.list()]
    metrics = httpx.get(f"{server.base_url}/metrics").text
    completed = re.search(r'^cake_batches\{status="completed"\} (\S+)$', metrics, re.MULTILINE)
    assert completed and float(completed.group(1)) >= 1 and "cake_batch_requests_pending 0.0" in metrics


def test_completions_and_embeddings_batches(client: OpenAI) -> None:
    url = "/v1/completions"
    lines = [request_line("a", {"model": "tiny", "prompt": "Once upon", "max_tokens": 4}, url)]
    done = wait_for(
        client,
        client.batches.create(input_file_id=upload(client, lines), endpoint=url, completion_window="24h").id,
        ("completed",),
    )
    body = result_lines(client, done.output_file_id)["a"]["response"]["body"]
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 4
    url = "/v1/embeddings"
    lines = [request_line("e", {"model": "tiny", "input": ["one", "two"]}, url)]
    done = wait_for(
        client,
        client.batches.create(input_file_id=upload(client, lines), endpoint=url, completion_window="24h").id,
        ("completed",),
    )
    body = result_lines(client, done.output_file_id)["e"]["response"]["body"]
    direct = client.embeddings.create(model="tiny", input=["one", "two"])
    for batched, alone in zip(body["data"], direct.data, strict=True):
        assert batched["embedding"] == pytest.approx(alone.embedding, abs=1e-5)
    assert done.usage is not None and done.usage.input_tokens == direct.usage.prompt_tokens


def test_a_responses_batch_keeps_its_answers_in_the_file_and_its_output_expires(client: OpenAI) -> None:
    url = "/v1/responses"
    lines = [request_line("r", {"model": "tiny", "input": "Hello", "max_output_tokens": 4}, url)]
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint=url,
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    done = wait_for(client, batch.id, ("completed",))
    body = result_lines(client, done.output_file_id)["r"]["response"]["body"]
    assert body["object"] == "response" and body["status"] in ("completed", "incomplete")
    with pytest.raises(openai.NotFoundError):  # store defaults to false in a batch: the response store keeps none
        client.responses.retrieve(body["id"])
    output_file = client.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert output_file.expires_at == output_file.created_at + 7200


def test_a_request_the_runner_cannot_carry_is_its_own_failed_line(
    client: OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Routes.post

    async def failing(self: Routes, path: str, body: dict[str, Any], **options: Any) -> tuple[int, Any]:
        if body["messages"][0]["content"] == "break":
            raise RecursionError("maximum recursion depth exceeded")
        return await real(self, path, body, **options)

    monkeypatch.setattr(Routes, "post", failing)
    lines = [request_line("ok", chat_body("hi")), request_line("broken", chat_body("break"))]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(client, batch.id, ("completed",))
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    error = result_lines(client, done.error_file_id)["broken"]["response"]
    assert error["status_code"] == 500 and "RecursionError" in error["body"]["error"]


def test_a_batch_past_its_window_expires_with_its_unsent_requests_named(
    client: OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches, "COMPLETION_WINDOW_S", 0)
    lines = [request_line(f"x{i}", chat_body("hi")) for i in range(3)]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(client, batch.id, ("expired",))
    assert done.expired_at and done.output_file_id is None
    assert done.request_counts is not None and (done.request_counts.total, done.request_counts.failed) == (3, 3)
    errors = result_lines(client, done.error_file_id)
    assert sorted(errors) == ["x0", "x1", "x2"]
    assert all(line["error"]["code"] == "batch_expired" and line["response"] is None for line in errors.values())


def test_a_batch_being_finished_ends_as_it_was_going_to(
    client: OpenAI, files_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that comes while the result files are stored changes nothing: one output file, the batch completed,
    on disk as in memory."""
    real, cancelled = FileStore.add_lines, threading.Event()

    def held(self: FileStore, *args: Any, **kwargs: Any) -> Any:
        # Stored only once the cancel was answered, so it comes while the files are stored on any machine: a 0.3 s
        # pause here was a window that a loaded machine's status poll and cancel could both miss.
        cancelled.wait(timeout=60)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FileStore, "add_lines", held)
    batch = client.batches.create(
        input_file_id=upload(client, [request_line("one", chat_body("hi"))]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    try:
        wait_for(client, batch.id, ("finalizing",))
        assert client.batches.cancel(batch.id).status == "finalizing"
    finally:
        cancelled.set()
    done = wait_for(client, batch.id, ("completed", "cancelled"))
    assert done.status == "completed"
    outputs = [f for f in client.files.list(purpose="batch_output") if f.filename.startswith(batch.id)]
    assert [f.id for f in outputs] == [done.output_file_id]
    record = json.loads((files_dir / "batches" / f"{batch.id}.json").read_text())
    assert record["status"] == "completed" and record["output_file_id"] == done.output_file_id


def test_streamed_requests_fail_in_a_batch(client: OpenAI) -> None:
    lines = [request_line("s", chat_body("hi", stream=True))]
    done = wait_for(
        client,
        client.batches.create(
            input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
        ("completed",),
    )
    assert done.output_file_id is None
    error = result_lines(client, done.error_file_id)["s"]["response"]
    assert error["status_code"] == 400 and "stream is not supported in a batch" in error["body"]["error"]


def test_a_bad_input_file_fails_the_batch_naming_its_lines(client: OpenAI) -> None:
    good = request_line("one", chat_body("hi"))
    raw = (
        jsonl([good, good, {**good, "custom_id": "m", "method": "GET"}, {**good, "custom_id": "u", "url": "/v1/x"}])
        + b"not json\n"
    )
    file_id = client.files.create(file=("bad.jsonl", io.BytesIO(raw)), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_for(client, batch.id, ("failed",))
    assert failed.failed_at and failed.errors is not None and failed.errors.data is not None
    found = [(error.line, error.code) for error in failed.errors.data]
    assert found == [
        (2, "duplicate_custom_id"),
        (3, "invalid_request"),
        (4, "mismatched_endpoint"),
        (5, "invalid_json_line"),
    ]
    assert "'/v1/x'" in (failed.errors.data[2].message or "")


def test_bad_batch_requests_are_refused_naming_the_value(client: OpenAI, server: ServerHandle) -> None:
    file_id = upload(client, [request_line("one", chat_body("hi"))])
    with refused(openai.BadRequestError, "endpoint must be one of"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/moderations", completion_window="24h")
    with refused(openai.BadRequestError, "completion_window must be '24h', got '1h'"):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    with refused(openai.BadRequestError, "no file with id 'file-nope'"):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    other = client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="user_data").id
    with refused(openai.BadRequestError, "purpose 'user_data', not 'batch'"):
        client.batches.create(input_file_id=other, endpoint="/v1/chat/completions", completion_window="24h")
    with refused(openai.BadRequestError, "metadata"):
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": "v" * 600}
        )
    with refused(openai.NotFoundError, "no batch with id 'batch_nope'"):
        client.batches.retrieve("batch_nope")
    answer = httpx.post(
        f"{server.openai_url}/batches",
        json={"endpoint": "/v1/chat/completions", "input_file_id": ["x"], "completion_window": "24h"},
    )
    assert (
        answer.status_code == 400 and "input_file_id must be a file id (a string), got ['x']" in answer.json()["error"]
    )
    with refused(openai.BadRequestError, "output_expires_after.seconds must be from 3600"):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 60},
        )
    for route in ("chat/completions", "responses"):  # batch requests run at priority 1 through either
        body = {**chat_body("hi"), "input": "hi", "priority": "high"}
        answer = httpx.post(f"{server.openai_url}/{route}", json=body)
        assert answer.status_code == 400 and "priority" in answer.json()["error"], route


def test_a_finished_batch_cannot_be_cancelled(client: OpenAI) -> None:
    batch = client.batches.create(
        input_file_id=upload(client, [request_line("one", chat_body("hi"))]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_for(client, batch.id, ("completed",))
    with refused(openai.BadRequestError, "its status is completed"):
        client.batches.cancel(batch.id)


def test_batches_list_in_pages_newest_first(client: OpenAI) -> None:
    file_id = upload(client, [request_line("one", chat_body("hi"))])
    ids = [
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(3)
    ]
    for batch_id in ids:
        wait_for(client, batch_id, ("completed",))
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=5, after=ids[1]).data][0] == ids[0]


LONG = {"max_tokens": 200, "ignore_eos": True}


def long_batch(client: OpenAI, count: int) -> str:
    lines = [request_line(f"r{i}", chat_body(f"Tell story {i}", **LONG)) for i in range(count)]
    return client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def wait_for_answers(client: OpenAI, batch_id: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while (counts := client.batches.retrieve(batch_id).request_counts) is None or counts.completed < count:
        assert time.monotonic() < deadline, f"batch {batch_id} has not answered {count} requests in 60 s"
        time.sleep(0.02)


def test_cancelling_a_batch_stops_its_requests(tiny_llama: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_llama, model_name="tiny", files_dir=tmp_path, batch_concurrency=1)
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        batch_id = long_batch(client, 40)
        wait_for_answers(client, batch_id, 1)
        cancelling = client.batches.cancel(batch_id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        cancelled = wait_for(client, batch_id, ("cancelled",))
        assert cancelled.cancelled_at and cancelled.request_counts is not None
        assert 1 <= cancelled.request_counts.completed < 40 and cancelled.request_counts.total == 40
        assert len(result_lines(client, cancelled.output_file_id)) == cancelled.request_counts.completed
        engine = server.state.engine
        assert engine is not None
        deadline = time.monotonic() + 10
        while engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.in_flight == 0  # the request running when it was cancelled left the engine
        assert client.batches.cancel(batch_id).status == "cancelled"  # again: the same batch, still cancelled


def test_a_running_batch_reads_its_requests_as_it_sends_them_even_once_the_file_is_deleted(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Bodies are not held for the whole run (a 50,000-line file parsed whole held gigabytes): each is read from
    the input file when it is sent, through a descriptor opened at the start, so deleting the file mid-run (as
    OpenAI allows) loses nothing."""
    settings = tiny_settings(tiny_llama, model_name="tiny", files_dir=tmp_path, batch_concurrency=1)
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        lines = [
            request_line(f"r{i}", chat_body(f"Tell story {i}", max_tokens=20 + i, ignore_eos=True)) for i in range(6)
        ]
        input_id = upload(client, lines)
        batch_id = client.batches.create(
            input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        wait_for_answers(client, batch_id, 1)
        assert client.files.delete(input_id).deleted
        done = wait_for(client, batch_id, ("completed",))
        assert done.request_counts is not None and done.request_counts.completed == 6
        answers = result_lines(client, done.output_file_id)
        for i in range(6):  # each answer is its own line's request: read from the right place
            assert answers[f"r{i}"]["response"]["body"]["usage"]["completion_tokens"] == 20 + i


def test_a_batch_goes_on_after_a_restart_without_sending_a_request_twice(tiny_llama: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_llama, model_name="tiny", files_dir=tmp_path, batch_concurrency=1)
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        batch_id = long_batch(client, 12)
        wait_for_answers(client, batch_id, 2)
    # The server stopped mid-batch: its record says in_progress, the answers so far are on disk.
    record = json.loads((tmp_path / "batches" / f"{batch_id}.json").read_text())
    assert record["status"] == "in_progress"
    answered_before = len((tmp_path / "batches" / f"{batch_id}.output.jsonl").read_bytes().splitlines())
    assert 2 <= answered_before < 12
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        done = wait_for(client, batch_id, ("completed",))
        assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.total) == (
            12,
            12,
        )
        assert sorted(result_lines(client, done.output_file_id)) == sorted(f"r{i}" for i in range(12))
        engine = server.state.engine
        assert engine is not None
        assert engine.stats.requests_total == 12 - answered_before  # only the ones not answered before
    assert not (tmp_path / "batches" / f"{batch_id}.output.jsonl").exists()  # the run's own lines, once stored


def test_a_batch_whose_input_file_is_gone_after_a_restart_fails_keeping_its_answers(
    tiny_llama: Path, tmp_path: Path
) -> None:
    settings = tiny_settings(tiny_llama, model_name="tiny", files_dir=tmp_path, batch_concurrency=1)
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        batch_id = long_batch(client, 12)
        wait_for_answers(client, batch_id, 2)
        input_file_id = client.batches.retrieve(batch_id).input_file_id
    assert FileStore(tmp_path, max_file_bytes=0).delete(input_file_id)
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        failed = wait_for(client, batch_id, ("failed",))
        assert failed.errors is not None and failed.errors.data is not None
        assert failed.errors.data[0].code == "missing_file" and input_file_id in (failed.errors.data[0].message or "")
        answered = result_lines(client, failed.output_file_id)
        assert len(answered) >= 2 and failed.request_counts is not None
        assert failed.request_counts.completed == len(answered)


def test_a_batch_failing_when_the_server_stopped_ends_failed_and_batches_keep_their_order(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A run stopped while it was being failed (its record: in_progress, finishing_as failed) ran again from the
    start after a restart and ended completed with the stale error; batches made in one second came back in the
    order of their random ids."""
    settings = tiny_settings(tiny_llama, model_name="tiny", files_dir=tmp_path, batch_concurrency=1)
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        file_id = upload(client, [request_line("one", chat_body("hi"))])
        made = [
            client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
            for _ in range(6)
        ]
        for batch_id in made:
            wait_for(client, batch_id, ("completed",))
    record_path = tmp_path / "batches" / f"{made[0]}.json"
    record = json.loads(record_path.read_text())
    error = {"code": "internal_error", "line": None, "param": None, "message": "internal error: the disk"}
    record.update(status="in_progress", finishing_as="failed", errors=[error], output_file_id=None)
    record_path.write_text(json.dumps(record))
    (tmp_path / "batches" / f"{made[0]}.output.jsonl").write_text(json.dumps({"custom_id": "one"}) + "\n")
    cut_short = tmp_path / "batches" / f".{made[1]}.json.0a1b2c3d"  # a record write a crash cut short
    cut_short.write_text('{"id": ')
    with running_server(settings) as server, OpenAI(base_url=server.openai_url, api_key="x", max_retries=0) as client:
        assert not cut_short.exists()
        failed = wait_for(client, made[0], ("failed", "completed"))
        assert failed.status == "failed" and failed.errors is not None and failed.errors.data is not None
        assert [e.message for e in failed.errors.data] == ["internal error: the disk"]
        assert server.state.engine is not None and server.state.engine.stats.requests_total == 0  # not run again
        listed = [b.id for b in client.batches.list(limit=100) if b.id in made]
        assert listed == made[::-1]  # newest first, as created


def test_listing_in_pages_while_deleting_each_file_walks_them_all(client: OpenAI) -> None:
    """The official client's auto-pagination asks for the page after the last one's final id, which the loop had
    just deleted: a 400 "no file has the id" after the first page."""
    made = {client.files.create(file=(f"{i}.txt", io.BytesIO(b"x")), purpose="evals").id for i in range(7)}
    seen = []
    for stored in client.files.list(purpose="evals", limit=3):
        seen.append(stored.id)
        client.files.delete(stored.id)
    assert sorted(seen) == sorted(made) and len(seen) == 7
    assert list(client.files.list(purpose="evals")) == []
    with refused(openai.BadRequestError, "after: no file has the id 'file-000000000000000000000000'"):
        client.files.list(after="file-000000000000000000000000")


def test_each_key_has_its_own_files_quota(tiny_llama: Path, tmp_path: Path) -> None:
    settings = tiny_settings(
        tiny_llama, api_keys=("alice-key", "bob-key"), files_dir=tmp_path, files_max_bytes=1000, rate_limit=0
    )
    with running_server(settings) as server:
        clients = {
            name: OpenAI(base_url=server.openai_url, api_key=f"{name}-key", max_retries=0, timeout=60)
            for name in ("alice", "bob")
        }
        clients["alice"].files.create(file=("a.txt", b"x" * 800), purpose="user_data")
        with refused(openai.APIStatusError, r"'b.txt' does not fit: .*hold 800 bytes.*--files-max-gb") as caught:
            clients["alice"].files.create(file=("b.txt", b"y" * 300), purpose="user_data")
        assert caught.value.status_code == 413
        assert clients["bob"].files.create(file=("b.txt", b"y" * 300), purpose="user_data").bytes == 300
        for client in clients.values():
            client.close()
