"""Chaos against a real cluster: concurrent chats while workers are killed, paused, terminated, and clients leave.

    .venv/bin/python scripts/chaos.py [--rounds 12] [--seed 1] [--actions kill,stop,term,kill_both,cancel]
                                      [--port 18793] [--worker-port 18820] [--serve-args "--failover-after 5"]

Starts two `cake worker`s and a `cake serve` master on the embedded SmolLM2 (one torch thread each), takes each
prompt's greedy answer, then runs rounds: 1-5 chats at once (streamed or not), and while they run one action —
SIGKILL a worker, SIGTERM it, SIGSTOP it for 1-8 s, SIGKILL both, or open 1-4 chats and drop their connections.
After each round the dead workers are started again, and it checks what a user would notice:

- every request ended (none hangs past 150 s) with a 200, a 503, or a stream whose last event is an error;
- /health is 200 again within 120 s, and a greedy request then answers as before;
- once idle, no worker holds a sequence's KV caches (the master runs with `--prefix-cache-tokens 0`).

Answers that finished differently from the prompt's answer alone are listed, not counted: in bf16 a near-tie can
go the other way when prompts share a step (README, Performance); add `--serve-args "--dtype float32"` to count
them. Exits 1 if anything failed; every process it started is stopped.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CAKE = str(ROOT / ".venv" / "bin" / "cake")
PROMPTS = [
    "Tell me a story about a dragon.",
    "What is the capital of France?",
    "List five fruits.",
    "Summarize: " + "The quick brown fox jumps over the lazy dog. " * 150,  # a prefill of several chunks
]


class Cluster:
    def __init__(self, port: int, worker_port: int, serve_args: list[str], log_dir: Path) -> None:
        self.port, self.worker_ports, self.serve_args = port, [worker_port, worker_port + 1], serve_args
        self.log = (log_dir / "processes.log").open("ab")
        self.cache = log_dir / "cache"
        self.workers = [self.start_worker(0), self.start_worker(1)]
        addresses = ",".join(f"127.0.0.1:{p}" for p in self.worker_ports)
        command = [CAKE, "serve", "--workers", addresses, "--port", str(port), "--threads", "1"]
        command += ["--rate-limit", "0", "--prefix-cache-tokens", "0", *serve_args]
        self.master = subprocess.Popen(command, stdout=self.log, stderr=self.log, start_new_session=True)

    def start_worker(self, index: int) -> subprocess.Popen[bytes]:
        command = [CAKE, "worker", "--host", "127.0.0.1", "--port", str(self.worker_ports[index]), "--name"]
        command += [f"chaos-{index}", "--threads", "1", "--cache-dir", str(self.cache / str(index))]
        return subprocess.Popen(command, stdout=self.log, stderr=self.log, start_new_session=True)

    def restart_dead(self) -> None:
        for index, worker in enumerate(self.workers):
            if worker.poll() is not None:
                self.workers[index] = self.start_worker(index)

    def stop(self) -> None:
        for process, sig in ((self.master, signal.SIGINT), *((w, signal.SIGTERM) for w in self.workers)):
            try:
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, sig)
                process.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def get(self, path: str) -> tuple[int | None, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        except (OSError, ValueError):
            return None, None
        finally:
            connection.close()

    def wait_healthy(self, limit_s: float) -> float | None:
        began = time.monotonic()
        while time.monotonic() - began < limit_s:
            if self.get("/health")[0] == 200:
                return time.monotonic() - began
            time.sleep(0.3)
        return None

    def chat(self, prompt: str, stream: bool) -> dict[str, Any]:
        body = {"model": "chaos", "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        body |= {"max_tokens": 40 if len(prompt) < 100 else 8, "stream": stream}
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=150)
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            return {"status": response.status, "body": response.read().decode()}
        except OSError as error:
            return {"status": None, "body": repr(error)}
        finally:
            connection.close()

    def leave(self, prompt: str, after_s: float) -> None:
        """A client that sends a chat and drops its connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = {"model": "chaos", "messages": [{"role": "user", "content": prompt}], "max_tokens": 200}
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        time.sleep(after_s)
        connection.close()


def answer(result: dict[str, Any], stream: bool) -> str | None:
    """The answer's text; None for an error (a non-200, or a stream that ended with an error event)."""
    if result["status"] != 200:
        return None
    if not stream:
        return str(json.loads(result["body"])["choices"][0]["message"]["content"])
    text = []
    for line in result["body"].splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                return None
            text += [choice.get("delta", {}).get("content") or "" for choice in event.get("choices", [])]
    return "".join(text)


