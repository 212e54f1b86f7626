"""RAM within a container's limit: cgroup v2 and v1 files as the kernel writes them, in a folder of the test's."""

from __future__ import annotations

from pathlib import Path

import pytest

from cake_py import host_memory
from cake_py.host_memory import container_memory

GIB = 1 << 30


def write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return path


def test_a_v2_container_limit_counts_what_it_uses_less_its_reclaimable_cache(tmp_path: Path) -> None:
    root = tmp_path / "fs"  # docker run --memory 8g: the container's own cgroup is the root of its namespace
    write(root, {"memory.max": f"{8 * GIB}\n", "memory.current": f"{3 * GIB}\n",
                 "memory.stat": f"anon 123\ninactive_file {GIB}\nactive_file 5\n"})  # fmt: skip
    assert container_memory(root, proc(tmp_path, "0::/\n")) == (8 * GIB, 6 * GIB)


def test_no_limit_is_none_in_v2_and_v1(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    write(root, {"memory.max": "max\n", "memory.current": "100\n"})
    write(root / "memory", {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "100\n"})
    assert container_memory(root, proc(tmp_path, "4:memory:/\n0::/\n")) is None


def test_the_tightest_limit_on_the_path_counts_a_parents_too(tmp_path: Path) -> None:
    root = tmp_path / "fs"  # v1, the process in /docker/abc without a namespace of its own; its parent is limited
    write(root / "memory" / "docker" / "abc", {"memory.limit_in_bytes": "9223372036854771712\n"})
    write(root / "memory" / "docker", {"memory.limit_in_bytes": f"{4 * GIB}\n", "memory.usage_in_bytes": f"{GIB}\n",
                                       "memory.stat": "total_inactive_file 0\n"})  # fmt: skip
    assert container_memory(root, proc(tmp_path, "9:cpu:/x\n4:memory:/docker/abc\n")) == (4 * GIB, 3 * GIB)


def test_unreadable_or_odd_files_are_no_limit(tmp_path: Path) -> None:
    assert container_memory(tmp_path, tmp_path / "missing") is None
    write(tmp_path / "fs", {"memory.max": "lots\n"})
    assert container_memory(tmp_path / "fs", proc(tmp_path, "garbage\n0::/\n")) is None


def test_the_hosts_figures_are_capped_by_the_containers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "container_memory", lambda: (2 * GIB, GIB))
    total, available = host_memory.host_memory()
    assert (total, available) == (2 * GIB, GIB)  # this machine has more than 2 GiB
    monkeypatch.setattr(host_memory, "container_memory", lambda: None)
    total, available = host_memory.host_memory()
    assert total > 2 * GIB and 0 < available <= total
    host_memory.container_memory()  # this machine's own files read without error, whatever they say
