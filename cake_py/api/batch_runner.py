"""The Batch API's runs: a batch's requests (a JSONL file from the Files API) go through this server's own routes,
and their answers become its output and error files.

Each request is sent to the route the batch names, in process (the routes and their error handlers, without the
HTTP middleware: the batch was authenticated once, when it was created), with vLLM's `priority` 1 unless it sets
one: waiting for a slot, it starts after interactive requests (0). At most `concurrency` batch requests (of every
batch together) run at once, so interactive requests keep slots of their own. An answer of 429 or 503 (queue full,
a stage down, the model being switched) is tried again later, until the batch expires 24 hours after it was
created; other answers are results: 2xx to the output file, the rest to the error file, one line each
(`{id, custom_id, response: {status_code, request_id, body}, error}`), in the order they finish.

Everything lives under `<files-dir>/batches/`: each batch's record (`<id>.json`, OpenAI's Batch object) and, while
it runs, the lines answered so far (`<id>.output.jsonl`, `<id>.errors.jsonl`). A server stopped mid-batch picks it
up where it was when it starts again: requests already answered are not sent again (those it was answering when
it stopped are). A run ends by storing those lines as its result files (`_finish`), whatever ends it: all answered,
expired, cancelled, or failed (its input file gone, a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cake_py.api.batch_objects import TERMINAL, USAGE_KEYS, Batch, BatchRequest, add_usage, read_requests
from cake_py.api.errors import DISK_FULL
from cake_py.api.file_store import BATCH_OUTPUT, FileStore, write_json
from cake_py.api.inprocess import Routes
from cake_py.api.middleware import Caller
from cake_py.api.records import from_record

log = logging.getLogger(__name__)

COMPLETION_WINDOW_S = 24 * 3600  # "24h", the only window OpenAI offers
BATCH_PRIORITY = 1  # vLLM's priority of a batch request that sets none (interactive ones are 0)
RETRY_S = 2.0  # before sending again a request answered 429 or 503
SAVE_EVERY_S = 1.0  # a running batch's record is rewritten at most this often (its counts)
RETRIED = (429, 503)
_APPEND_LOCK = threading.Lock()  # result lines are appended from worker threads: one whole line at a time


def _complete_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The result lines a run wrote before it stopped, read one at a time (read whole, a 50,000-answer batch's lines
    held gigabytes as it finished); a line cut short by a crash is dropped (and the file is rewritten without it,
    so that lines appended next stay whole)."""
    if not path.exists():
        return
    cut = False
    with open(path, "rb") as handle:
        for raw in handle:
            if (line := _whole_line(raw)) is None:
                cut = True
            else:
                yield line
    if cut:
        mended = path.with_name(f".{path.name}.{secrets.token_hex(4)}")  # a crash leaves it to _load to remove
        with open(path, "rb") as source, open(mended, "wb") as target:
            target.writelines(raw for raw in source if _whole_line(raw) is not None)
        os.replace(mended, path)


