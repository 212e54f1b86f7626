"""Torch device and dtype choice from the `--device` / `--dtype` flags."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
from pathlib import Path

import torch

from cake_py.errors import ConfigError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is not present is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
    if name.startswith("cuda:") and name[5:].isdigit():
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name[5:]) >= count:
            raise ConfigError(f"--device {name} was asked for but torch sees {count} CUDA device(s)")
        return name
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but torch sees no MPS device")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r} (choose auto, cpu, cuda or mps)")
    return name


def release_device_memory(device: str) -> None:
    """Give back the memory of models and caches just dropped. Reference cycles are collected now rather than
    whenever; on a GPU, torch's caching allocator otherwise keeps their blocks reserved for this process, and the
    device's free memory (what placement reads, for this process and any other on the GPU) would not count them."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def held_device_memory(device: str) -> int:
    """Bytes of the device's memory this process holds through torch (GPU: reserved by its allocator), 0 on the
    CPU, where the caller counts its weights and caches itself."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.memory_reserved(torch.device(device)))
    return 0


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r} (choose one of {', '.join(TORCH_DTYPES)})") from None


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_allocator_tuned = False


def tune_allocator() -> None:
    """Stop glibc from handing freed memory back to the OS after every op in non-main threads.

    Torch frees and re-allocates its temporaries on every op. In a thread's own malloc arena glibc trims the heap
    on each free, so the next allocation page-faults: on the engine and worker threads that made every kernel
    about 2x slower than the same call on the main thread. High trim/mmap thresholds keep those pages mapped.
    A no-op where glibc is not the allocator.
    """
    global _allocator_tuned
    if _allocator_tuned or sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum
        libc.mallopt(_M_TRIM_THRESHOLD, 512 * 1024 * 1024)
    except (OSError, AttributeError):
        return
    _allocator_tuned = True


def release_free_heap() -> bool:
    """Hand the memory glibc keeps free in its heaps back to the OS (`malloc_trim`): what `tune_allocator` lets the
    heaps keep between ops (up to 512 MiB an arena) is charged to the process, and to its container. Whether glibc
    gave any back; False where glibc is not the allocator."""
    if sys.platform != "linux":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


_openmp: list[ctypes.CDLL] | None = None  # [] once looked for and not found


def _openmp_library() -> ctypes.CDLL | None:
    """The libgomp torch runs on (its bundled copy when it has one), or None."""
    global _openmp
    if _openmp is None:
        _openmp = []
        bundled = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
        for candidate in [*map(str, bundled), "libgomp.so.1"]:
            try:
                library = ctypes.CDLL(candidate)
                library.omp_pause_resource_all.argtypes = [ctypes.c_int]
                _openmp = [library]
                break
            except (OSError, AttributeError):
                continue
    return _openmp[0] if _openmp else None


def release_openmp_threads() -> None:
    """Free the calling thread's OpenMP worker threads once it is done with torch.

    libgomp keeps a worker pool per thread that ever ran a parallel op, and once it manages more threads than
    there are cores it stops spinning between parallel regions in *every* pool. A model loaded on the main thread
    and then run on the engine thread was 2x slower per token for that reason. Threads that only load (the main
    thread, gRPC handlers building layers) call this when done, so the compute thread's pool is the only one.
    """
    library = _openmp_library()
    if library is not None:
        library.omp_pause_resource_all(2)  # omp_pause_hard: also frees the pool's threads


def set_threads(threads: int | None) -> None:
    """Give torch a fixed thread count (several workers on one box must not fight over its cores)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def pin_cpus(cpus: tuple[int, ...] | None) -> None:
    """Run this process (every thread it has now, and so every thread they start) on `cpus` only (--cpus).

    On one machine, a batch-1 pipeline runs one stage at a time. Master and workers sharing the same core(s) hand
    each step over with a context switch on a running core instead of waking an idle one, which on a VM measured
    ~1.5x -> ~1.2x the single-process time per token (benchmarks/cluster.py).

    A pinned process also runs as SCHED_BATCH (`set_process_batch`): a stage woken by its input then waits for the
    stage that sent it to block, instead of preempting it and being preempted back a moment later to let it
    finish its send: two context switches per handoff, each refilling the caches of the layers.
    """
    if cpus is None:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError(f"--cpus needs CPU affinity (Linux); {sys.platform} has none")
    available = sorted(os.sched_getaffinity(0))
    missing = [cpu for cpu in cpus if cpu not in available]
    if missing or not cpus:
        raise ConfigError(
            f"--cpus: CPU {', '.join(map(str, missing)) or '(none)'} is not available to this process "
            f"(available: {_cpu_list(available)})"
        )
    set_process_cpus(os.getpid(), cpus)  # imports may already have started threads: every one of them moves
    set_process_batch(os.getpid(), True)


def set_process_cpus(pid: int, cpus: tuple[int, ...]) -> None:
    """Every thread of process `pid` onto `cpus` (what `taskset -a -p` does); threads started later inherit it."""
    for thread in _threads_of(pid):
        try:
            os.sched_setaffinity(thread, cpus)
        except ProcessLookupError:
            pass  # it ended meanwhile


def set_process_batch(pid: int, batch: bool) -> None:
    """Every thread of process `pid` to SCHED_BATCH (no wake-up preemption) or back to SCHED_OTHER; threads started
    later inherit it. Where the OS refuses, the process keeps its policy: it is a speed matter, not a correctness one.
    """
    policy = os.SCHED_BATCH if batch else os.SCHED_OTHER
    for thread in _threads_of(pid):
        try:
            os.sched_setscheduler(thread, policy, os.sched_param(0))
        except ProcessLookupError:
            pass  # it ended meanwhile
        except OSError as error:
            log.warning("cannot set the scheduling policy of thread %d: %s", thread, error)
            return


def _threads_of(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def _cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2,5' (taskset's form)."""
    ranges: list[list[int]] = []
    for cpu in cpus:
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
