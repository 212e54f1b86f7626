"""GET /v1/files/{id}/content when the file is deleted while it is being answered: a deletion between the lookup and
the open is the 404 of a missing file; one after the open still serves the content whole. Hooks on the store put
the deletion exactly there, with no race to win."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from starlette.testclient import TestClient

from cake_py.api.app import create_app
from cake_py.api.file_store import FileStore, StoredFile
from cake_py.api.state import ServerState
from cake_py.config import ServeSettings

CONTENT = b"".join(b'{"line": %d}\n' % n for n in range(20_000))  # several read chunks


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, FileStore]]:
    state = ServerState(engine=None, source=None, settings=ServeSettings(rate_limit=0, files_dir=tmp_path))
    with TestClient(create_app(state), raise_server_exceptions=False) as client:
        yield client, state.files


def _upload(client: TestClient, name: str = "données.jsonl") -> str:
    answer = client.post("/v1/files", files={"file": (name, CONTENT)}, data={"purpose": "user_data"})
    assert answer.status_code == 200, answer.text
    file_id: str = answer.json()["id"]
    return file_id


def test_the_content_is_served_whole_with_its_name(served: tuple[TestClient, FileStore]) -> None:
    client, _ = served
    answer = client.get(f"/v1/files/{_upload(client)}/content")
    assert answer.status_code == 200
    assert answer.content == CONTENT
    assert answer.headers["content-length"] == str(len(CONTENT))
    assert answer.headers["content-disposition"] == "attachment; filename*=utf-8''donn%C3%A9es.jsonl"
    plain = client.get(f"/v1/files/{_upload(client, 'plain.jsonl')}/content")
    assert plain.headers["content-disposition"] == 'attachment; filename="plain.jsonl"'


def test_a_file_deleted_after_its_lookup_is_a_404(
    served: tuple[TestClient, FileStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, store = served
    file_id = _upload(client)
    found = store.get

    def found_then_deleted(wanted: str) -> StoredFile:
        stored = found(wanted)
        assert store.delete(wanted)  # another request's DELETE, between the lookup and the read
        return stored

    monkeypatch.setattr(store, "get", found_then_deleted)
    answer = client.get(f"/v1/files/{file_id}/content")
    assert answer.status_code == 404, answer.text
    monkeypatch.undo()
    missing = client.get(f"/v1/files/{file_id}/content")  # the same answer as for a file deleted before
    assert (missing.status_code, missing.json()) == (404, answer.json())
    assert file_id in answer.text


def test_a_file_deleted_once_opened_is_still_served_whole(
    served: tuple[TestClient, FileStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, store = served
    file_id = _upload(client)
    opened = store.open_bytes

    def opened_then_deleted(stored: StoredFile) -> BinaryIO:
        handle = opened(stored)
        assert store.delete(stored.id)
        return handle

    monkeypatch.setattr(store, "open_bytes", opened_then_deleted)
    answer = client.get(f"/v1/files/{file_id}/content")
    assert answer.status_code == 200
    assert answer.content == CONTENT
    monkeypatch.undo()
    assert client.get(f"/v1/files/{file_id}/content").status_code == 404  # deleted for what comes after
