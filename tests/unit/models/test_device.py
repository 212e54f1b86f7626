"""Process placement: --cpus pins every thread of the process, those started before and after the call, and makes
them SCHED_BATCH (no wake-up preemption between stages sharing a core); a GPU's memory is given back and counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading
    from cake_py.errors import ConfigError
    from cake_py.models.device import pin_cpus

    def masks():
        found = set()
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/status") as status:
                found |= {line.split(":")[1].strip() for line in status if line.startswith("Cpus_allowed_list")}
        return sorted(found)

    def policies():
        return sorted({os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")})

    release = threading.Event()
    early = threading.Thread(target=release.wait)  # like a thread an import started
    early.start()
    try:
        cpus = json.loads(sys.argv[1])
        pin_cpus(None if cpus is None else tuple(cpus))
        error = None
    except ConfigError as caught:
        error = str(caught)
    late = threading.Thread(target=release.wait)
    late.start()
    result = {"masks": masks(), "policies": policies(), "error": error}
    release.set()
    print(json.dumps(result))
    """
)


def pin(cpus: list[int] | None) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cpus)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_every_thread_is_pinned_and_batch_scheduled() -> None:
    cpu = max(os.sched_getaffinity(0))
    assert pin([cpu]) == {"masks": [str(cpu)], "policies": [os.SCHED_BATCH], "error": None}


def test_none_leaves_the_mask_and_policy_alone() -> None:
    result = pin(None)
    assert result["error"] is None
    assert len(result["masks"]) == 1  # type: ignore[arg-type]
    assert result["policies"] == [os.sched_getscheduler(0)]


def test_batch_policy_is_undone() -> None:
    from cake_py.models.device import set_process_batch

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        set_process_batch(child.pid, True)
        assert os.sched_getscheduler(child.pid) == os.SCHED_BATCH
        set_process_batch(child.pid, False)
        assert os.sched_getscheduler(child.pid) == os.SCHED_OTHER
    finally:
        child.kill()
        child.wait()


def test_unavailable_cpu_is_named() -> None:
    missing = max(os.sched_getaffinity(0)) + 1000
    result = pin([0, missing])
    assert str(missing) in str(result["error"]) and "available" in str(result["error"])


def test_empty_set_is_an_error() -> None:
    assert "not available" in str(pin([])["error"])


def test_device_memory_is_given_back_and_counted_on_a_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cake_py.models.device import held_device_memory, release_device_memory

    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 7 * 2**30)
    release_device_memory("cpu")
    assert emptied == [] and held_device_memory("cpu") == 0
    release_device_memory("cuda:1")
    assert emptied == [True] and held_device_memory("cuda:1") == 7 * 2**30
