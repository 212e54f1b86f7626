"""Process placement: --cpus pins every thread of the process, those started before and after the call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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
    result = {"masks": masks(), "error": error}
    release.set()
    print(json.dumps(result))
    """
)


def pin(cpus: list[int] | None) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cpus)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_every_thread_is_pinned() -> None:
    cpu = max(os.sched_getaffinity(0))
    assert pin([cpu]) == {"masks": [str(cpu)], "error": None}


def test_none_leaves_the_mask_alone() -> None:
    result = pin(None)
    assert result["error"] is None
    assert len(result["masks"]) == 1  # type: ignore[arg-type]


def test_unavailable_cpu_is_named() -> None:
    missing = max(os.sched_getaffinity(0)) + 1000
    result = pin([0, missing])
    assert str(missing) in str(result["error"]) and "available" in str(result["error"])


def test_empty_set_is_an_error() -> None:
    assert "not available" in str(pin([])["error"])
