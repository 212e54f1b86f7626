"""Cluster overhead: decode ms/token of SmolLM2 on one node vs master + 2 workers on loopback, and one hop's cost.

    .venv/bin/python benchmarks/cluster.py [--tokens 64] [--runs 3]

Same model (the embedded Q4_1 GGUF, bf16), same prompt, greedy, EOS ignored, median of --runs after a warm-up,
everything measured in this one run. The workers are real `cake worker` processes on 127.0.0.1 with one torch
thread each; the master is this process. A hop's cost is the round trip the master sees minus the worker's own
compute time, per Forward call (p50), i.e. what gRPC, the codec and the stream add.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cake_py.api.server import build_pipeline  # noqa: E402
from cake_py.cluster.stage import StageStats  # noqa: E402
from cake_py.config import ServeSettings, WorkerSpec  # noqa: E402
from cake_py.engine.engine import Engine  # noqa: E402
from cake_py.models.device import release_openmp_threads  # noqa: E402
from cake_py.models.hub import ModelSource, resolve_model  # noqa: E402
from cake_py.models.sampling import SamplingParams  # noqa: E402


class RecordingStats(StageStats):
    """StageStats that also keeps every call's figures."""

    def __init__(self) -> None:
        super().__init__()
        self.hops_ms: list[float] = []

    def record(self, forward_ms: float, round_trip_ms: float = 0.0, sent: int = 0, received: int = 0) -> None:
        super().record(forward_ms, round_trip_ms, sent, received)
        if round_trip_ms:
            self.hops_ms.append(round_trip_ms - forward_ms)


def decode_ms(engine: Engine, ids: list[int], tokens: int, runs: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    times = []
    for run in range(runs + 1):
        first = None
        for event in engine.generate(ids, params):
            if event.error:
                raise SystemExit(f"generation failed: {event.error}")
            if first is None and event.tokens:
                first = time.perf_counter()
        assert first is not None
        if run:
            times.append((time.perf_counter() - first) / (tokens - 1) * 1000)
    return statistics.median(times)


def run_config(
    source: ModelSource, settings: ServeSettings, threads: int, ids: list[int], tokens: int, runs: int
) -> tuple[float, list[float]]:
    torch.set_num_threads(threads)
    pipeline = build_pipeline(settings, source, "cpu")
    recorders = []
    for stage in pipeline.stages:
        stage.stats = RecordingStats()
        recorders.append(stage.stats)
    engine = Engine(pipeline, source.tokenizer)
    release_openmp_threads()  # loading ran on this thread; the engine thread must own the only OpenMP pool
    engine.start()
    try:
        result = decode_ms(engine, ids, tokens, runs)
    finally:
        engine.stop()
        pipeline.close()
    hops = [hop for recorder in recorders for hop in recorder.hops_ms]
    for stage, recorder in zip(pipeline.stages, recorders, strict=True):
        print(f"  {stage.name}: layers {stage.start}-{stage.end - 1}, forward {recorder.forward_ms:.2f} ms (avg)")
    return result, hops


def start_workers(count: int, cache: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    processes, addresses = [], []
    for index in range(count):
        port = 10700 + index
        command = [sys.executable, "-m", "cake_py.cli", "worker", "--host", "127.0.0.1", "--port", str(port),
                   "--threads", "1", "--cache-dir", str(cache / str(index)), "--log-level", "warning"]  # fmt: skip
        processes.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ}))
        addresses.append(f"127.0.0.1:{port}")
    return processes, addresses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--master-threads", type=int, default=1)
    args = parser.parse_args()
    source = resolve_model(None)
    ids = source.tokenizer.encode_chat([{"role": "user", "content": "Tell me about Paris."}])
    single = ServeSettings(dtype="bfloat16")
    with tempfile.TemporaryDirectory() as cache:
        workers, addresses = start_workers(2, Path(cache))
        try:
            cluster = ServeSettings(dtype="bfloat16", workers=[WorkerSpec(f"w{i}", a) for i, a in enumerate(addresses)])
            one_1, _ = run_config(source, single, 1, ids, args.tokens, args.runs)
            one_2, _ = run_config(source, single, 2, ids, args.tokens, args.runs)
            two, hops = run_config(source, cluster, args.master_threads, ids, args.tokens, args.runs)
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()
    hops.sort()
    p50, p90 = hops[len(hops) // 2], hops[int(len(hops) * 0.9)]
    print(f"SmolLM2-135M Q4_1, bf16, {len(ids)}-token prompt, {args.tokens} new tokens, median of {args.runs}")
    print(f"single node, 1 thread              {one_1:7.2f} ms/token")
    print(f"single node, 2 threads             {one_2:7.2f} ms/token")
    print(f"master ({args.master_threads} thr) + 2 workers (1 thr) {two:7.2f} ms/token  "
          f"= {two / one_1:.2f}x single/1 thread, {two / one_2:.2f}x single/2 threads")  # fmt: skip
    print(f"one hop (round trip - worker compute): p50 {p50:.3f} ms, p90 {p90:.3f} ms over {len(hops)} calls")


if __name__ == "__main__":
    main()
