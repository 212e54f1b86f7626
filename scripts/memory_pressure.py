"""Workers short of memory, for real: each in a cgroup whose limit leaves it little room for KV caches.

    sudo .venv/bin/python scripts/memory_pressure.py [--room-mb 80] [--keep-free-mb 32] [--chats 8] [--tokens 300]
                                                      [--port 18794] [--worker-port 18821]

Starts two `cake worker`s, each in a memory cgroup of its own (v1 or v2, made under this process's cgroup; root
needed), and a `cake serve` master over them on the embedded SmolLM2 in float32. Once the model is placed, each
worker's limit is set to what it uses then plus --room-mb, as `docker run --memory` would hold it, and each keeps
--keep-free-mb of that from its KV caches (`cake worker --keep-free-mb`: a step's own working memory). It asks the first
two prompts alone, then --chats chats at once, and checks what a user would notice:

- every chat is answered (200), and the two asked alone before are answered as then (float32: the same tokens);
- no worker was killed by the kernel for its cgroup (the KV-cache guard, README "Memory for KV caches", must have
  kept them within their room: sequences wait for memory and are computed again instead);
- it prints how many sequences waited (`cake_preemptions_total`).

Not in CI (root, cgroups, minutes). Exits 1 if anything failed; every process and cgroup it made is removed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CAKE = str(ROOT / ".venv" / "bin" / "cake")
TOPICS = ("dragon", "cat", "ship", "tree", "robot", "river", "castle", "comet")


class Cgroup:
    """A memory cgroup of its own under this process's, v1 or v2."""

    def __init__(self, name: str) -> None:
        v1 = Path("/sys/fs/cgroup/memory")
        own = _own_path("memory") if v1.is_dir() else _own_path("")
        base = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
        self.path = base / own.strip("/") / name
        self.v1 = v1.is_dir()
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as error:
            sys.exit(f"memory_pressure: cannot make the cgroup {self.path} ({error}): run as root on a host with a "
                     "memory cgroup controller")  # fmt: skip

    def used(self) -> int:
        """What it holds, less the page cache the kernel would reclaim first (the weights just written to disk)."""
        used = int((self.path / ("memory.usage_in_bytes" if self.v1 else "memory.current")).read_text())
        key = "total_inactive_file" if self.v1 else "inactive_file"
        for line in (self.path / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                used -= int(value)
        return used

    def limit(self, nbytes: int) -> None:
        (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(nbytes))

    def oom_kills(self) -> int:
        text = (self.path / ("memory.oom_control" if self.v1 else "memory.events")).read_text().split()
        return int(text[text.index("oom_kill") + 1]) if "oom_kill" in text else 0

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as error:
            print(f"could not remove {self.path}: {error}")


def _own_path(controller: str) -> str:
    """This process's cgroup path in the hierarchy of `controller` ("" for v2's)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller == "" and controllers == "") or (controller and controller in controllers.split(",")):
            return path
    return "/"


def post(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=900) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--room-mb", type=int, default=80, help="memory each worker gets over what it holds loaded")
    parser.add_argument("--keep-free-mb", type=int, default=32, help="of which its KV caches never take this much")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--port", type=int, default=18794)
    parser.add_argument("--worker-port", type=int, default=18821)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="cake-memory-"))
    log = (logs / "processes.log").open("ab")
    groups = [Cgroup(f"cake-memory-{os.getpid()}-{index}") for index in range(2)]
    processes: list[subprocess.Popen[bytes]] = []
    problems: list[str] = []
    try:
        for index, group in enumerate(groups):
            worker = f"{CAKE} worker --host 127.0.0.1 --port {args.worker_port + index} --name pressed-{index} "
            worker += f"--threads 1 --keep-free-mb {args.keep_free_mb} --cache-dir {logs / 'cache' / str(index)}"
            command = f"echo $$ > {group.path / 'cgroup.procs'} && exec {worker}"
            processes.append(subprocess.Popen(["bash", "-c", command], stdout=log, stderr=log, start_new_session=True))
        workers = ",".join(f"127.0.0.1:{args.worker_port + index}" for index in range(2))
        serve = [CAKE, "serve", "--workers", workers, "--port", str(args.port), "--dtype", "float32", "--threads", "1"]
        serve += ["--rate-limit", "0", "--prefix-cache-tokens", "0"]
        processes.append(subprocess.Popen(serve, stdout=log, stderr=log, start_new_session=True))
        deadline = time.monotonic() + 300
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the cluster did not become healthy; see {logs / 'processes.log'}")
            time.sleep(1)
        for index, group in enumerate(groups):
            used = group.used()
            group.limit(used + args.room_mb * (1 << 20))
            print(f"worker {index}: {used >> 20} MiB loaded, limited to {args.room_mb} MiB more")
        prompts = [f"Write a long story about a {TOPICS[i % len(TOPICS)]}." for i in range(args.chats)]

        def body(prompt: str) -> dict[str, Any]:
            messages = [{"role": "user", "content": prompt}]
            return {"model": "any", "messages": messages, "max_tokens": args.tokens, "temperature": 0} | {
                "ignore_eos": True
            }

        alone = [post(args.port, body(prompt)) for prompt in prompts[:2]]
        with concurrent.futures.ThreadPoolExecutor(args.chats) as pool:
            together = list(pool.map(lambda prompt: post(args.port, body(prompt)), prompts))
        print("alone:", [status for status, _ in alone], "together:", [status for status, _ in together])
        for prompt, (status, answer) in zip(prompts, together, strict=True):
            if status != 200:
                problems.append(f"{prompt!r}: {status} {answer}")
        for prompt, (_, first), (_, second) in zip(prompts, alone, together, strict=False):
            if "choices" in first and "choices" in second:
                if first["choices"][0]["message"]["content"] != second["choices"][0]["message"]["content"]:
                    problems.append(f"{prompt!r} answered otherwise than alone")
        with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/metrics") as answer:
            metrics = answer.read().decode()
        waited = [line for line in metrics.splitlines() if line.startswith("cake_preemptions_total")]
        print("sequences that waited for memory:", waited[0].split()[-1] if waited else "?")
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for index, group in enumerate(groups):
            if group.oom_kills():
                problems.append(f"worker {index} was killed by the kernel for its cgroup")
            group.remove()
    for problem in problems:
        print("PROBLEM:", problem)
    print(f"{len(problems)} problem(s); the processes' output: {logs / 'processes.log'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
