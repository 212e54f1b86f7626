"""The memory this process may use: the host's RAM, capped by its container's limit where a cgroup sets one.

A worker in `docker run --memory 8g` on a 64 GiB host saw 64 GiB through psutil: placement gave it layers for 64,
and its KV caches grew past 8 GiB until the kernel killed it for the container. The cgroup's limit, and what it
already uses (less its inactive page cache, which the kernel reclaims first, as `docker stats` counts it), bound both
figures here. Every level of the process's cgroup path is read (a limit can sit on a parent), cgroup v2 and v1 alike.
"""

from __future__ import annotations

from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
UNLIMITED = 1 << 60  # v1 writes "no limit" as a page-rounded 2^63 - 1


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM for this process: psutil's, each capped by a container's limit."""
    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    limited = container_memory()
    if limited is not None:
        limit, free = limited
        total, available = min(total, limit), min(available, free)
    return total, available


def container_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[int, int] | None:
    """(limit, free) bytes of the tightest memory limit on this process's cgroup path, or None where none is set
    (or the files cannot be read)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    tightest: tuple[int, int] | None = None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2's unified hierarchy
            levels = _levels(root, path)
            found = [_v2(level) for level in levels]
        elif "memory" in controllers.split(","):
            levels = _levels(root / "memory", path)
            found = [_v1(level) for level in levels]
        else:
            continue
        for figures in found:
            if figures is not None and (tightest is None or figures[1] < tightest[1]):
                tightest = figures
    return tightest


def _levels(base: Path, path: str) -> list[Path]:
    """The cgroup folders from the process's own up to `base` (inside a container's namespace the path is "/": its
    own cgroup is `base` itself)."""
    parts = [part for part in path.strip("/").split("/") if part and part != ".."]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2(folder: Path) -> tuple[int, int] | None:
    limit = _number(folder / "memory.max")
    if limit is None:
        return None
    used = _number(folder / "memory.current") or 0
    return limit, max(0, limit - used + _stat(folder / "memory.stat", "inactive_file"))


def _v1(folder: Path) -> tuple[int, int] | None:
    limit = _number(folder / "memory.limit_in_bytes")
    if limit is None or limit >= UNLIMITED:
        return None
    used = _number(folder / "memory.usage_in_bytes") or 0
    return limit, max(0, limit - used + _stat(folder / "memory.stat", "total_inactive_file"))


def _number(file: Path) -> int | None:
    """A file's integer; None for "max" (no limit), a missing file or anything unreadable."""
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(file: Path, key: str) -> int:
    try:
        for line in file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0
