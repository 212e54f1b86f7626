"""The Files API's disk store: files kept with their metadata, found again by a new store on the same folder,
expired and deleted ones gone from disk, unfinished uploads and foreign names ignored."""

from __future__ import annotations

import errno
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cake_py.api.file_store import FileStore, FileTooLargeError, StorageFullError, StoredFile, claim
from cake_py.errors import ConfigError


def test_a_file_is_kept_listed_and_found_by_a_new_store(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=0)
    first = store.add(io.BytesIO(b"abc"), "a.jsonl", "batch", None)
    second = store.add_lines([b"one\n", b"two\n"], "b.jsonl", "batch_output", 3600)
    assert (first.bytes, second.bytes) == (3, 8)
    assert (store.directory / first.id).read_bytes() == b"abc"
    assert second.expires_at == second.created_at + 3600
    again = FileStore(tmp_path, max_file_bytes=0)  # a restarted server
    assert again.get(first.id) == first and again.get(second.id) == second
    assert [f.id for f in again.list("", "batch")] == [first.id]
    assert {f.id for f in again.list("")} == {first.id, second.id}
    assert first.to_json()["object"] == "file" and first.to_json()["status"] == "processed"


def test_delete_removes_the_bytes_and_the_metadata(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=0)
    stored = store.add(io.BytesIO(b"abc"), "a", "user_data", None)
    assert store.delete(stored.id)
    assert list(store.directory.iterdir()) == []
    assert not store.delete(stored.id)
    with pytest.raises(KeyError):
        store.get(stored.id)


def test_an_expired_file_goes_when_the_store_is_next_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path, max_file_bytes=0)
    stored = store.add(io.BytesIO(b"abc"), "a", "batch", 60)
    kept = store.add(io.BytesIO(b"abc"), "b", "batch", None)
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(KeyError):
        store.get(stored.id)
    assert [f.id for f in store.list("")] == [kept.id]
    assert sorted(p.name for p in store.directory.iterdir()) == sorted([kept.id, f"{kept.id}.json"])


def test_a_file_over_the_limit_leaves_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=4)
    with pytest.raises(FileTooLargeError, match="'big' is over the 4-byte limit"):
        store.add(io.BytesIO(b"12345"), "big", "batch", None)
    assert list(store.directory.iterdir()) == []
    assert store.add(io.BytesIO(b"1234"), "fits", "batch", None).bytes == 4


def test_unfinished_uploads_and_foreign_names_are_not_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=0)
    stored = store.add(io.BytesIO(b"abc"), "a", "batch", None)
    (store.directory / "file-0123456789abcdef01234567").write_bytes(b"no metadata: an upload cut short")
    (store.directory / "file-zzz.json").write_text("{not json")
    (store.directory / f".{stored.id}.1234abcd").write_bytes(b"a write a crash cut short")
    again = FileStore(tmp_path, max_file_bytes=0)
    assert [f.id for f in again.list("")] == [stored.id]
    assert not list(store.directory.glob(".file-*"))  # removed when the store is read
    for name in ("../../etc/passwd", "file-0123456789abcdef01234567", f"{stored.id}/../x", stored.id.upper()):
        with pytest.raises(KeyError):
            again.get(name)


def test_files_of_one_second_keep_their_order_across_restarts(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=0)
    ids = [store.add(io.BytesIO(b"x"), f"{i}", "batch", None).id for i in range(5)]
    assert [f.id for f in store.list("", newest_first=False)] == ids
    assert [f.id for f in FileStore(tmp_path, max_file_bytes=0).list("", newest_first=False)] == ids


def test_a_file_is_listed_for_its_owner_only_also_after_a_restart(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=0)
    mine = store.add(io.BytesIO(b"x"), "a.jsonl", "batch", None, owner="alice")
    assert [f.id for f in store.list("alice")] == [mine.id] and store.list("bob") == store.list("") == []
    again = FileStore(tmp_path, max_file_bytes=0)
    assert again.get(mine.id).owner == "alice" and "owner" not in again.get(mine.id).to_json()


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ({"expires_at": "soon"}, "field 'expires_at' is 'soon'"),
        ({"filename": 12345}, "field 'filename' is 12345"),
        ({"bytes": 4}, "holds 3 bytes, its record says 4"),
        ({"id": "file-000000000000000000000000"}, "does not name this record"),
    ],
)
def test_a_record_of_the_wrong_shape_is_not_listed_and_breaks_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: dict[str, object], why: str
) -> None:
    """A hand-edited record (a string where a number belongs) made every listing and upload a 500."""
    store = FileStore(tmp_path, max_file_bytes=0)
    damaged, kept = (store.add(io.BytesIO(b"abc"), name, "batch", None) for name in ("a", "b"))
    meta = store.directory / f"{damaged.id}.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **edit}))
    again = FileStore(tmp_path, max_file_bytes=0)
    assert [f.id for f in again.list("")] == [kept.id]
    assert why in caplog.text
    assert again.add(io.BytesIO(b"new"), "c", "batch", None).bytes == 3