def _whole_line(raw: bytes) -> dict[str, Any] | None:
    """A result line, unless it was cut short."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line if raw.endswith(b"\n") and isinstance(line, dict) else None


class BatchRunner:
    """Batches by id, and the task running each one that has not ended."""

    def __init__(
        self,
        directory: Path,
        files: FileStore,
        routes: Routes,
        concurrency: int,
        max_line_bytes: int = 0,
    ) -> None:
        self.directory = directory / "batches"
        self.files = files
        self.routes = routes
        self.slots = asyncio.Semaphore(max(1, concurrency))  # shared by every batch
        self.max_line_bytes = max_line_bytes
        self._batches: dict[str, Batch] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sending: set[str] = set()  # batches whose run may be cancelled where it is (not while finishing)
        self._writes: dict[str, set[asyncio.Future[None]]] = {}  # result lines still being appended, by batch
        self._saved: dict[str, float] = {}
        self._versions: dict[str, int] = {}  # records are written from threads: an older one never overwrites
        self._written: dict[str, int] = {}
        self._write_lock = threading.Lock()

    # --- the records -------------------------------------------------------------------------------------------

    def get(self, batch_id: str) -> Batch | None:
        return self._batches.get(batch_id)

    def all(self) -> list[Batch]:
        """Oldest first (the same order after a restart: the second alone ties batches made together)."""
        return sorted(self._batches.values(), key=lambda b: (b.created_at, b.created_ns, b.id))

    async def _save(self, batch: Batch, *, now: bool = True) -> None:
        """Writes the batch's record as it is at this call (`now` False: unless one was written within a second)."""
        if not now and time.monotonic() - self._saved.get(batch.id, 0.0) < SAVE_EVERY_S:
            return
        self._saved[batch.id] = time.monotonic()
        version = self._versions[batch.id] = self._versions.get(batch.id, 0) + 1
        record = asdict(batch)

        def write() -> None:
            with self._write_lock:
                if self._written.get(batch.id, 0) < version:
                    write_json(self.directory / f"{batch.id}.json", record)
                    self._written[batch.id] = version

        await asyncio.to_thread(write)

    def _load(self) -> list[Batch]:
        for partial in self.directory.glob(".batch_*"):  # a record write a crash cut short (one server per folder)
            partial.unlink(missing_ok=True)
        batches = []
        for path in sorted(self.directory.glob("batch_*.json")):
            try:
                batches.append(from_record(Batch, json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, RecursionError) as error:
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

    async def create(self, batch: Batch) -> None:
        await self._save(batch)  # first: a batch whose record cannot be written (a full disk) is not made at all
        self._batches[batch.id] = batch
        self._launch(batch)

    async def cancel(self, batch: Batch) -> None:
        """A running batch stops sending requests and ends `cancelled` with what was answered (as OpenAI's does,
        through `cancelling`). One being finished (`finalizing`) ends as it was going to."""
        if batch.status in ("validating", "in_progress"):
            batch.status, batch.cancelling_at = "cancelling", int(time.time())
            if batch.id in self._sending:  # else its run sees the status before it sends anything, or is finishing
                self._tasks[batch.id].cancel("cancelled")
            await self._save(batch)

    def _launch(self, batch: Batch) -> None:
        task = asyncio.get_running_loop().create_task(self._run(batch), name=f"cake-{batch.id}")
        self._tasks[batch.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch.id, None))

    # --- a run ---------------------------------------------------------------------------------------------------

    def _partial(self, batch: Batch, kind: str) -> Path:
        return self.directory / f"{batch.id}.{kind}.jsonl"

    async def _run(self, batch: Batch) -> None:
        try:
            await self._run_once(batch)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug, or a full disk: the batch fails, saying so, instead of hanging
            log.exception("batch %s failed", batch.id)
            failure = {"code": "internal_error", "line": None, "param": None, "message": _describe(error)}
            try:
                await self._finish(batch, "failed", errors=[failure])
            except Exception as finish_error:  # its files cannot be stored either: failed here, retried at restart
                log.error("batch %s: its results cannot be stored: %s", batch.id, _describe(finish_error))
                batch.status, batch.errors, batch.failed_at = "failed", [failure], int(time.time())

    async def _run_once(self, batch: Batch) -> None:
        if batch.finishing_as is not None or batch.status in ("finalizing", "cancelling"):
            # a restart: it had answered what it would (finishing_as: the end it was being given)
            await self._finish(batch, batch.finishing_as or "cancelled")
            return
        try:
            path = await asyncio.to_thread(self.files.path, batch.input_file_id)
            # Bodies are read as they are sent, through this descriptor: the file may be deleted meanwhile.
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        except (KeyError, FileNotFoundError):
            if batch.status == "cancelling":  # cancelled while it was looked up: it ends as the cancel promised
                await self._finish(batch, "cancelled")
                return
            message = f"input file {batch.input_file_id!r} no longer exists"
            error = {"code": "missing_file", "line": None, "param": "input_file_id", "message": message}
            await self._finish(batch, "failed", errors=[error])  # with what an earlier run answered
            return
        try:
            await self._run_input(batch, fd)
        finally:
            os.close(fd)

    async def _run_input(self, batch: Batch, fd: int) -> None:
        requests, errors = await asyncio.to_thread(read_requests, fd, batch.endpoint, self.max_line_bytes)
        # Cancelled while it was being read: it ends cancelled, as OpenAI's cancel promises (`cancelling`, then
        # `cancelled`), whatever the validation found; nothing was sent. A bad file used to end it `failed`.
        if batch.status == "cancelling":
            await self._finish(batch, "cancelled")
            return
        if errors:
            await self._finish(batch, "failed", errors=errors)
            return
        if batch.status == "validating":
            batch.status, batch.in_progress_at, batch.total = "in_progress", int(time.time()), len(requests)
            await self._save(batch)
        output, error_lines = self._partial(batch, "output"), self._partial(batch, "errors")
        answered, batch.completed, batch.failed, batch.usage = await asyncio.to_thread(_recount, output, error_lines)
        pending = [request for request in requests if request.custom_id not in answered]
        unsent: list[BatchRequest] = []
        self._sending.add(batch.id)  # a cancel from here on cancels the run; one before it is seen just below
        try:
            if batch.status != "cancelling":  # cancelled while its answers so far were counted: none is sent
                unsent = await self._send_all(batch, pending, fd)
        except asyncio.CancelledError:
            if batch.status != "cancelling":
                raise  # a shutdown: the record stays as it is, to be resumed
        finally:
            self._sending.discard(batch.id)
        if batch.status == "cancelling":
            await self._finish(batch, "cancelled")
        else:
            await self._finish(batch, "expired" if unsent else "completed", unsent)

    async def _send_all(self, batch: Batch, pending: list[BatchRequest], fd: int) -> list[BatchRequest]:
        """Sends the requests as slots free up; returns those not sent before the batch expired."""
        async with asyncio.TaskGroup() as group:
            for index, request in enumerate(pending):
                await self.slots.acquire()
                if time.time() >= batch.expires_at:
                    self.slots.release()
                    return pending[index:]
                # Given back when the task ends, also one cancelled before it starts (its `finally` never runs):
                # the task group cancels its new tasks when a request fails the batch (a full disk).
                group.create_task(self._send(batch, request, fd)).add_done_callback(lambda _: self.slots.release())
        return []

    async def _send(self, batch: Batch, request: BatchRequest, fd: int) -> None:
        try:
            status, answer = await self._answer(batch, await asyncio.to_thread(request.body, fd))
        except Exception as error:  # a request the in-process call cannot carry (a bug): its line, not the batch's end
            log.exception("batch %s: request %r failed", batch.id, request.custom_id)
            status, answer = 500, {"error": f"internal error: {type(error).__name__}: {error}"[:300]}
        line = {
            "id": f"batch_req_{secrets.token_hex(12)}",
            "custom_id": request.custom_id,
            "response": {"status_code": status, "request_id": f"req_{secrets.token_hex(12)}", "body": answer},
            "error": None,
        }
        succeeded = 200 <= status < 300
        # Written even if the batch is cancelled meanwhile (its answer is in); _finish waits for it.
        write = asyncio.ensure_future(
            asyncio.to_thread(_append, self._partial(batch, "output" if succeeded else "errors"), [line])
        )
        writes = self._writes.setdefault(batch.id, set())
        writes.add(write)
        write.add_done_callback(writes.discard)
        await asyncio.shield(write)
        if succeeded:
            batch.completed += 1
            add_usage(batch.usage, answer)
        else:
            batch.failed += 1
        await self._save(batch, now=False)

    async def _answer(self, batch: Batch, body: dict[str, Any]) -> tuple[int, Any]:
        body.setdefault("priority", BATCH_PRIORITY)
        if batch.endpoint == "/v1/responses":
            body.setdefault("store", False)  # its answer is in the output file: kept there, not in the response store
        for field in ("stream", "background"):
            if body.get(field):
                return 400, {"error": f"{field} is not supported in a batch: its answer goes to a file"}
        status, answer = await self.routes.post(batch.endpoint, body, caller=Caller(batch.owner, batch.key_name))
        while status in RETRIED and time.time() < batch.expires_at:
            await asyncio.sleep(RETRY_S)
            status, answer = await self.routes.post(batch.endpoint, body, caller=Caller(batch.owner, batch.key_name))
        return status, answer

    async def _finish(
        self,
        batch: Batch,
        status: str,
        unsent: list[BatchRequest] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        """Output and error files from the lines answered (and, when it expired, an error line for each request
        never sent), then the final status. A restart in the middle finishes it again, the same way."""
        pending = self._writes.get(batch.id)
        if pending:
            await asyncio.wait(pending)
        output, error_lines = self._partial(batch, "output"), self._partial(batch, "errors")
        if unsent:
            expired = [
                {
                    "id": f"batch_req_{secrets.token_hex(12)}",
                    "custom_id": request.custom_id,
                    "response": None,
                    "error": {"code": "batch_expired", "message": "the batch expired before this request was sent"},
                }
                for request in unsent
            ]
            await asyncio.to_thread(_append, error_lines, expired)
        if errors is not None:
            batch.errors = errors
        batch.finishing_as = status
        if status in ("completed", "expired"):  # cancelled ones show cancelling meanwhile, failed ones their stage
            batch.status, batch.finalizing_at = "finalizing", int(time.time())
        await self._save(batch)

        def store() -> tuple[str | None, str | None, int, int, dict[str, int]]:
            _, completed, failed, usage = _recount(output, error_lines)
            ids = []
            for path, kind in ((output, "output"), (error_lines, "error")):
                lines = (json.dumps(line).encode() + b"\n" for line in _complete_lines(path))
                first = next(lines, None)
                name = f"{batch.id}_{kind}.jsonl"
                # One id per batch and kind: a finish cut short by a restart replaces what it stored, not twice.
                seed = f"{batch.id}:{kind}"
                kept = (
                    self.files.add_lines(
                        itertools.chain([first], lines),
                        name,
                        BATCH_OUTPUT,
                        batch.output_ttl_s,
                        batch.owner,
                        name_seed=seed,
                    )
                    if first is not None
                    else None
                )
                ids.append(kept.id if kept is not None else None)
            return ids[0], ids[1], completed, failed, usage

        batch.output_file_id, batch.error_file_id, batch.completed, batch.failed, batch.usage = await asyncio.to_thread(
            store
        )
        batch.status, batch.finishing_as = status, None
        setattr(batch, f"{status}_at", int(time.time()))
        await self._save(batch)
        for path in (output, error_lines):
            with contextlib.suppress(OSError):
                await asyncio.to_thread(path.unlink)


def _describe(error: BaseException) -> str:
    """What a failed run says: the first error inside a task group's, a full disk in words."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return "the server's disk is full: the batch's results could not be written"
    return f"internal error: {type(error).__name__}: {error}"[:300]


def _recount(output: Path, errors: Path) -> tuple[set[str], int, int, dict[str, int]]:
    """What a run's result lines hold: the custom ids answered, how many succeeded and failed, their usage."""
    answered: set[str] = set()
    completed = failed = 0
    usage = dict.fromkeys(USAGE_KEYS, 0)
    for line in _complete_lines(output):
        answered.add(str(line.get("custom_id")))
        completed += 1
        add_usage(usage, (line.get("response") or {}).get("body"))
    for line in _complete_lines(errors):
        answered.add(str(line.get("custom_id")))
        failed += 1
    return answered, completed, failed, usage


def _append(path: Path, lines: list[dict[str, Any]]) -> None:
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    with _APPEND_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as handle:
            handle.write(data)
