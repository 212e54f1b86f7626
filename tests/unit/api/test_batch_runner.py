"""A batch run's own result lines as a crash leaves them: a line cut short is dropped, and the file rewritten
without it, so that the lines a resumed run appends stay whole."""

from __future__ import annotations

from pathlib import Path

from cake_py.api.batch_runner import _append, _complete_lines


def test_a_line_cut_short_is_dropped_and_the_file_mended(tmp_path: Path) -> None:
    path = tmp_path / "batch_1.output.jsonl"
    _append(path, [{"custom_id": "a"}])
    _append(path, [{"custom_id": "b"}])
    with open(path, "ab") as handle:
        handle.write(b'{"custom_id": "c", "resp')  # the server died mid-write
    assert [line["custom_id"] for line in _complete_lines(path)] == ["a", "b"]
    _append(path, [{"custom_id": "c"}])
    assert [line["custom_id"] for line in _complete_lines(path)] == ["a", "b", "c"]


def test_no_file_is_no_lines(tmp_path: Path) -> None:
    assert list(_complete_lines(tmp_path / "missing.jsonl")) == []
