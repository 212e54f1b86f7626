"""A real `cake serve` process: errors found once the model is loaded, the address it says it serves on, and its
output streams (stdout closed, a terminal that cannot encode the answer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures.cli import assert_one_line_error, cake


def test_a_max_model_len_past_the_models_context_is_one_line(tiny_llama: Path) -> None:
    # The tiny Llama's context is 512 positions (tests/fixtures/tiny_models.py).
    result = cake("serve", str(tiny_llama), "--device", "cpu", "--max-model-len", "100000", timeout=60)
    assert_one_line_error(result, "--max-model-len 100000", "context", "512 tokens")


def test_a_chat_template_that_does_not_compile_names_its_line(tiny_llama: Path) -> None:
    result = cake("serve", str(tiny_llama), "--device", "cpu", "--chat-template", "{{ ok }}\n{% if %}", timeout=60)
    assert_one_line_error(result, "chat template does not compile", "line 2")


def test_serve_on_port_0_says_the_port_it_got(tiny_llama: Path, tmp_path: Path) -> None:
    """`--port 0` (the OS picks a free port) logged "serving … on http://127.0.0.1:0"."""
    import re
    import time

    import httpx

    from tests.fixtures.cluster import CakeProcess

    args = ["serve", str(tiny_llama), "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--threads", "1"]
    server = CakeProcess("serve", [*args, "--dtype", "float32", "--files-dir", str(tmp_path / "files")], tmp_path)
    server.launch()
    try:
        deadline = time.monotonic() + 120
        while not (said := re.search(r"serving llama on http://127\.0\.0\.1:(\d+)", server.stderr)):
            assert server.running and time.monotonic() < deadline, server.stderr[-2000:]
            time.sleep(0.1)
        port = int(said.group(1))
        assert port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        # uvicorn's access lines join cake's own on stderr, timestamped (they went to stdout without a time).
        deadline = time.monotonic() + 10
        while '"GET /health HTTP/1.1" 200' not in server.stderr and time.monotonic() < deadline:
            time.sleep(0.1)
        line = next(line for line in server.stderr.splitlines() if '"GET /health HTTP/1.1" 200' in line)
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line), line
        assert server.stdout == ""
    finally:
        server.kill()


def test_serve_with_stdout_closed_serves_and_run_writes_what_the_terminal_cannot_encode(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """`cake serve >&-` failed once the model was loaded (uvicorn's log config read the closed stdout); `cake run`
    on a terminal whose encoding lacks a character of the answer was a UnicodeEncodeError traceback."""
    import re
    import time

    import httpx

    log = tmp_path / "serve.log"
    command = f'exec "$0" -m cake_py.cli serve {tiny_llama} --port 0 --threads 1 --files-dir {tmp_path} >&-'
    with log.open("w") as sink:
        server = subprocess.Popen(["bash", "-c", command, sys.executable], stderr=sink, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (said := re.search(r"serving llama on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{said.group(1)}/health", timeout=10).status_code == 200
    finally:
        server.kill()
        server.wait()
    environment = {**os.environ, "PYTHONIOENCODING": "ascii"}
    ascii_only = cake("run", str(tiny_llama), "Ünïcödé ☕", "--max-tokens", "24", "--raw", env=environment)
    assert ascii_only.returncode == 0 and "Traceback" not in ascii_only.stderr, ascii_only.stderr


# What a failed startup leaves running: another worker's weight stream, which gRPC's thread loads a layer at a time
# (torch), kept busy here so that the exit meets it every time.
_BUSY_THEN_SERVE = """
import sys, threading, time
import torch
from cake_py.cli import main

def busy() -> None:
    torch.set_num_threads(1)
    layer = torch.randn(1024, 1024)
    while True:
        layer = (layer @ layer).clamp_(-1, 1)

threading.Thread(target=busy, daemon=True).start()
time.sleep(0.5)
sys.exit(main(sys.argv[1:]))
"""


def test_a_startup_error_while_a_thread_is_in_torch_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A startup that failed while another worker's Assign was still streaming printed its error, then aborted:
    `terminate called without an active exception`, rc 134 (1 run in 9 with real workers). The interpreter's exit
    ran C++ destructors under the thread still in torch."""
    missing = str(tmp_path / "missing.gguf")
    args = ["serve", missing, "--port", "0", "--threads", "1", "--files-dir", str(tmp_path / "files")]
    result = subprocess.run(
        [sys.executable, "-c", _BUSY_THEN_SERVE, *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result, "missing.gguf")
