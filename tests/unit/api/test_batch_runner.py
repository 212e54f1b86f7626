"""A batch run's own result lines as a crash leaves them: a line cut short is dropped, and the file rewritten
without it, so that the lines a resumed run appends stay whole."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from cake_py.api.batch_runner import _append, _complete_lines, _recount


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


def test_a_run_s_lines_are_counted_one_at_a_time(tmp_path: Path) -> None:
    """A finishing batch counted and stored its result lines read whole, each parsed: tens of thousands of answers
    took gigabytes at once. Read one at a time, a file many times larger than a line costs about a line."""
    output, errors = tmp_path / "batch_1.output.jsonl", tmp_path / "batch_1.errors.jsonl"
    answer = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}, "text": "x" * 2000}
    lines = [{"custom_id": f"r{i}", "response": {"status_code": 200, "body": answer}} for i in range(10_000)]
    _append(output, lines)
    with open(output, "ab") as handle:
        handle.write(b'{"custom_id": "cut", "resp')  # a crash mid-write: dropped, the file mended
    tracemalloc.start()
    try:
        answered, completed, failed, usage = _recount(output, errors)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (len(answered), completed, failed) == (10_000, 10_000, 0)
    assert (usage["input_tokens"], usage["output_tokens"]) == (30_000, 20_000)
    assert peak < 4 << 20, f"{peak} bytes at the peak for a {output.stat().st_size}-byte file"
    assert output.read_bytes().endswith(b"}\n") and len(output.read_bytes().splitlines()) == 10_000
