"""The Batch API's runs: a batch's requests (a JSONL file from the Files API) go through this server's own routes,
and their answers become its output and error files.

Each request is sent to the route the batch names, in process (the routes and their error handlers, without the
HTTP middleware: the batch was authenticated and rate limited once, when it was created), with vLLM's `priority`
1 unless it sets one: waiting for a slot, it starts after interactive requests (0). At most `concurrency` of a
batch's requests run at once, so interactive requests keep slots of their own. An answer of 429 or 503 (queue
full, a stage down, the model being switched) is tried again later, until the batch expires 24 hours after it was
created; other answers are results: 2xx to the output file, the rest to the error file, one line each
(`{id, custom_id, response: {status_code, request_id, body}, error}`), in the order they finish.

Everything lives under `<files-dir>/batches/`: each batch's record (`<id>.json`, OpenAI's Batch object) and, while
it runs, the lines answered so far (`<id>.output.jsonl`, `<id>.errors.jsonl`). A server stopped mid-batch picks it
up where it was when it starts again: requests already answered are not sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message

from cake_py.api.batch_objects import TERMINAL, USAGE_KEYS, Batch, BatchRequest, add_usage, read_requests
from cake_py.api.file_store import BATCH_OUTPUT, FileStore, write_json

log = logging.getLogger(__name__)

COMPLETION_WINDOW_S = 24 * 3600  # "24h", the only window OpenAI offers
BATCH_PRIORITY = 1  # vLLM's priority of a batch request that sets none (interactive ones are 0)
RETRY_S = 2.0  # before sending again a request answered 429 or 503
SAVE_EVERY_S = 1.0  # a running batch's record is rewritten at most this often (its counts)
RETRIED = (429, 503)


def _complete_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The result lines a run wrote before it stopped; a line cut short by a crash is dropped (and the file is
    rewritten without it, so that lines appended next stay whole)."""
    if not path.exists():
        return
    kept, lines = [], []
    for raw in path.read_bytes().splitlines(keepends=True):
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if raw.endswith(b"\n") and isinstance(line, dict):
            kept.append(raw)
            lines.append(line)
    path.write_bytes(b"".join(kept))
    yield from lines


