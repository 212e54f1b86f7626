"""The worker's weight cache: content-addressed files, hashed once per process unless they change on disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from cake_py.errors import ClusterError, ConfigError
from cake_py.rpc import weight_cache
from cake_py.rpc.weight_cache import WeightCache


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file the cache hashes to verify it, by name."""
    seen: list[str] = []
    real = hashlib.file_digest

    def counting(handle, digest):  # type: ignore[no-untyped-def]
        seen.append(Path(handle.name).name)
        return real(handle, digest)

    monkeypatch.setattr(weight_cache.hashlib, "file_digest", counting)
    return seen


FREE = 10**16  # bytes free on the disk, where the disk's room is not what a test is about


def store(cache: WeightCache, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    writer = cache.writer(sha, len(data))
    writer.write(0, data)
    writer.commit()
    return sha


def test_streamed_file_is_trusted_until_it_changes(tmp_path: Path, hashes: list[str]) -> None:
    cache = WeightCache(tmp_path)
    data = os.urandom(4096)
    sha = store(cache, data)
    assert cache.verify(sha, len(data)) and cache.verify(sha, len(data))
    assert hashes == []  # hashed while it streamed in

    damaged = bytearray(data)
    damaged[100] ^= 0xFF
    cache.path(sha).write_bytes(bytes(damaged))  # same size, new mtime
    assert not cache.verify(sha, len(data))
    assert hashes == [sha]
    assert not cache.path(sha).exists()  # deleted, so it is streamed again


def test_a_request_wrong_about_a_size_does_not_cost_the_file_its_users(tmp_path: Path) -> None:
    """Another master's Prepare naming a cached tensor's hash with another size deleted the file, and the Assign of
    the master that Prepare had told "nothing missing" failed."""
    cache = WeightCache(tmp_path)
    data = os.urandom(4096)
    sha = store(cache, data)
    assert not cache.verify(sha, len(data) + 4)  # missing for that request
    assert cache.verify(sha, len(data)) and cache.path(sha).exists()
    restarted = WeightCache(tmp_path)  # not verified by this process yet: hashed, found intact, kept
    assert not restarted.verify(sha, len(data) + 4) and restarted.verify(sha, len(data))
    cache.path(sha).write_bytes(data[:100])  # truly damaged (cut short): deleted
    assert not restarted.verify(sha, len(data)) and not cache.path(sha).exists()


def test_a_restarted_worker_hashes_each_file_once(tmp_path: Path, hashes: list[str]) -> None:
    data = os.urandom(4096)
    sha = store(WeightCache(tmp_path), data)
    restarted = WeightCache(tmp_path)
    assert restarted.verify(sha, len(data)) and restarted.verify(sha, len(data))
    assert hashes == [sha]


def test_wrong_size_or_missing(tmp_path: Path, hashes: list[str]) -> None:
    cache = WeightCache(tmp_path)
    data = os.urandom(1024)
    sha = store(cache, data)
    assert not cache.verify(sha, len(data) + 1)
    assert cache.verify(sha, len(data))  # kept: the request was wrong about it, not the file
    assert hashes == []  # trusted since it streamed in
    assert not cache.verify(hashlib.sha256(b"never stored").hexdigest(), 12)


def test_two_writers_of_one_tensor_never_share_a_file(tmp_path: Path) -> None:
    # Two Assigns streaming the same tensor at once (two masters; a master back before its old stream ended).
    cache = WeightCache(tmp_path)
    data = os.urandom(4 << 20)
    sha = hashlib.sha256(data).hexdigest()
    first, second = cache.writer(sha, len(data)), cache.writer(sha, len(data))
    assert first.temp != second.temp
    half = len(data) // 2
    first.write(0, data[:half])
    second.write(0, data[:half])  # used to truncate the first writer's file
    first.write(half, data[half:])
    first.commit()
    second.write(half, data[half:])
    second.commit()  # the tensor is already there: kept, no error
    assert cache.path(sha).read_bytes() == data
    assert not list(tmp_path.rglob("*.partial"))
    # An old stream that gives up late removes only its own file.
    third = cache.writer(sha, len(data))
    late = cache.writer(sha, len(data))
    late.abort()
    assert third.temp.exists()
    third.abort()


def test_temp_files_of_dead_workers_are_removed_at_start(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    sha = hashlib.sha256(b"x").hexdigest()
    live = cache.writer(sha, 1)  # this process: kept
    orphan = cache.path(sha).with_name(f"{sha}.999999999.abc.partial")  # no such pid
    orphan.write_bytes(b"half")
    WeightCache(tmp_path)
    assert not orphan.exists() and live.temp.exists()
    live.abort()


def test_an_earlier_runs_files_under_this_processs_id_are_removed_at_start(tmp_path: Path) -> None:
    """In a container every worker is PID 1: a killed one's temp files carry the id of the next run."""
    cache = WeightCache(tmp_path)
    sha = hashlib.sha256(b"x").hexdigest()
    left = cache.path(sha).with_name(f"{sha}.{os.getpid()}.earlier.partial")
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(b"half")
    WeightCache(tmp_path)
    assert not left.exists()


def test_a_commit_whose_flush_fails_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = WeightCache(tmp_path)
    data = b"weights"
    writer = cache.writer(hashlib.sha256(data).hexdigest(), len(data))
    writer.write(0, data)
    real_close = writer.handle.close

    def full_disk() -> None:
        real_close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.handle, "close", full_disk)
    with pytest.raises(OSError, match="No space left"):
        writer.commit()
    assert not writer.temp.exists() and not list(tmp_path.glob("??/*.partial"))
    writer.abort()  # what a failed Assign does to every writer: harmless now


def test_temp_files_of_another_machine_sharing_the_volume_are_kept(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    sha = hashlib.sha256(b"x").hexdigest()
    folder = cache.path(sha).parent
    folder.mkdir(parents=True, exist_ok=True)
    elsewhere = folder / f"{sha}.{os.getpid()}.another-container.abc123.partial"  # its PID 1 is not ours
    earlier = folder / f"{sha}.{os.getpid()}.{weight_cache._HOST}.def456.partial"  # this container, a killed run
    for file in (elsewhere, earlier):
        file.write_bytes(b"half")
    writer = cache.writer(sha, 1)
    assert f".{os.getpid()}.{weight_cache._HOST}." in writer.temp.name
    WeightCache(tmp_path)
    assert elsewhere.exists() and not earlier.exists() and writer.temp.exists()
    writer.abort()


def test_reserve_deletes_the_least_recently_used_outside_the_assignment(tmp_path: Path, hashes: list[str]) -> None:
    cache = WeightCache(tmp_path, max_bytes=3000)
    old, middle, new = (store(cache, os.urandom(1000)) for _ in range(3))
    for age, sha in ((300, old), (200, middle), (100, new)):
        stamp = cache.path(sha).stat().st_mtime - age
        os.utime(cache.path(sha), (stamp, stamp))
    cache.touch(old)  # used again: now the most recent
    assert cache.verify(old, 1000) and hashes == []  # a touch keeps it verified
    assert cache.reserve({new: 1000}, missing=0, free=FREE) == 0  # 3000 bytes fit the limit
    cache.release([new])
    assert cache.reserve({new: 1000, "f" * 64: 1500}, missing=1500, free=FREE) == 2000  # middle (oldest now), then old
    assert [sha for _, _, sha in cache.files()] == [new]
    with pytest.raises(ClusterError, match="--cache-max-gb"):
        cache.reserve({new: 1000, "e" * 64: 2500}, missing=2500, free=FREE)
    assert WeightCache(tmp_path / "unlimited").reserve({}, missing=10**15, free=FREE) == 0
    with pytest.raises(ClusterError, match="GB free and the missing weights need"):  # the disk's own room
        WeightCache(tmp_path / "unlimited").reserve({}, missing=2000, free=1000)


def test_an_assignment_in_progress_keeps_its_files_and_its_room(tmp_path: Path) -> None:
    """Between a Prepare and the end of its Assign, another assignment's eviction spares its cached files and counts
    the bytes it still streams; a failure to make room names the limit."""
    cache = WeightCache(tmp_path, max_bytes=2500)
    first, second = (store(cache, os.urandom(1000)) for _ in range(2))
    assert (
        cache.reserve({first: 1000, "a" * 64: 1000}, missing=1000, free=FREE) == 1000
    )  # second goes; 1000 still to stream
    assert not cache.path(second).exists()
    with pytest.raises(ClusterError, match="other assignments in progress"):
        cache.reserve(
            {"b" * 64: 1000}, missing=1000, free=FREE
        )  # 1000 on disk + 1000 streaming + 1000 > 2500; first is kept
    assert cache.verify(first, 1000)
    cache.release([first, "a" * 64])
    assert cache.reserve({"b" * 64: 2000}, missing=2000, free=FREE) == 1000  # now first may go
    assert not cache.path(first).exists()


def test_a_worker_with_a_limit_needs_its_folder_alone(tmp_path: Path) -> None:
    sharing = WeightCache(tmp_path)  # a worker without a limit: others may share
    WeightCache(tmp_path).reserve({}, 0, FREE)
    with pytest.raises(ConfigError, match="a --cache-dir of its own"):
        WeightCache(tmp_path, max_bytes=10**9)
    del sharing
    limited = WeightCache(tmp_path, max_bytes=10**9)
    with pytest.raises(ConfigError, match="another --cache-dir"):
        WeightCache(tmp_path)
    del limited


def test_an_eviction_the_disk_refuses_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = WeightCache(tmp_path, max_bytes=1500)
    store(cache, os.urandom(1000))

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(ClusterError, match=r"cannot delete from weight cache .*Read-only file system"):
        cache.reserve({"c" * 64: 1000}, missing=1000, free=FREE)


def test_a_cache_dir_that_is_a_file_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(ClusterError, match=r"'.*cache' \(--cache-dir\) is a file, not a folder"):
        WeightCache(tmp_path / "cache")


def test_a_reservation_the_disk_cannot_hold_deletes_nothing_and_holds_nothing(tmp_path: Path) -> None:
    """A Prepare refused for disk space deleted the weights unused the longest first, and its reservation then
    refused every assignment for minutes."""
    cache = WeightCache(tmp_path, max_bytes=3000)
    kept = [store(cache, os.urandom(1000)) for _ in range(2)]
    with pytest.raises(ClusterError, match="GB free and the missing weights need"):
        cache.reserve({"a" * 64: 2000}, missing=2000, free=500)  # evicting one file would leave 1500 free: short
    assert all(cache.path(sha).exists() for sha in kept)
    assert cache.reserve({"b" * 64: 1000}, missing=1000, free=FREE) == 0  # nothing is held for the refused one


def test_a_reservation_expires_unless_its_assign_started_and_two_of_the_same_files_count_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = WeightCache(tmp_path, max_bytes=2000)
    first = store(cache, os.urandom(1000))
    monkeypatch.setattr(weight_cache, "PIN_SECONDS", 0.05)
    cache.reserve({first: 1000}, missing=0, free=FREE)  # a master that died before its Assign
    time.sleep(0.1)
    assert cache.reserve({"c" * 64: 2000}, missing=2000, free=FREE) == 1000  # its files may go
    cache.release(["c" * 64])

    second = store(cache, os.urandom(1000))
    cache.reserve({second: 1000}, missing=0, free=FREE)
    cache.hold({second: 1000})  # its Assign started: kept however long it streams
    cache.reserve({second: 1000}, missing=0, free=FREE)  # another master, the same layers
    cache.hold({second: 1000})
    time.sleep(0.1)
    cache.release([second])  # one of the two ended: the other still holds the file
    with pytest.raises(ClusterError, match="other assignments in progress"):
        cache.reserve({"d" * 64: 2000}, missing=2000, free=FREE)
    cache.release([second])
    assert cache.reserve({"d" * 64: 2000}, missing=2000, free=FREE) == 1000


def test_an_entry_that_is_not_a_file_is_removed_and_streamed_again(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    sha = hashlib.sha256(b"weights").hexdigest()
    cache.path(sha).mkdir(parents=True)  # a folder where the file should be: open() said "Is a directory"
    (cache.path(sha) / "inside").write_text("x")
    assert not cache.verify(sha, 7) and not cache.path(sha).exists()


def test_an_unreadable_entry_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = WeightCache(tmp_path)
    sha = store(cache, b"weights")
    fresh = WeightCache(tmp_path)  # hashes it again

    def failing(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "open", failing)
    with pytest.raises(ClusterError, match=r"cannot read weight cache file .*Input/output error"):
        fresh.verify(sha, 7)


def test_loaded_weights_are_the_workers_own_memory_not_the_file(tmp_path: Path) -> None:
    """Weights were mapped from the cache file: a copy over it changed the running model silently."""
    cache = WeightCache(tmp_path)
    values = torch.arange(6, dtype=torch.float32)
    sha = store(cache, values.numpy().tobytes())
    assert cache.verify(sha, 24)
    loaded = cache.load(sha, torch.float32, (2, 3))
    with cache.path(sha).open("r+b") as handle:  # in place: same inode, same size
        handle.write(bytes(24))
    assert torch.equal(loaded, values.reshape(2, 3))
    with pytest.raises(ClusterError, match="changed while it was being loaded"):
        cache.load(sha, torch.float32, (2, 3))  # changed since it was verified: hashed as read, refused


def test_a_cache_folder_deleted_while_the_worker_runs_is_made_and_claimed_again(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = WeightCache(root, max_bytes=10**9)
    shutil.rmtree(root)
    cache.ensure_folder()
    assert root.is_dir()
    with pytest.raises(ConfigError, match="belongs to a worker started with --cache-max-gb"):  # its lock again
        WeightCache(root)


def test_a_cache_folder_claimed_by_another_worker_meanwhile_refuses_prepare_with_a_cluster_error(
    tmp_path: Path,
) -> None:
    """The folder was deleted and another worker made it again first: Prepare got a ConfigError (gRPC UNKNOWN with a
    traceback), and this worker, its lock closed, went on deleting weights without the exclusive lock."""
    root = tmp_path / "cache"
    cache = WeightCache(root, max_bytes=10**9)
    shutil.rmtree(root)
    other = WeightCache(root)  # a sharing worker makes the folder again and holds its shared lock
    with pytest.raises(ClusterError, match="is in use by another worker"):
        cache.ensure_folder()
    with pytest.raises(ClusterError, match="is in use by another worker"):  # still refused: no lock held
        cache.ensure_folder()
    other.close()
    cache.ensure_folder()  # free again: claimed, exclusively
    with pytest.raises(ConfigError, match="belongs to a worker started with --cache-max-gb"):
        WeightCache(root)


def test_a_lock_file_made_again_by_someone_else_is_not_mistaken_for_this_workers_lock(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = WeightCache(root, max_bytes=10**9)
    shutil.rmtree(root)
    root.mkdir()
    (root / ".workers.lock").touch()  # exists, but this worker's lock is on the deleted file
    cache.ensure_folder()
    with pytest.raises(ConfigError, match="belongs to a worker started with --cache-max-gb"):
        WeightCache(root)


def test_an_assign_whose_reservation_expired_holds_its_files_and_releases_only_its_own_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Assign starting after its reservation expired held nothing, and its end then dropped another master's
    reservation of the same files (which could then be evicted under it)."""
    cache = WeightCache(tmp_path, max_bytes=2000)
    first = store(cache, os.urandom(1000))
    monkeypatch.setattr(weight_cache, "PIN_SECONDS", 0.05)
    cache.reserve({first: 1000}, missing=0, free=FREE)
    time.sleep(0.1)  # expired before its Assign started
    monkeypatch.setattr(weight_cache, "PIN_SECONDS", 60.0)
    cache.reserve({}, missing=0, free=FREE)  # any Prepare forgets expired reservations
    cache.hold({first: 1000})  # held all the same while it streams
    with pytest.raises(ClusterError, match="other assignments in progress"):
        cache.reserve({"c" * 64: 2000}, missing=2000, free=FREE)
    cache.reserve({first: 1000}, missing=0, free=FREE)  # another master reserves the same files
    cache.release([first])  # the first Assign ends
    with pytest.raises(ClusterError, match="other assignments in progress"):  # the other's reservation stands
        cache.reserve({"c" * 64: 2000}, missing=2000, free=FREE)
