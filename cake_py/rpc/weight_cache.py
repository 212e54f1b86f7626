"""The worker's on-disk weight cache: one file of raw tensor bytes per sha256, so a restart downloads nothing.

With a size limit (`--cache-max-gb`), files unused the longest go first to make room for an assignment's missing
weights; a file's mtime marks its last use (set when it is verified for an assignment)."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import socket
import stat as stat_module
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil
import torch

from cake_py.errors import ClusterError, ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".workers.lock"  # in the cache folder: shared by workers without a size limit, exclusive with one
# An assignment's files stay safe from eviction from its Prepare until its Assign starts (or this long: a master
# that died in between), then until that Assign ends.
PIN_SECONDS = 120.0
_OPEN_TEMPS: set[Path] = set()  # the temp files this process's writers have open
# In temp file names: a process id only means something on its own machine (or container).
_HOST = "".join(char if char.isalnum() or char == "-" else "-" for char in socket.gethostname()) or "host"


class WeightCache:
    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = root
        self.max_bytes = max_bytes  # 0: no limit but the disk's
        self._evicting = threading.Lock()  # two masters' Prepares must not pick the same room
        # Assignments between their Prepare and the end of their Assign: files kept from eviction, room reserved.
        # One expiry per reservation (two masters may reserve the same files); inf once its Assign has started.
        self._pins: dict[frozenset[str], tuple[list[float], dict[str, int]]] = {}
        # Files this process has hashed (or written and hashed), with the (size, mtime_ns, inode) they had then:
        # a re-assignment (a reconnect, a model switch back) re-hashes only what changed on disk since.
        self._verified: dict[str, tuple[int, int, int]] = {}
        if root.exists() and not root.is_dir():  # mkdir would say "File exists"
            raise ClusterError(f"weight cache {str(root)!r} (--cache-dir) is a file, not a folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ClusterError(f"cannot create weight cache {str(root)!r}: {error.strerror}") from error
        self._claim()
        self._remove_orphans()

    def close(self) -> None:
        """Let go of the folder (its lock): another worker may claim it."""
        lock_file = self.__dict__.pop("_lock_file", None)
        if lock_file is not None:
            lock_file.close()

    def __del__(self) -> None:
        self.close()

    def _claim(self) -> None:
        """A worker that deletes weights (a size limit) must be the only one using the folder; others share it. A
        lock on a file in the folder, held while this process lives, tells them apart across processes."""
        try:
            self._lock_file = (self.root / LOCK_FILE).open("a")
        except OSError as error:
            raise ClusterError(f"cannot open weight cache {str(self.root)!r}: {error.strerror or error}") from error
        try:
            fcntl.flock(self._lock_file, (fcntl.LOCK_EX if self.max_bytes else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            if self.max_bytes:
                raise ConfigError(
                    f"weight cache {str(self.root)!r} is in use by another worker: with --cache-max-gb a worker "
                    "deletes weights, so it needs a --cache-dir of its own"
                ) from None
            raise ConfigError(
                f"weight cache {str(self.root)!r} belongs to a worker started with --cache-max-gb, which deletes "
                "weights: give this worker another --cache-dir"
            ) from None

    def _remove_orphans(self) -> None:
        """Delete temp files a killed worker left (their process is gone): they would stay for ever otherwise.
        Files named with this process's own id are orphans too unless one of its writers has them open (in a
        container every worker is PID 1, so an earlier run's files carry the same id)."""
        for temp in self.root.glob("??/*.partial"):
            parts = temp.name.split(".")  # sha256, pid, host, random, "partial" (older files: no host)
            pid = parts[1] if len(parts) >= 4 else ""
            if not pid.isdigit() or (len(parts) >= 5 and parts[2] != _HOST):
                continue  # another machine's (a shared volume): whether its writer lives cannot be told from here
            ours = int(pid) == os.getpid()
            if (ours and temp.resolve() not in _OPEN_TEMPS) or (not ours and not psutil.pid_exists(int(pid))):
                temp.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ClusterError(f"invalid sha256 {sha256!r} in the weight manifest")
        return self.root / sha256[:2] / sha256

    def ensure_folder(self) -> None:
        """The cache folder deleted while this worker runs (an rm -rf, a cleanup job) is made again, and claimed
        again: its lock went with it, and a worker with --cache-max-gb must not share the new one unknowingly."""
        if self._holds_lock():
            return
        log.warning("weight cache %s was deleted while this worker ran: making it again", self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ClusterError(f"cannot create weight cache {str(self.root)!r}: {error.strerror}") from error
        self.close()
        self._verified.clear()
        try:
            self._claim()
        except ConfigError as error:  # another worker made it and claimed it: refuse this Prepare (and the next)
            raise ClusterError(str(error)) from None

    def _holds_lock(self) -> bool:
        """Whether this process's lock is on the folder's lock file as it is now: not on one deleted since (another
        worker may have made the folder again and claimed it), nor lost when a claim failed."""
        lock_file = self.__dict__.get("_lock_file")
        if lock_file is None:
            return False
        try:
            held, current = os.fstat(lock_file.fileno()), (self.root / LOCK_FILE).stat()
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)

    def free_bytes(self) -> int:
        """Bytes free on the cache's disk for this process (what a non-root user may write)."""
        try:
            return shutil.disk_usage(self.root).free
        except OSError as error:
            raise ClusterError(f"cannot read the free space of weight cache {str(self.root)!r}: {error}") from error

    def verify(self, sha256: str, size: int) -> bool:
        """Present and its bytes hash to `sha256`. A damaged file is deleted, so that it is streamed again.

        A file this process already verified is trusted while its size, mtime and inode are unchanged.
        """
        path = self.path(sha256)
        try:
            stat = path.stat()
            if not stat_module.S_ISREG(stat.st_mode):  # a folder, a device: not weights, whatever its name
                self._discard(path, "is not a file")
                return False
            identity = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            if self._verified.get(sha256) != identity:
                with path.open("rb") as handle:
                    intact = hashlib.file_digest(handle, "sha256").hexdigest() == sha256
                if not intact:
                    self._discard(path, "is damaged (its sha256 differs)")
                    return False
                self._verified[sha256] = identity
        except FileNotFoundError:
            self._verified.pop(sha256, None)
            return False
        except OSError as error:  # unreadable (permissions, an I/O error)
            raise ClusterError(f"cannot read weight cache file {str(path)!r}: {error.strerror or error}") from None
        # Intact: a request that says another size is wrong about it, and must not cost the file other masters use.
        return stat.st_size == size

    def _discard(self, path: Path, why: str) -> None:
        """Remove a cache entry that cannot be used, so that it is streamed again; ClusterError if it cannot be."""
        log.warning("weight cache file %s %s: streaming it again", path, why)
        self._verified.pop(path.name, None)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as error:
            raise ClusterError(
                f"weight cache file {str(path)!r} {why} and cannot be removed ({error.strerror or error}): "
                "remove it, or start the worker with another --cache-dir"
            ) from None

    def touch(self, sha256: str) -> None:
        """Mark a verified file as used now (eviction goes by least recent use); it stays verified."""
        path = self.path(sha256)
        try:
            os.utime(path)
            stat = path.stat()
        except OSError:
            return  # a read-only cache still serves: only its eviction order is off
        if sha256 in self._verified:
            self._verified[sha256] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)

    def files(self) -> list[tuple[float, int, str]]:
        """(mtime, size, sha256) of every committed file, least recently used first."""
        found = []
        try:
            for path in self.root.glob("??/*"):
                if len(path.name) != 64 or path.name[:2] != path.parent.name:
                    continue  # temp files, strangers
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append((stat.st_mtime, stat.st_size, path.name))
        except OSError as error:
            raise ClusterError(f"cannot list weight cache {str(self.root)!r}: {error.strerror or error}") from None
        return sorted(found)

    def reserve(self, sizes: dict[str, int], missing: int, free: int) -> int:
        """Make room for an assignment's weights (`sizes`, sha256 → bytes; `missing` of them still to stream, with
        `free` bytes free on the disk). Under the size limit, the files unused the longest are deleted, and its files
        (and the room for the missing ones) are kept from other assignments' eviction until `release` (or
        PIN_SECONDS, unless `hold` says its Assign started). Returns the bytes freed; ClusterError, having deleted
        nothing, when they cannot fit."""
        if not self.max_bytes:
            if missing > free:
                raise self._no_room(free, missing)
            return 0
        with self._evicting:
            now = time.monotonic()
            self._pins = {
                key: (alive, pin_sizes)
                for key, (expiries, pin_sizes) in self._pins.items()
                if (alive := [expiry for expiry in expiries if expiry > now])
            }
            pinned = {sha: size for _, pin_sizes in self._pins.values() for sha, size in pin_sizes.items()}
            files = self.files()
            on_disk = {sha: size for _, size, sha in files}
            held = sum(on_disk[sha] for sha in sizes if sha in on_disk)
            if held + missing > self.max_bytes:
                raise ClusterError(
                    f"this assignment's weights take {(held + missing) / 1e9:.2f} GB, more than the weight cache's "
                    f"--cache-max-gb {self.max_bytes / 1e9:.2f}: raise it, or give this worker fewer layers"
                )
            # Other assignments in progress: their files stay, and what they still stream is room already taken.
            streaming = sum(size for sha, size in pinned.items() if sha not in on_disk and sha not in sizes)
            # What to delete, decided before anything is: a refusal must not cost weights others may still use.
            used, doomed = sum(on_disk.values()) + streaming, []
            for _, size, sha in files:
                if used + missing <= self.max_bytes:
                    break
                if sha not in sizes and sha not in pinned:
                    doomed.append(sha)
                    used -= size
            if used + missing > self.max_bytes:
                raise ClusterError(
                    f"the weight cache {str(self.root)!r} cannot make room for {missing / 1e9:.2f} GB under its "
                    f"--cache-max-gb {self.max_bytes / 1e9:.2f}: other assignments in progress hold the rest; retry"
                )
            freed = sum(on_disk[sha] for sha in doomed)
            if missing > free + freed:
                raise self._no_room(free + freed, missing)
            for sha in doomed:
                try:
                    self.path(sha).unlink(missing_ok=True)
                except OSError as error:
                    raise ClusterError(
                        f"cannot delete from weight cache {str(self.root)!r} to stay under --cache-max-gb: "
                        f"{error.strerror or error}"
                    ) from None
                self._verified.pop(sha, None)
            key = frozenset(sizes)
            self._pins.setdefault(key, ([], dict(sizes)))[0].append(now + PIN_SECONDS)
            if freed:
                log.info("weight cache: removed %.1f MB unused the longest to stay under its limit", freed / 1e6)
            return freed

    def _no_room(self, free: int, needed: int) -> ClusterError:
        # Refused before a byte streams: a master retrying every few seconds would otherwise stream the weights
        # again each time, only to fill the disk again.
        return ClusterError(
            f"the weight cache {str(self.root)!r} has {free / 1e9:.2f} GB free and the missing weights need "
            f"{needed / 1e9:.2f} GB: free space there, or start the worker with another --cache-dir"
        )

    def hold(self, sizes: dict[str, int]) -> None:
        """The Assign a reservation was made for has started: its files (`sizes`, sha256 → bytes) stay until
        `release`, however long it streams (not only PIN_SECONDS). Held even when its reservation expired (a slow
        master): `release` must then drop this hold, not another master's reservation of the same files."""
        with self._evicting:
            pin = self._pins.setdefault(frozenset(sizes), ([], dict(sizes)))
            if waiting := [expiry for expiry in pin[0] if expiry != float("inf")]:
                pin[0].remove(min(waiting))
            pin[0].append(float("inf"))

    def release(self, shas: Iterable[str]) -> None:
        """An assignment ended (loaded or failed), or its Prepare was refused: its files may be evicted again
        (unless another assignment of the same files holds them too)."""
        with self._evicting:
            key = frozenset(shas)
            pin = self._pins.get(key)
            if pin is None:
                return
            expiries = pin[0]
            expiries.remove(float("inf") if float("inf") in expiries else min(expiries))
            if not expiries:
                del self._pins[key]

    def _committed(self, sha256: str) -> None:
        """A file just written and hashed while streaming: verified, as it lies on disk now."""
        stat = self.path(sha256).stat()
        self._verified[sha256] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)

    def writer(self, sha256: str, size: int) -> TensorWriter:
        return TensorWriter(self, sha256, size)

    def load(self, sha256: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A verified file's tensor, read into memory of its own: a file mapped instead would let a copy over it
        change the running model silently, and a truncation kill the worker (SIGBUS). A file changed since it was
        verified is hashed as read, and refused if it differs."""
        path = self.path(sha256)
        raw = torch.empty(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8)
        try:
            with path.open("rb") as handle:
                before = os.fstat(handle.fileno())
                read = handle.readinto(raw.numpy().data)
                after = os.fstat(handle.fileno())
        except OSError as error:
            raise ClusterError(f"cannot read weight cache file {str(path)!r}: {error.strerror or error}") from None
        identity = (after.st_size, after.st_mtime_ns, after.st_ino)
        changed = (before.st_size, before.st_mtime_ns) != identity[:2] or self._verified.get(sha256) != identity
        if read != raw.numel() or (changed and hashlib.sha256(raw.numpy().data).hexdigest() != sha256):
            self._verified.pop(sha256, None)
            raise ClusterError(f"weight cache file {str(path)!r} changed while it was being loaded: assign again")
        if changed:
            self._verified[sha256] = identity
        return raw.view(dtype).reshape(shape)


class TensorWriter:
    """Receives one tensor's chunks into a temp file; `commit` verifies the sha256 and moves it into place."""

    def __init__(self, cache: WeightCache, sha256: str, size: int) -> None:
        self.cache, self.sha256, self.size = cache, sha256, size
        self.final = cache.path(sha256)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        # One temp file per writer: two Assigns streaming the same tensor (two masters, or a master that came back
        # before its old stream ended) must not write into, or delete, each other's file.
        descriptor, name = tempfile.mkstemp(
            dir=self.final.parent, prefix=f"{sha256}.{os.getpid()}.{_HOST}.", suffix=".partial"
        )
        self.temp = Path(name).resolve()
        _OPEN_TEMPS.add(self.temp)
        self.handle = os.fdopen(descriptor, "wb")
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.written:
            raise ClusterError(f"weight chunk for {self.sha256[:12]} at offset {offset}, expected {self.written}")
        if self.written + len(data) > self.size:
            raise ClusterError(f"weight chunks for {self.sha256[:12]} exceed its declared {self.size} bytes")
        self.handle.write(data)
        self.digest.update(data)
        self.written += len(data)

    @property
    def complete(self) -> bool:
        return self.written == self.size

    def commit(self) -> None:
        _OPEN_TEMPS.discard(self.temp)
        try:
            self.handle.close()  # flushes: a full disk fails here
        except OSError:
            self.temp.unlink(missing_ok=True)
            raise
        if self.written != self.size or self.digest.hexdigest() != self.sha256:
            self.temp.unlink(missing_ok=True)
            raise ClusterError(
                f"weight data failed verification: got {self.written} bytes with sha256 "
                f"{self.digest.hexdigest()[:12]}, expected {self.size} bytes with {self.sha256[:12]}"
            )
        if self.cache.verify(self.sha256, self.size):  # another writer committed it meanwhile: keep that one
            self.temp.unlink(missing_ok=True)
            return
        os.replace(self.temp, self.final)
        self.cache._committed(self.sha256)

    def abort(self) -> None:
        """Drop the temp file, whatever state the writer is in (a committed one has none left)."""
        _OPEN_TEMPS.discard(self.temp)
        try:
            self.handle.close()  # a no-op when commit closed it already
        except OSError:
            pass  # the flush of a full disk: the file goes anyway
        self.temp.unlink(missing_ok=True)
