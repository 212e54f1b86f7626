"""A batch's input file read and checked line by line, its usage summed from each route's answer shape, and the
Batch object as OpenAI's client reads it."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

from openai.types import Batch as OpenAIBatch

from cake_py.api.batch_objects import MAX_REPORTED_ERRORS, USAGE_KEYS, Batch, add_usage, read_requests

URL = "/v1/chat/completions"


def write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def line(custom_id: str, **changes: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": URL, "body": {"messages": []}, **changes}


def test_requests_are_read_in_order_skipping_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [line("a"), "", "   ", line("b")])
    requests, errors = read_requests(path, URL)
    assert errors == [] and [r.custom_id for r in requests] == ["a", "b"]


def test_requests_hold_where_their_line_is_and_read_their_body_from_a_descriptor(tmp_path: Path) -> None:
    """A request keeps no body while the batch runs (50,000 parsed bodies held gigabytes); reading it back through
    the run's descriptor gives its own line's body, whatever the lines around it."""
    import os

    bodies = [{"messages": [{"role": "user", "content": "é" * i}], "max_tokens": i} for i in range(1, 5)]
    path = write(tmp_path / "in.jsonl", [line("a", body=bodies[0]), "", line("b", body=bodies[1])])
    with open(path, "a") as handle:
        handle.write(json.dumps(line("c", body=bodies[2])) + "\r\n" + json.dumps(line("d", body=bodies[3])))
    fd = os.open(path, os.O_RDONLY)
    try:
        requests, errors = read_requests(fd, URL)
        assert errors == [] and not hasattr(requests[0], "__dict__") and "body" not in requests[0].__slots__
        assert [request.body(fd) for request in reversed(requests)] == bodies[::-1]
    finally:
        os.close(fd)


def test_each_bad_line_is_named_with_its_code(tmp_path: Path) -> None:
    lines = [
        line("a"),
        line("a"),
        line(""),
        line("m", method="GET"),
        line("u", url="/v1/completions"),
        line("b", body=[1]),
        "[1, 2]",
        "{oops",
    ]
    _, errors = read_requests(write(tmp_path / "in.jsonl", lines), URL)
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [
        (2, "duplicate_custom_id", "custom_id"),
        (3, "invalid_request", "custom_id"),
        (4, "invalid_request", "method"),
        (5, "mismatched_endpoint", "url"),
        (6, "invalid_request", "body"),
        (7, "invalid_request", None),
        (8, "invalid_json_line", None),
    ]


def test_an_error_quotes_a_huge_bad_value_cut_short(tmp_path: Path) -> None:
    """Each of 100 errors quoted its whole value: a file of megabyte-long methods made a Batch object (kept, and
    sent with each retrieve and list) of hundreds of megabytes."""
    huge = "x" * 1_000_000
    lines = [line("a"), line("a" + huge), line("a" + huge), line("m", method=huge), line("u", url=[huge])]
    _, errors = read_requests(write(tmp_path / "in.jsonl", lines), URL)
    assert [e["code"] for e in errors] == ["duplicate_custom_id", "invalid_request", "mismatched_endpoint"]
    assert all(len(e["message"]) < 200 for e in errors), [len(e["message"]) for e in errors]
    assert errors[0]["message"].startswith("custom_id 'axxx") and "..." in errors[0]["message"]


def test_an_empty_file_and_a_flood_of_errors(tmp_path: Path) -> None:
    _, errors = read_requests(write(tmp_path / "empty.jsonl", ["", ""]), URL)
    assert [e["code"] for e in errors] == ["empty_file"]
    _, errors = read_requests(write(tmp_path / "bad.jsonl", ["{oops"] * (MAX_REPORTED_ERRORS + 50)), URL)
    assert len(errors) == MAX_REPORTED_ERRORS


def test_usage_is_summed_from_every_answer_shape() -> None:
    total = dict.fromkeys(USAGE_KEYS, 0)
    chat = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    add_usage(total, {"usage": chat})
    add_usage(total, {"usage": {"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 1}}})
    add_usage(total, {"usage": {"prompt_tokens": 6, "total_tokens": 6}})  # embeddings
    add_usage(total, {"error": "no usage here"})
    add_usage(total, ["not", "an", "object"])
    assert total == {"input_tokens": 23, "output_tokens": 8, "cached_tokens": 5, "reasoning_tokens": 2}


def test_the_batch_object_is_what_openais_client_reads() -> None:
    batch = Batch(
        id="batch_1", endpoint=URL, input_file_id="file-1", created_at=10, expires_at=86410, model="m", total=3
    )
    batch.completed, batch.failed = 2, 1
    batch.usage["input_tokens"], batch.usage["output_tokens"] = 30, 12
    parsed = OpenAIBatch.model_validate(batch.to_json())
    assert parsed.request_counts is not None and parsed.request_counts.model_dump() == {
        "completed": 2,
        "failed": 1,
        "total": 3,
    }
    assert parsed.usage is not None and parsed.usage.total_tokens == 42
    assert parsed.errors is None and parsed.completion_window == "24h"
    batch.errors = [{"code": "empty_file", "line": None, "message": "m", "param": None}]
    assert OpenAIBatch.model_validate(batch.to_json()).errors.data[0].code == "empty_file"  # type: ignore[union-attr]


def test_a_line_over_the_body_limit_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [line("small"), line("big", body={"text": "x" * 500})])
    requests, errors = read_requests(path, URL, max_line_bytes=300)
    assert [(e["line"], e["code"]) for e in errors] == [(2, "request_too_large")]
    assert read_requests(path, URL)[1] == []  # no limit


def test_a_huge_line_is_skipped_without_being_read_whole(tmp_path: Path) -> None:
    """A line over the limit was read whole before being refused: a file of hundreds of megabytes without a
    newline took as much memory, for each batch made from it."""
    path = tmp_path / "in.jsonl"
    with path.open("wb") as handle:
        handle.write(json.dumps(line("a")).encode() + b"\n")
        handle.write(b"x" * (40 << 20) + b"\n")
        handle.write(json.dumps(line("b")).encode() + b"\n")
        handle.write(b"y" * (3 << 20))  # the last line, without a newline
    tracemalloc.start()
    try:
        requests, errors = read_requests(path, URL, max_line_bytes=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes at the peak"
    assert [(e["line"], e["code"]) for e in errors] == [(2, "request_too_large"), (4, "request_too_large")]
    assert [r.custom_id for r in requests] == ["a", "b"]
    with path.open("rb") as handle:  # each request still knows where its line is
        assert requests[1].body(handle.fileno()) == {"messages": []}