class BatchRunner:
    """Batches by id, and the task running each one that has not ended."""

    def __init__(self, directory: Path, files: FileStore, app: ASGIApp, dispatch: ASGIApp, concurrency: int) -> None:
        self.directory = directory / "batches"
        self.files = files
        self.app = app  # what the routes find as request.app
        self.dispatch = dispatch  # the routes with their error handlers
        self.concurrency = max(1, concurrency)
        self._batches: dict[str, Batch] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._saved: dict[str, float] = {}

    # --- the records -------------------------------------------------------------------------------------------

    def get(self, batch_id: str) -> Batch | None:
        return self._batches.get(batch_id)

    def all(self) -> list[Batch]:
        """Oldest first."""
        return sorted(self._batches.values(), key=lambda b: b.created_at)

    async def _save(self, batch: Batch, *, now: bool = True) -> None:
        if not now and time.monotonic() - self._saved.get(batch.id, 0.0) < SAVE_EVERY_S:
            return
        self._saved[batch.id] = time.monotonic()
        await asyncio.to_thread(write_json, self.directory / f"{batch.id}.json", asdict(batch))

    def _load(self) -> list[Batch]:
        batches = []
        for path in sorted(self.directory.glob("batch_*.json")):
            try:
                batches.append(Batch(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as error:
                log.warning("batch record %s is unreadable, skipped: %s", path, error)
        return batches

    # --- lifetime ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Reads the stored batches; the ones that had not ended run again from where they stopped."""
        if not self.directory.is_dir():
            return
        for batch in await asyncio.to_thread(self._load):
            self._batches[batch.id] = batch
            if batch.status not in TERMINAL:
                self._launch(batch)

    def stop_soon(self) -> None:
        """Stops every run where it is (a shutdown): its record keeps its status, so the next start resumes it."""
        for task in self._tasks.values():
            task.cancel("shutdown")

    async def stop(self) -> None:
        self.stop_soon()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def create(self, endpoint: str, input_file_id: str, metadata: dict[str, str] | None, model: str) -> Batch:
        now = int(time.time())
        batch = Batch(
            id=f"batch_{secrets.token_hex(12)}",
            endpoint=endpoint,
            input_file_id=input_file_id,
            created_at=now,
            expires_at=now + COMPLETION_WINDOW_S,
            model=model,
            metadata=metadata,
        )
        self._batches[batch.id] = batch
        await self._save(batch)
        self._launch(batch)
        return batch

    async def cancel(self, batch: Batch) -> None:
        """A running batch stops sending requests and ends `cancelled` with what was answered (as OpenAI's does,
        through `cancelling`)."""
        if batch.status in ("validating", "in_progress"):
            batch.status, batch.cancelling_at = "cancelling", int(time.time())
            await self._save(batch)
            task = self._tasks.get(batch.id)
            if task is not None:
                task.cancel("cancelled")

    def _launch(self, batch: Batch) -> None:
        task = asyncio.get_running_loop().create_task(self._run(batch), name=f"cake-{batch.id}")
        self._tasks[batch.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch.id, None))

    # --- a run ---------------------------------------------------------------------------------------------------

    def _partial(self, batch: Batch, kind: str) -> Path:
        return self.directory / f"{batch.id}.{kind}.jsonl"

    async def _run(self, batch: Batch) -> None:
        try:
            if batch.status in ("finalizing", "cancelling"):  # a restart: it had answered what it would
                await self._finish(batch, "completed" if batch.status == "finalizing" else "cancelled", [])
                return
            try:
                path = self.files.path(batch.input_file_id)
            except KeyError:
                message = f"input file {batch.input_file_id!r} no longer exists"
                await self._fail(
                    batch, [{"code": "missing_file", "line": None, "param": "input_file_id", "message": message}]
                )
                return
            requests, errors = await asyncio.to_thread(read_requests, path, batch.endpoint)
            if errors:
                await self._fail(batch, errors)
                return
            if batch.status == "validating":
                batch.status, batch.in_progress_at, batch.total = "in_progress", int(time.time()), len(requests)
                await self._save(batch)
            answered = await asyncio.to_thread(self._recount, batch)
            pending = [request for request in requests if request.custom_id not in answered]
            unsent = await self._send_all(batch, pending)
            await self._finish(batch, "expired" if unsent else "completed", unsent)
        except asyncio.CancelledError:
            if batch.status != "cancelling":
                raise  # a shutdown: the record stays as it is, to be resumed
            await self._finish(batch, "cancelled", [])
        except Exception as error:  # a bug: the batch fails, saying so, instead of hanging in_progress
            log.exception("batch %s failed", batch.id)
            message = f"internal error: {type(error).__name__}: {error}"[:300]
            await self._fail(batch, [{"code": "internal_error", "line": None, "param": None, "message": message}])

    def _recount(self, batch: Batch) -> set[str]:
        """The custom ids answered by an earlier run of this batch; its counts and usage counted again from them."""
        answered: set[str] = set()
        batch.completed = batch.failed = 0
        batch.usage = dict.fromkeys(USAGE_KEYS, 0)
        for kind in ("output", "errors"):
            for line in _complete_lines(self._partial(batch, kind)):
                answered.add(str(line.get("custom_id")))
                if kind == "output":
                    batch.completed += 1
                    add_usage(batch.usage, (line.get("response") or {}).get("body"))
                else:
                    batch.failed += 1
        return answered

    async def _send_all(self, batch: Batch, pending: list[BatchRequest]) -> list[BatchRequest]:
        """Sends the requests, `concurrency` at a time; returns those not sent before the batch expired."""
        slots = asyncio.Semaphore(self.concurrency)
        write_lock = asyncio.Lock()
        async with asyncio.TaskGroup() as group:
            for index, request in enumerate(pending):
                await slots.acquire()
                if time.time() >= batch.expires_at:
                    slots.release()
                    return pending[index:]
                group.create_task(self._send(batch, request, slots, write_lock))
        return []

    async def _send(self, batch: Batch, request: BatchRequest, slots: asyncio.Semaphore, lock: asyncio.Lock) -> None:
        try:
            body = dict(request.body)
            body.setdefault("priority", BATCH_PRIORITY)
            if body.get("stream") or body.get("background"):
                which = "stream" if body.get("stream") else "background"
                status, answer = 400, {"error": f"{which} is not supported in a batch: its answer goes to a file"}
            else:
                status, answer = await self.call(batch.endpoint, body)
                while status in RETRIED and time.time() < batch.expires_at:
                    await asyncio.sleep(RETRY_S)
                    status, answer = await self.call(batch.endpoint, body)
            line = {
                "id": f"batch_req_{secrets.token_hex(12)}",
                "custom_id": request.custom_id,
                "response": {"status_code": status, "request_id": f"req_{secrets.token_hex(12)}", "body": answer},
                "error": None,
            }
            succeeded = 200 <= status < 300
            async with lock:
                await asyncio.to_thread(_append, self._partial(batch, "output" if succeeded else "errors"), line)
                if succeeded:
                    batch.completed += 1
                    add_usage(batch.usage, answer)
                else:
                    batch.failed += 1
            await self._save(batch, now=False)
        finally:
            slots.release()

    async def call(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POSTs `body` to one of this server's routes, in process; its status and JSON answer."""
        payload = json.dumps(body).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": endpoint,
            "raw_path": endpoint.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            "client": ("batch", 0),
            "server": ("cake", 0),
            "app": self.app,
            "state": {},
        }
        sent_body = False
        never = asyncio.Event()  # the "client" never goes away: a cancelled batch cancels the call itself
        status, chunks = 500, []

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await never.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.dispatch(scope, receive, send)
        try:
            return status, json.loads(b"".join(chunks))
        except ValueError:
            return 500, {"error": f"the route answered {status} with a body that is not JSON"}

    async def _fail(self, batch: Batch, errors: list[dict[str, Any]]) -> None:
        batch.status, batch.failed_at, batch.errors = "failed", int(time.time()), errors
        await self._save(batch)

    async def _finish(self, batch: Batch, status: str, unsent: list[BatchRequest]) -> None:
        """Output and error files from the lines answered (and, when it expired, an error line for each request
        never sent), then the final status."""
        now = int(time.time())
        if batch.status != "cancelling":
            batch.status, batch.finalizing_at = "finalizing", now
            await self._save(batch)
        expired = [
            {
                "id": f"batch_req_{secrets.token_hex(12)}",
                "custom_id": request.custom_id,
                "response": None,
                "error": {"code": "batch_expired", "message": "the batch expired before this request was sent"},
            }
            for request in unsent
        ]
        output, errors = self._partial(batch, "output"), self._partial(batch, "errors")

        def store() -> tuple[str | None, str | None]:
            self._recount(batch)  # what the files hold, whatever a cancelled request had counted
            output_lines = [json.dumps(line).encode() + b"\n" for line in _complete_lines(output)]
            error_lines = [json.dumps(line).encode() + b"\n" for line in [*_complete_lines(errors), *expired]]
            batch.failed += len(expired)
            ids = []
            for lines, kind in ((output_lines, "output"), (error_lines, "error")):
                name = f"{batch.id}_{kind}.jsonl"
                ids.append(self.files.add_lines(lines, name, BATCH_OUTPUT, None).id if lines else None)
            return ids[0], ids[1]

        batch.output_file_id, batch.error_file_id = await asyncio.to_thread(store)
        batch.status = status
        setattr(batch, f"{status}_at", int(time.time()))
        await self._save(batch)
        for path in (output, errors):
            with contextlib.suppress(OSError):
                path.unlink()


def _append(path: Path, line: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        handle.write(json.dumps(line).encode() + b"\n")
