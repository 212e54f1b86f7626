"""The Files API's storage: uploaded files and the Batch API's result files, on disk under `--files-dir`.

Each file is two entries in `<files-dir>/files/`: its bytes under its id, and its metadata (OpenAI's File object)
in `<id>.json`, written after the bytes and atomically, so a file without metadata is an unfinished upload and
is ignored. A restarted server lists what it stored before. Ids are checked against their one shape before they
name a path. Files may expire (`expires_after`; OpenAI expires `batch` files after 30 days by default): expired
ones are removed when the store is next read. Every method does file I/O: call them off the event loop.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from cake_py.api.records import from_record
from cake_py.errors import ConfigError, RequestError

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")  # what a client may upload
BATCH_OUTPUT = "batch_output"  # the purpose of a batch's output and error files
BATCH_FILE_TTL_S = 30 * 24 * 3600  # OpenAI's default lifetime of a `batch` file
MIN_TTL_S, MAX_TTL_S = 3600, 30 * 24 * 3600  # OpenAI's bounds for expires_after.seconds
_ID = re.compile(r"file-[0-9a-f]{24}")
log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_GONE_KEPT = 100_000


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


class StorageFullError(RequestError):
    """An upload past what the store keeps for its owner (--files-max-gb)."""


class FileStore:
    """Files by id in one directory (created on the first write)."""

    def __init__(self, directory: Path, max_file_bytes: int, max_owner_bytes: int = 0) -> None:
        self.directory = directory / "files"
        self.max_file_bytes = max_file_bytes
        self.max_owner_bytes = max_owner_bytes  # of an owner's uploads and batch results together (0: no limit)
        self._lock = threading.Lock()
        self._uploading: dict[str, int] = {}  # owner → bytes of its uploads under way: two at once count both
        self._files: dict[str, StoredFile] | None = None  # read from disk on first use
        # Where deleted and expired files stood (owner, sort key): a listing in pages goes on past a page's last
        # file when it is deleted meanwhile ("list, delete each" walks); the newest _GONE_KEPT, in this process.
        self._gone: dict[str, tuple[str, tuple[int, int]]] = {}

    def _index(self) -> dict[str, StoredFile]:
        if self._files is None:
            files: dict[str, StoredFile] = {}
            if self.directory.is_dir():
                for meta in self.directory.glob("file-*.json"):
                    if (stored := _read_stored(meta, self.directory)) is not None:
                        files[stored.id] = stored
                for partial in self.directory.glob(".file-*"):  # a write a crash cut short (one server per folder)
                    partial.unlink(missing_ok=True)
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

    def open_bytes(self, stored: StoredFile) -> BinaryIO:
        """A handle on a stored file's bytes, to read it whole: a deletion after this open does not cut it short
        (the open file keeps its data); KeyError when the file went after `stored` was looked up."""
        try:
            return open(self.bytes_of(stored), "rb")  # the caller closes it once it has read it
        except FileNotFoundError:
            raise KeyError(stored.id) from None

    def get(self, file_id: str) -> StoredFile:
        """KeyError when no file has this id (or it expired, or its bytes were removed behind this server's back)."""
        with self._lock:
            if not _ID.fullmatch(file_id):
                raise KeyError(file_id)
            stored = self._index()[file_id]
            if not (self.directory / file_id).is_file():
                log.warning("stored file %s lost its content (removed outside this server): forgotten", file_id)
                self._remove(file_id)
                raise KeyError(file_id)
            return stored

    def list(self, owner: str, purpose: str | None = None, *, newest_first: bool = True) -> list[StoredFile]:
        with self._lock:
            files = [
                f for f in self._index().values() if f.owner == owner and (purpose is None or f.purpose == purpose)
            ]
        return sorted(files, key=_order, reverse=newest_first)

    def position_of_gone(self, file_id: str, owner: str, files: Sequence[StoredFile]) -> int | None:
        """How many of `files` (oldest first) were stored before the deleted or expired `file_id` of `owner`;
        None if this store does not know where it stood."""
        with self._lock:
            gone = self._gone.get(file_id)
        if gone is None or gone[0] != owner:
            return None
        return bisect.bisect_left([_order(f) for f in files], gone[1])

    def add(self, source: BinaryIO, filename: str, purpose: str, ttl_s: int | None, owner: str = "") -> StoredFile:
        """Store what `source` holds; FileTooLargeError past `max_file_bytes`, StorageFullError past what the store
        keeps for `owner` (nothing is kept then). Batch results are not refused: they count, but a batch the store
        accepted is not lost at its end."""
        counted = 0  # of this upload's bytes in self._uploading

        def copy(target: BinaryIO) -> None:
            nonlocal counted
            size = 0
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if self.max_file_bytes and size > self.max_file_bytes:
                    raise FileTooLargeError(
                        f"file {filename!r} is over the {self.max_file_bytes}-byte limit (--max-file-mb)"
                    )
                if self.max_owner_bytes:
                    counted += len(chunk)
                    self._take_room(owner, len(chunk), filename)
                target.write(chunk)

        def settle() -> None:  # under the lock: no moment where the file counts both stored and uploading
            nonlocal counted
            left, counted = self._uploading.get(owner, 0) - counted, 0
            if left > 0:
                self._uploading[owner] = left
            else:
                self._uploading.pop(owner, None)

        try:
            return self._store(copy, filename, purpose, ttl_s, owner, settle=settle)
        finally:
            with self._lock:
                settle()  # refused or failed: what it counted is given back (stored: nothing is left to give)

    def _take_room(self, owner: str, n_bytes: int, filename: str) -> None:
        """Count `n_bytes` more of an upload of `owner`'s; StorageFullError when its files would pass the limit."""
        with self._lock:
            uploading = self._uploading.get(owner, 0) + n_bytes
            self._uploading[owner] = uploading
            stored = sum(f.bytes for f in self._index().values() if f.owner == owner)
        if stored + uploading > self.max_owner_bytes:
            raise StorageFullError(
                f"file {filename!r} does not fit: the files kept for this API key hold {stored} bytes, and at most "
                f"{self.max_owner_bytes} are kept (--files-max-gb); delete some files first"
            )

    def add_lines(
        self,
        lines: Iterable[bytes],
        filename: str,
        purpose: str,
        ttl_s: int | None,
        owner: str = "",
        *,
        name_seed: str | None = None,
    ) -> StoredFile:
        """Store lines (each ending in a newline) as one file: a batch's results. With `name_seed`, the id is made
        from it, so storing the same result again (a run finished again after a restart) replaces the first."""

        def write(target: BinaryIO) -> None:
            for line in lines:
                target.write(line)

        file_id = f"file-{hashlib.sha256(name_seed.encode()).hexdigest()[:24]}" if name_seed is not None else None
        return self._store(write, filename, purpose, ttl_s, owner, file_id)

    def _store(
        self,
        fill: Callable[[BinaryIO], None],
        filename: str,
        purpose: str,
        ttl_s: int | None,
        owner: str,
        file_id: str | None = None,
        settle: Callable[[], None] | None = None,
    ) -> StoredFile:
        """Write a file with `fill` and index it; `settle` runs under the lock as it is indexed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:  # read before this write begins: a first read removes unfinished writes it finds
            self._index()
        file_id = file_id or f"file-{secrets.token_hex(12)}"
        target = self.directory / file_id
        partial = self.directory / f".{file_id}.{secrets.token_hex(4)}"
        try:
            with open(partial, "wb") as handle:
                fill(handle)
            stored_ns = time.time_ns()
            now = stored_ns // 1_000_000_000
            expires = now + ttl_s if ttl_s is not None else None
            stored = StoredFile(file_id, partial.stat().st_size, now, filename, purpose, expires, stored_ns, owner)
            os.replace(partial, target)
            _write_json(self.directory / f"{file_id}.json", asdict(stored))
        except BaseException:  # a full disk, a file over the limit: nothing of it is kept
            partial.unlink(missing_ok=True)
            if file_id not in (self._files or {}):
                target.unlink(missing_ok=True)
            raise
        with self._lock:
            self._index()[file_id] = stored
            if settle is not None:
                settle()
        return stored

    def delete(self, file_id: str) -> bool:
        with self._lock:
            if not _ID.fullmatch(file_id) or file_id not in self._index():
                return False
            self._remove(file_id)
            return True

    def _remove(self, file_id: str) -> None:
        assert self._files is not None
        stored = self._files.pop(file_id)
        self._gone[file_id] = (stored.owner, _order(stored))
        while len(self._gone) > _GONE_KEPT:
            del self._gone[next(iter(self._gone))]
        (self.directory / f"{file_id}.json").unlink(missing_ok=True)  # first: without it the bytes are not listed
        (self.directory / file_id).unlink(missing_ok=True)


def _order(stored: StoredFile) -> tuple[int, int]:
    return stored.created_at, stored.stored_ns


def claim(files_dir: Path) -> TextIO:
    """Hold `files_dir` for this process for as long as the returned handle is open (an exclusive lock its
    process's end releases); ConfigError naming the holder when another server has it. Two servers on one folder
    each resumed its batches and answered every request twice, then overwrote each other's records."""
    files_dir.mkdir(parents=True, exist_ok=True)
    handle = open(files_dir / ".lock", "a+", encoding="utf-8")  # held open for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held: EWOULDBLOCK
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        by = f" (pid {holder})" if holder.isdigit() else ""
        raise ConfigError(
            f"--files-dir {str(files_dir)!r} is in use by another cake serve{by}: give each server its own"
        ) from None
    except OSError as error:  # a file system without locks (some NFS mounts: ENOLCK)
        handle.close()
        raise ConfigError(
            f"--files-dir {str(files_dir)!r} cannot be locked ({error.strerror}): give a folder on a local disk"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _read_stored(meta: Path, directory: Path) -> StoredFile | None:
    """A stored file's metadata, if it is whole and its bytes are there as it says; else None (with a warning)."""
    try:
        stored = from_record(StoredFile, json.loads(meta.read_text(encoding="utf-8")))
        if not _ID.fullmatch(stored.id) or meta.name != f"{stored.id}.json":
            raise ValueError(f"id {stored.id!r} does not name this record")
        size = (directory / stored.id).stat().st_size
    except (OSError, ValueError, RecursionError) as error:
        log.warning("stored file record %s is unreadable, not listed: %s", meta, error)
        return None
    if size != stored.bytes:
        log.warning("stored file %s holds %d bytes, its record says %d: not listed", stored.id, size, stored.bytes)
        return None
    return stored


def _write_json(path: Path, value: object) -> None:
    """Write JSON so that a reader (or a crash) sees the old content or the new, never half of it."""
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        partial.write_text(json.dumps(value))
        os.replace(partial, path)
    except BaseException:  # a full disk: no half-written partial left behind
        partial.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, value)
