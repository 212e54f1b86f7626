"""OpenAI's Files API, which the Batch API reads its requests from and writes its results to: POST /v1/files
(multipart `file`, `purpose`, optional `expires_after[anchor]`/`expires_after[seconds]`), GET /v1/files (`purpose`,
`order`, `limit` up to 10,000, `after`), GET and DELETE /v1/files/{id}, GET /v1/files/{id}/content. Stored on disk
by `file_store.FileStore`."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from typing import BinaryIO
from urllib.parse import quote

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cake_py.api.errors import ApiError
from cake_py.api.file_store import (
    BATCH_FILE_TTL_S,
    MAX_TTL_S,
    MIN_TTL_S,
    UPLOAD_PURPOSES,
    FileStore,
    FileTooLargeError,
    StorageFullError,
    StoredFile,
)
from cake_py.api.listing import list_page
from cake_py.api.middleware import request_owner
from cake_py.api.state import ServerState

MAX_LISTED = 10_000  # OpenAI's most files per page, and its default
UPLOAD_PATH = "/v1/files"
FORM_OVERHEAD_BYTES = 64 * 1024  # an upload's body: the file, its form fields and boundaries
CONTENT_CHUNK = 64 * 1024  # what a download reads at a time, as Starlette's FileResponse does


def store_of(request: Request) -> FileStore:
    state: ServerState = request.app.state.cake
    return state.files


async def stored_file(store: FileStore, file_id: str, owner: str) -> StoredFile:
    """The file, if `owner` made it (another key's is not found)."""
    try:
        stored = await run_in_threadpool(store.get, file_id)
    except KeyError:
        stored = None
    if stored is None or stored.owner != owner:
        raise ApiError(404, f"no file with id {file_id!r}"[:300])
    return stored


def _ttl(expires_after: dict[str, str], purpose: str) -> int | None:
    """Seconds until the file expires: `expires_after` (anchored at `created_at`), else 30 days for batch input."""
    if not expires_after:
        return BATCH_FILE_TTL_S if purpose == "batch" else None
    if expires_after.get("anchor") != "created_at":
        raise ApiError(400, f"expires_after[anchor] must be 'created_at', got {expires_after.get('anchor')!r}"[:300])
    seconds = expires_after.get("seconds", "")
    # ASCII digits, few enough for int(): str.isdigit() also takes "²", which int() refuses.
    if not re.fullmatch(r"[0-9]{1,12}", seconds) or not MIN_TTL_S <= int(seconds) <= MAX_TTL_S:
        raise ApiError(
            400, f"expires_after[seconds] must be an integer from {MIN_TTL_S} to {MAX_TTL_S}, got {seconds!r}"[:300]
        )
    return int(seconds)


async def upload_file(request: Request) -> Response:
    store = store_of(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "upload a file as multipart/form-data with the fields file and purpose")
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "the field file (the file's content) is missing")
        if purpose not in UPLOAD_PURPOSES:
            raise ApiError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}, got {purpose!r}"[:300])
        if "expires_after" in form:  # a plain field would be ignored: the file would not expire when told
            raise ApiError(400, "send expires_after as two fields, expires_after[anchor] and expires_after[seconds]")
        if len(form.getlist("purpose")) > 1:
            raise ApiError(400, "purpose was sent more than once: send it once")
        prefix = "expires_after["
        expires_after = {
            key[len(prefix) : -1]: value
            for key, value in form.items()
            if key.startswith(prefix) and key.endswith("]") and isinstance(value, str)
        }
        ttl = _ttl(expires_after, purpose)
        filename = upload.filename or "upload"
        try:
            stored = await run_in_threadpool(store.add, upload.file, filename, purpose, ttl, request_owner(request))
        except (FileTooLargeError, StorageFullError) as error:
            raise ApiError(413, str(error)) from None
    return JSONResponse(stored.to_json())


async def list_files(request: Request) -> Response:
    purpose = request.query_params.get("purpose")
    store, owner = store_of(request), request_owner(request)
    files = await run_in_threadpool(store.list, owner, purpose, newest_first=False)
    page = list_page(
        request.query_params,
        [f.to_json() for f in files],
        what="file",
        default_limit=MAX_LISTED,
        max_limit=MAX_LISTED,
        cursor=lambda file_id: store.position_of_gone(file_id, owner, files),
    )
    return JSONResponse(page)


async def retrieve_file(request: Request) -> Response:
    stored = await stored_file(store_of(request), request.path_params["file_id"], request_owner(request))
    return JSONResponse(stored.to_json())


async def delete_file(request: Request) -> Response:
    file_id = request.path_params["file_id"]
    await stored_file(store_of(request), file_id, request_owner(request))  # a 404 for another key's
    if not await run_in_threadpool(store_of(request).delete, file_id):
        raise ApiError(404, f"no file with id {file_id!r}"[:300])
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


async def file_content(request: Request) -> Response:
    store = store_of(request)
    stored = await stored_file(store, request.path_params["file_id"], request_owner(request))
    # Opened once and read from that handle: a deletion after the lookup either comes first (the open fails: the
    # 404 of a missing file) or finds it open (POSIX keeps an open file's data: it is served whole). Reading by
    # path, as FileResponse does, answered a 500 when the file went between the lookup and its stat.
    try:
        handle = await run_in_threadpool(store.open_bytes, stored)
    except KeyError:
        raise ApiError(404, f"no file with id {stored.id!r}") from None
    size = os.fstat(handle.fileno()).st_size
    return StreamingResponse(
        _chunks(handle),
        media_type="application/octet-stream",
        headers={"content-length": str(size), "content-disposition": _attachment(stored.filename)},
        background=BackgroundTask(handle.close),  # also when the body was never read (closing twice is harmless)
    )


async def _chunks(handle: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await run_in_threadpool(handle.read, CONTENT_CHUNK):
            yield chunk
    finally:
        handle.close()  # a client that left mid-way: the stream is cancelled here


def _attachment(filename: str) -> str:
    """Content-Disposition for a download named `filename`, as Starlette's FileResponse writes it."""
    quoted = quote(filename)
    return f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'


ROUTES = [
    Route(UPLOAD_PATH, upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", retrieve_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
]
