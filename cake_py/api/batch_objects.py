"""The Batch API's objects: OpenAI's Batch object as stored (with its request counts and token usage) and a batch's
input file, read and checked line by line (OpenAI's BatchError objects for what is wrong with it)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cake_py.api.json_body import strict_loads

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_REQUESTS = 50_000  # OpenAI's most requests in one batch
MAX_REPORTED_ERRORS = 100  # of an input file that fails validation
_SKIPPED_CHUNK = 1 << 20  # the rest of a line over the limit is read past this much at a time
SHOWN_CHARS = 100  # of a bad value quoted in an error: 100 errors quoting megabyte values made a 500 MB Batch object
TERMINAL = ("failed", "completed", "expired", "cancelled")
USAGE_KEYS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")


@dataclass
class Batch:
    """OpenAI's Batch object, as stored."""

    id: str
    endpoint: str
    input_file_id: str
    created_at: int
    expires_at: int
    model: str
    metadata: dict[str, str] | None = None
    status: str = "validating"
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))
    output_ttl_s: int | None = None  # OpenAI's output_expires_after: how long its result files are kept
    # Kept for a restart: the status it is being finished with (its files are being stored), so it ends the same.
    finishing_as: str | None = None
    owner: str = ""  # the API key's owner that made it (middleware.request_owner): its requests and files are its own
    key_name: str = ""  # and that key's name: its requests' usage is counted under it
    created_ns: int = 0  # when it was made, in ns: batches of one second keep their order across restarts

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        del body["output_ttl_s"], body["finishing_as"], body["owner"], body["key_name"], body["created_ns"]
        counts = {"total": body.pop("total"), "completed": body.pop("completed"), "failed": body.pop("failed")}
        usage = body.pop("usage")
        return {
            **body,
            "object": "batch",
            "completion_window": "24h",
            "errors": {"object": "list", "data": self.errors} if self.errors is not None else None,
            "request_counts": counts,
            "usage": {
                "input_tokens": usage["input_tokens"],
                "input_tokens_details": {"cached_tokens": usage["cached_tokens"]},
                "output_tokens": usage["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": usage["reasoning_tokens"]},
                "total_tokens": usage["input_tokens"] + usage["output_tokens"],
            },
        }


def add_usage(total: dict[str, int], body: Any) -> None:
    """Counts one answer's usage: chat and completions (`prompt_tokens`…), responses (`input_tokens`…), embeddings."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return
    input_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    output_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    found = {
        "input_tokens": usage.get("prompt_tokens", usage.get("input_tokens")),
        "output_tokens": usage.get("completion_tokens", usage.get("output_tokens")),
        "cached_tokens": input_details.get("cached_tokens") if isinstance(input_details, dict) else None,
        "reasoning_tokens": output_details.get("reasoning_tokens") if isinstance(output_details, dict) else None,
    }
    for key, value in found.items():
        if isinstance(value, int):
            total[key] += value


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One request of an input file: where its line is, not its body (a 50,000-line file parsed whole held
    gigabytes of dicts while the batch ran); the body is read again when it is sent."""

    custom_id: str
    offset: int  # of its line in the input file
    size: int

    def body(self, fd: int) -> dict[str, Any]:
        """Its body, read from the input file open as `fd` (positioned reads: any thread, any order)."""
        entry = strict_loads(os.pread(fd, self.size, self.offset))
        if not isinstance(entry, dict) or not isinstance(entry.get("body"), dict):
            raise ValueError(f"line of {self.custom_id!r} changed since the batch was validated")
        return entry["body"]


def read_requests(
    path: Path | int, endpoint: str, max_line_bytes: int = 0
) -> tuple[list[BatchRequest], list[dict[str, Any]]]:
    """A batch input file's requests (where each line is: bodies are read again when sent), or what is wrong with it
    (OpenAI's BatchError objects, by line). `path` may be an open descriptor, left open. A line longer than
    `max_line_bytes` (the server's body limit; 0: none) is refused as the route would refuse its body."""
    requests: list[BatchRequest] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def error(line: int | None, code: str, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "line": line, "message": message, "param": param})

    offset = number = 0
    # A line is read up to the limit, the rest skipped: a 500 MB file without a newline was one 500 MB read.
    longest = max_line_bytes + 1 if max_line_bytes else -1
    with open(path, "rb", closefd=not isinstance(path, int)) as handle:  # an open descriptor stays open
        while raw := handle.readline(longest):
            number += 1
            start, offset = offset, offset + len(raw)
            if max_line_bytes and len(raw) > max_line_bytes:
                rest = raw
                while not rest.endswith(b"\n") and (rest := handle.readline(_SKIPPED_CHUNK)):
                    offset += len(rest)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            if not raw.strip():
                continue
            if max_line_bytes and len(raw) > max_line_bytes:
                error(number, "request_too_large", f"line {number} is over the {max_line_bytes}-byte request limit")
                continue
            try:
                entry = strict_loads(raw)
            except (ValueError, RecursionError):
                error(number, "invalid_json_line", f"line {number} is not valid JSON")
                continue
            if not isinstance(entry, dict):
                error(number, "invalid_request", f"line {number} is not a JSON object")
                continue
            custom_id, body = entry.get("custom_id"), entry.get("body")
            if not isinstance(custom_id, str) or not custom_id:
                error(number, "invalid_request", f"line {number} has no custom_id (a non-empty string)", "custom_id")
            elif custom_id in seen:
                error(
                    number, "duplicate_custom_id", f"custom_id {_shown(custom_id)} is used more than once", "custom_id"
                )
            elif entry.get("method") != "POST":
                error(number, "invalid_request", f"method must be POST, got {_shown(entry.get('method'))}", "method")
            elif entry.get("url") != endpoint:
                error(
                    number,
                    "mismatched_endpoint",
                    f"url {_shown(entry.get('url'))} is not the batch's {endpoint}",
                    "url",
                )
            elif not isinstance(body, dict):
                error(number, "invalid_request", f"line {number}'s body is not a JSON object", "body")
            else:
                seen.add(custom_id)
                requests.append(BatchRequest(custom_id, start, len(raw)))
                if len(requests) > MAX_REQUESTS:
                    error(None, "too_many_requests", f"a batch holds at most {MAX_REQUESTS} requests")
                    break
    if not requests and not errors:
        error(None, "empty_file", "the input file holds no requests")
    return requests, errors


def _shown(value: Any) -> str:
    """A bad value as an error quotes it: its repr, cut short."""
    shown = repr(value)
    return shown if len(shown) <= SHOWN_CHARS else f"{shown[:SHOWN_CHARS]}..."
