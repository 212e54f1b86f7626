"""A long prompt's prefill through master + 2 workers: each step whole, one stage after the other, against the same
step cut into pieces that the two workers compute at once (`--micro-batch-tokens`), and a single node.

    .venv/bin/python benchmarks/pipelined_prefill.py [--prompt-tokens 1024] [--rounds 6] [--micro-batch-tokens 128]
                                                     [--dense] [--unpinned] [--workers 2] [--master-layers 0]

SmolLM2 (the embedded Q4_1 GGUF, bf16 with 4-bit kernels; `--dense`: the Hub's bf16 checkpoint, every weight
dequantized, as benchmarks/cluster.py writes it), prefilled in steps of 512 tokens as `cake serve` does;
the time is the whole prompt through every layer (the time to first token, less sampling). The workers are real
`cake worker` processes on 127.0.0.1 with one torch thread each, the first on core 0 and the second on core 1 (as two
machines would each hold their own; `--unpinned`: wherever the OS puts them, as scripts/serve.sh starts them); the
master is this process, with one thread. `--master-layers N`: the master holds the last N layers itself (as in
examples/cluster-3-node.yaml) and the workers share the others; `--workers 1 --master-layers 15` is master and one
worker half and half. Each round runs every configuration once, back to back: this VM has slow phases lasting
seconds, so ratios are medians of per-round ratios.

Configurations:
  cluster, whole      every step through worker 1, then worker 2 (`--micro-batch-tokens 0`)
  cluster, pieces     every step cut into pieces, in flight at once (the default, 128 tokens a piece)
  single, 1 thread    one process, every layer, one thread
  single, 2 threads   the same with a thread per core
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
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
from cake_py.cluster.pipeline import Pipeline  # noqa: E402
from cake_py.config import ServeSettings, WorkerSpec  # noqa: E402
from cake_py.models.device import set_process_cpus  # noqa: E402
from cake_py.models.hub import resolve_model  # noqa: E402
from cake_py.models.kv_cache import SequenceSlice  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from cluster import write_dense_checkpoint  # noqa: E402

SEQ_IDS = itertools.count(1_000_000)
STEP_TOKENS = 512  # cake serve's --max-batch-tokens default


def prefill_s(pipeline: Pipeline, ids: list[int]) -> float:
    """Seconds to run `ids` through every layer in steps of STEP_TOKENS, as a fresh sequence (then released)."""
    seq_id = next(SEQ_IDS)
    began = time.perf_counter()
    for start in range(0, len(ids), STEP_TOKENS):
        chunk = ids[start : start + STEP_TOKENS]
        pipeline.run(torch.tensor(chunk), [SequenceSlice(seq_id, start, len(chunk))], [len(chunk) - 1])
    elapsed = time.perf_counter() - began
    pipeline.release([seq_id])
    return elapsed


def start_worker(index: int, cache: Path, pin: bool) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:  # a free port (another run may hold fixed ones)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cpus = sorted(os.sched_getaffinity(0))
    command = [sys.executable, "-m", "cake_py.cli", "worker", "--host", "127.0.0.1", "--port", str(port),
               "--threads", "1", "--cache-dir", str(cache / str(index)), "--log-level", "warning",
               *(["--cpus", str(cpus[index % len(cpus)])] if pin else [])]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL), f"127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--micro-batch-tokens", type=int, default=128)
    parser.add_argument("--dense", action="store_true", help="the Hub's bf16 checkpoint: every weight dequantized")
    parser.add_argument("--unpinned", action="store_true", help="workers wherever the OS puts them (as serve.sh)")
    parser.add_argument("--workers", type=int, default=2, help="how many workers")
    parser.add_argument("--master-layers", type=int, default=0, help="the last N layers stay on the master")
    args = parser.parse_args()
    source = resolve_model(None)
    text = "Paris is the capital of France, on the Seine, known for its museums, cafes and bridges. "
    ids = source.tokenizer.encode(text * (args.prompt_tokens // 10))[: args.prompt_tokens]
    everywhere = tuple(sorted(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as cache:
        if args.dense:
            (Path(cache) / "dense").mkdir()
            source = write_dense_checkpoint(source, Path(cache) / "dense")
        started = [start_worker(index, Path(cache), not args.unpinned) for index in range(args.workers)]
        time.sleep(1.0)
        try:
            shared = source.config.n_layers - args.master_layers  # the workers' layers, in equal runs
            bounds = [shared * index // args.workers for index in range(args.workers + 1)]
            specs = [
                WorkerSpec(f"w{index}", address, (bounds[index], bounds[index + 1]) if args.master_layers else None)
                for index, (_, address) in enumerate(started)
            ]
            settings = ServeSettings(dtype="bfloat16", workers=specs, micro_batch_tokens=args.micro_batch_tokens)
            pieces = build_pipeline(settings, source, "cpu")
            whole = Pipeline(pieces.ends, pieces.stages, micro_batch_tokens=0)  # the same workers and connections
            single = build_pipeline(ServeSettings(dtype="bfloat16"), source, "cpu")
            setups = {  # pipeline, torch threads of this process
                "cluster, whole": (whole, 1),
                "cluster, pieces": (pieces, 1),
                "single, 1 thread": (single, 1),
                f"single, {len(everywhere)} threads": (single, len(everywhere)),
            }
            set_process_cpus(os.getpid(), everywhere)
            for pipeline, threads in setups.values():  # warm: weights paged in, kernels chosen
                torch.set_num_threads(threads)
                prefill_s(pipeline, ids[:STEP_TOKENS])
            times: dict[str, list[float]] = {name: [] for name in setups}
            for _ in range(args.rounds):
                for name, (pipeline, threads) in setups.items():
                    torch.set_num_threads(threads)
                    times[name].append(prefill_s(pipeline, ids))
            pieces.close()
        finally:
            for process, _ in started:
                process.terminate()
                process.wait(timeout=30)
    print(f"prefill of {len(ids)} tokens in steps of {STEP_TOKENS}, {args.rounds} rounds (median s, tok/s):")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {name:<20} {median:7.3f} s  {len(ids) / median:7.1f} tok/s"
            f"   (rounds: {min(values):.3f}-{max(values):.3f})"
        )
    ratios = {
        name: statistics.median(a / b for a, b in zip(times["cluster, whole"], times[name], strict=True))
        for name in times
    }
    print("speed-up over the cluster running each step whole (median of per-round ratios):")
    for name, ratio in ratios.items():
        print(f"  {name:<20} {ratio:5.2f}x")


if __name__ == "__main__":
    main()
