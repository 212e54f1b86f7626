"""The Files API's storage: uploaded files and the Batch API's result files, on disk under `--files-dir`.

Each file is two entries in `<files-dir>/files/`: its bytes under its id, and its metadata (OpenAI's File object)
in `<id>.json`, written after the bytes and atomically, so a file without metadata is an unfinished upload and
is ignored. A restarted server lists what it stored before. Ids are checked against their one shape before they
name a path. Files may expire (`expires_after`; OpenAI expires `batch` files after 30 days by default): expired
ones are removed when the store is next read. Every method does file I/O: call them off the event loop.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from cake_py.errors import RequestError

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")  # what a client may upload
BATCH_OUTPUT = "batch_output"  # the purpose of a batch's output and error files
BATCH_FILE_TTL_S = 30 * 24 * 3600  # OpenAI's default lifetime of a `batch` file
MIN_TTL_S, MAX_TTL_S = 3600, 30 * 24 * 3600  # OpenAI's bounds for expires_after.seconds
_ID = re.compile(r"file-[0-9a-f]{24}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int | None = None
    stored_ns: int = 0  # when it was stored, in ns: files of one second keep their order across restarts
    owner: str = ""  # the API key's owner that made it (middleware.request_owner): only it sees it

    def to_json(self) -> dict[str, object]:
        """OpenAI's File object (`status` is deprecated there; a stored file here is always `processed`)."""
        shown = asdict(self)
        del shown["stored_ns"], shown["owner"]
        return {**shown, "object": "file", "status": "processed", "status_details": None}


class FileTooLargeError(RequestError):
    pass


class FileStore:
    """Files by id in one directory (created on the first write)."""

    def __init__(self, directory: Path, max_file_bytes: int) -> None:
        self.directory = directory / "files"
        self.max_file_bytes = max_file_bytes
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] | None = None  # read from disk on first use

    def _index(self) -> dict[str, StoredFile]:
        if self._files is None:
            files: dict[str, StoredFile] = {}
            if self.directory.is_dir():
                for meta in self.directory.glob("file-*.json"):
                    try:
                        stored = StoredFile(**json.loads(meta.read_text()))
                    except (OSError, ValueError, TypeError):
                        continue  # not one of ours, or damaged: not listed
                    if _ID.fullmatch(stored.id) and (self.directory / stored.id).is_file():
                        files[stored.id] = stored
            self._files = files
        now = time.time()
        for stored in [f for f in self._files.values() if f.expires_at is not None and f.expires_at <= now]:
            self._remove(stored.id)
        return self._files

    def path(self, file_id: str) -> Path:
        """Where a stored file's bytes are; KeyError when there is no such file."""
        return self.bytes_of(self.get(file_id))

    def bytes_of(self, stored: StoredFile) -> Path:
        return self.directory / stored.id

    def get(self, file_id: str) -> StoredFile:
        """KeyError when no file has this id (or it expired)."""
        with self._lock:
            if not _ID.fullmatch(file_id):
                raise KeyError(file_id)
            return self._index()[file_id]

    def list(self, owner: str, purpose: str | None = None, *, newest_first: bool = True) -> list[StoredFile]:
        with self._lock:
            files = [
                f for f in self._index().values() if f.owner == owner and (purpose is None or f.purpose == purpose)
            ]
        return sorted(files, key=lambda f: (f.created_at, f.stored_ns), reverse=newest_first)

    def add(self, source: BinaryIO, filename: str, purpose: str, ttl_s: int | None, owner: str = "") -> StoredFile:
        """Store what `source` holds; FileTooLargeError past `max_file_bytes` (nothing is kept then)."""

        def copy(target: BinaryIO) -> None:
            size = 0
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if self.max_file_bytes and size > self.max_file_bytes:
                    raise FileTooLargeError(
                        f"file {filename!r} is over the {self.max_file_bytes}-byte limit (--max-file-mb)"
                    )
                target.write(chunk)

        return self._store(copy, filename, purpose, ttl_s, owner)

    def add_lines(
        self, lines: Iterable[bytes], filename: str, purpose: str, ttl_s: int | None, owner: str = ""
    ) -> StoredFile:
        """Store lines (each ending in a newline) as one file: a batch's results."""

        def write(target: BinaryIO) -> None:
            for line in lines:
                target.write(line)

        return self._store(write, filename, purpose, ttl_s, owner)

    def _store(
        self, fill: Callable[[BinaryIO], None], filename: str, purpose: str, ttl_s: int | None, owner: str
    ) -> StoredFile:
        self.directory.mkdir(parents=True, exist_ok=True)
        file_id = f"file-{secrets.token_hex(12)}"
        target = self.directory / file_id
        try:
            with open(target, "wb") as handle:
                fill(handle)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        stored_ns = time.time_ns()
        now = stored_ns // 1_000_000_000
        expires = now + ttl_s if ttl_s is not None else None
        stored = StoredFile(file_id, target.stat().st_size, now, filename, purpose, expires, stored_ns, owner)
        _write_json(self.directory / f"{file_id}.json", asdict(stored))
        with self._lock:
            self._index()[file_id] = stored
        return stored

    def delete(self, file_id: str) -> bool:
        with self._lock:
            if not _ID.fullmatch(file_id) or file_id not in self._index():
                return False
            self._remove(file_id)
            return True

    def _remove(self, file_id: str) -> None:
        assert self._files is not None
        del self._files[file_id]
        (self.directory / f"{file_id}.json").unlink(missing_ok=True)  # first: without it the bytes are not listed
        (self.directory / file_id).unlink(missing_ok=True)


def _write_json(path: Path, value: object) -> None:
    """Write JSON so that a reader (or a crash) sees the old content or the new, never half of it."""
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, value)