def test_a_file_whose_bytes_were_removed_is_not_found(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=0)
    stored = store.add(io.BytesIO(b"abc"), "a", "batch", None)
    (store.directory / stored.id).unlink()  # another process, or a person
    with pytest.raises(KeyError):
        store.get(stored.id)
    assert store.list("") == []


def test_results_stored_again_under_their_seed_replace_the_first(tmp_path: Path) -> None:
    """A batch finished again after a restart stored its output file twice."""
    store = FileStore(tmp_path, max_file_bytes=0)
    first = store.add_lines([b"1\n"], "out.jsonl", "batch_output", None, name_seed="batch_x:output")
    second = store.add_lines([b"1\n", b"2\n"], "out.jsonl", "batch_output", None, name_seed="batch_x:output")
    assert first.id == second.id and second.bytes == 4
    assert [f.id for f in FileStore(tmp_path, max_file_bytes=0).list("")] == [first.id]


def test_a_full_disk_leaves_no_part_of_the_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=0)

    def full(_: int) -> bytes:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.add(type("Source", (), {"read": staticmethod(full)})(), "a", "batch", None)  # type: ignore[arg-type]
    assert list(store.directory.iterdir()) == []


def test_a_files_folder_is_held_by_one_server(tmp_path: Path) -> None:
    held = claim(tmp_path / "files")
    with pytest.raises(ConfigError, match=rf"is in use by another cake serve \(pid {os.getpid()}\)"):
        claim(tmp_path / "files")
    held.close()
    claim(tmp_path / "files").close()


def test_a_files_folder_that_cannot_be_locked_is_not_called_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system without locks (NFS: ENOLCK) the error blamed another cake serve that did not exist."""
    import errno

    from cake_py.api import file_store

    def no_locks(handle: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(file_store.fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match=r"cannot be locked \(No locks available\): give a folder on a local disk"):
        claim(tmp_path / "files")


def test_each_key_keeps_at_most_its_share_and_two_uploads_at_once_count_together(tmp_path: Path) -> None:
    """--files-max-gb: one key could fill the disk with uploads of 512 MiB each, any number of them."""
    store = FileStore(tmp_path, max_file_bytes=0, max_owner_bytes=10)
    kept = store.add(io.BytesIO(b"x" * 6), "a.txt", "user_data", None, owner="alice")
    with pytest.raises(StorageFullError, match=r"'b.txt' does not fit: .* hold 6 bytes, and at most 10 are kept"):
        store.add(io.BytesIO(b"y" * 5), "b.txt", "user_data", None, owner="alice")
    assert [f.id for f in store.list("alice")] == [kept.id] and len(os.listdir(store.directory)) == 2  # nothing kept
    store.add(io.BytesIO(b"z" * 9), "c.txt", "user_data", None, owner="bob")  # another key's share is its own
    store.add_lines([b"y" * 8 + b"\n"], "out.jsonl", "batch_output", None, owner="alice")  # a batch's results: kept
    assert store.delete(kept.id)
    assert store.add(io.BytesIO(b"w"), "d.txt", "user_data", None, owner="carol").bytes == 1

    class Racing(io.BytesIO):
        """An upload during which another upload of the same key is stored (two requests at once)."""

        def read(self, size: int = -1) -> bytes:
            chunk = super().read(size)
            if not chunk:  # its bytes are counted by now, not yet stored
                with pytest.raises(StorageFullError):
                    store.add(io.BytesIO(b"v" * 4), "e.txt", "user_data", None, owner="carol")
            return chunk

    store.add(Racing(b"u" * 6), "f.txt", "user_data", None, owner="carol")  # 1 + 6 kept; 4 more would pass 10
    assert sum(f.bytes for f in store.list("carol")) == 7 and store._uploading == {}


def test_an_upload_refused_for_its_size_leaves_the_count_of_another_under_way(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=8, max_owner_bytes=10)

    class Racing(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            chunk = super().read(size)
            if not chunk:  # 6 bytes of this upload counted: a 9-byte upload is too large, and takes none of them
                with pytest.raises(FileTooLargeError):
                    store.add(io.BytesIO(b"v" * 9), "big.txt", "user_data", None, owner="carol")
                assert store._uploading == {"carol": 6}
            return chunk

    store.add(Racing(b"u" * 6), "f.txt", "user_data", None, owner="carol")
    assert store._uploading == {}


def test_a_stored_upload_stops_counting_as_under_way_as_it_is_indexed(tmp_path: Path) -> None:
    """Between being indexed and giving back its count, an upload counted twice: another upload of the same key
    near the limit was refused for room it had."""
    seen: list[dict[str, int]] = []

    class Probe(FileStore):
        def _store(self, *args: Any, **kwargs: Any) -> StoredFile:
            stored = super()._store(*args, **kwargs)
            seen.append(dict(self._uploading))  # right after it is indexed, before add returns
            return stored

    store = Probe(tmp_path, max_file_bytes=0, max_owner_bytes=10)
    store.add(io.BytesIO(b"x" * 6), "a.txt", "user_data", None, owner="alice")
    assert seen == [{}]