def act(cluster: Cluster, action: str, rng: random.Random) -> None:
    victim = cluster.workers[rng.randrange(2)]
    if action == "kill":
        victim.kill()
        victim.wait()
    elif action == "term":
        victim.terminate()
        victim.wait(30)
    elif action == "kill_both":
        for worker in cluster.workers:
            worker.kill()
            worker.wait()
    elif action == "stop":
        os.kill(victim.pid, signal.SIGSTOP)
        time.sleep(rng.uniform(1, 8))
        os.kill(victim.pid, signal.SIGCONT)
    elif action == "cancel":
        for _ in range(rng.randint(1, 4)):
            cluster.leave(rng.choice(PROMPTS), rng.uniform(0, 0.5))
    else:
        raise SystemExit(f"unknown action {action!r}: kill, term, kill_both, stop or cancel")


def run_round(cluster: Cluster, action: str, rng: random.Random, alone: dict[str, str | None]) -> list[str]:
    results: list[tuple[str, bool, dict[str, Any]]] = []
    chats = [(rng.choice(PROMPTS), rng.random() < 0.5) for _ in range(rng.randint(1, 5))]
    threads = [threading.Thread(target=lambda p=p, s=s: results.append((p, s, cluster.chat(p, s)))) for p, s in chats]
    for thread in threads:
        thread.start()
    time.sleep(rng.uniform(0.0, 1.5))
    act(cluster, action, rng)
    for thread in threads:
        thread.join(150)
    failures = [f"{sum(t.is_alive() for t in threads)} request(s) still running after 150 s"] * any(
        t.is_alive() for t in threads
    )
    differed = []
    for prompt, stream, result in results:
        if result["status"] not in (200, 503):
            failures.append(f"a chat answered {result['status']}: {result['body'][:300]}")
        text = answer(result, stream)
        before = alone[prompt] or ""
        if text is not None and text != before:
            at = next((i for i, (a, b) in enumerate(zip(text, before, strict=False)) if a != b), len(before))
            where = slice(max(0, at - 20), at + 40)
            differed.append(f"{prompt[:30]!r} answered …{text[where]!r}…, alone …{before[where]!r}…")
    if any(worker.poll() is not None for worker in cluster.workers):
        time.sleep(3)  # past the master's ping timeout: /health answered 200 until its monitor saw them go
    cluster.restart_dead()
    if cluster.wait_healthy(120) is None:
        failures.append("/health not 200 within 120 s of the workers' restart")
    deadline = time.monotonic() + 15
    while True:
        status, topology = cluster.get("/api/v1/topology")
        held = {w["name"]: w.get("live_sequences") for w in topology["workers"]} if status == 200 else None
        if held is not None and not any(held.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if held is None or any(held.values()):
        failures.append(f"KV caches still held once idle: {held}")
    check = answer(cluster.chat(PROMPTS[1], False), False)
    if check != alone[PROMPTS[1]]:
        failures.append(f"after the round a greedy check answered {check!r}, before {alone[PROMPTS[1]]!r}")
    print(f"  {len(results)} chat(s): {[r['status'] for _, _, r in results]}; differed: {differed or 'none'}")
    return failures + (differed if "float32" in " ".join(cluster.serve_args) else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--actions", default="kill,stop,term,kill_both,cancel")
    parser.add_argument("--port", type=int, default=18793)
    parser.add_argument("--worker-port", type=int, default=18820, help="and the port after it")
    parser.add_argument("--serve-args", default="", help="more `cake serve` flags, e.g. --failover-after 5")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    actions = args.actions.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="cake-chaos-"))
    cluster = Cluster(args.port, args.worker_port, args.serve_args.split(), log_dir)
    failed: list[str] = []
    try:
        if cluster.wait_healthy(300) is None:
            raise SystemExit(f"the cluster did not start; see {log_dir / 'processes.log'}")
        alone = {prompt: answer(cluster.chat(prompt, False), False) for prompt in PROMPTS}
        for index in range(args.rounds):
            action = rng.choice(actions)
            print(f"round {index}: {action}", flush=True)
            failures = run_round(cluster, action, rng, alone)
            failed += [f"round {index} ({action}): {failure}" for failure in failures]
    finally:
        cluster.stop()
    print(f"\n{len(failed)} problem(s); the processes' output: {log_dir / 'processes.log'}")
    for failure in failed:
        print(" ", failure)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
