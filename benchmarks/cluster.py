"""Cluster overhead: decode ms/token of SmolLM2 on one node vs master + 2 workers on loopback, and one hop's cost.

    .venv/bin/python benchmarks/cluster.py [--tokens 64] [--rounds 20] [--cpus 0] [--dtype bfloat16|float32] [--dense]
                                           [--device cpu|cuda] [--no-cuda-graphs]

Same model (the embedded Q4_1 GGUF: bf16 with int4 kernels; `--dense` writes it out as the Hub's bf16 safetensors
checkpoint, every weight dequantized; `--dtype float32` computes dense in float32), same prompt, greedy, EOS
ignored. The workers are real `cake worker` processes on 127.0.0.1 with one torch thread each; the master is this
process, with one thread. Every
configuration has its engine loaded and warm from the start, and each round runs one generation of each, a second
or so apart: this VM has slow phases lasting seconds, and only configurations measured close together compare. The
ratios are medians of the per-round ratios.

Configurations:
  single, --cpus       one process, one thread, on the --cpus cores
  single, all cores    one process, one thread per core this process may use
  cluster, --cpus      master + 2 workers, one thread each, all on the --cpus cores (`--cpus` of cake serve/worker:
                       pinned, and SCHED_BATCH)
  cluster, no chain    the same, with every worker answering the master (`--no-chain`) instead of the next worker
  cluster, unpinned    the same processes as "cluster, --cpus" wherever the OS puts them
  cluster, N threads   with --worker-threads N: two more workers with N torch threads each and a short OpenMP spin
                       (--worker-spin, GOMP_SPINCOUNT), unpinned, behind a master computing with one thread

A hop's cost is the round trip the master sees minus the worker's own compute, per Forward call (p50); in a chain,
the chain's time minus its workers' compute, shared out evenly between its stages. "In the pipeline" it includes
running cold after the other processes' layers on a shared core; "back to back" is the hop alone: a third worker
holding one layer, called once per decode token, one call right after another, pinned (--cpus, SCHED_BATCH) and
unpinned.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cake_py.api.server import build_pipeline  # noqa: E402
from cake_py.cluster.pipeline import Pipeline  # noqa: E402
from cake_py.cluster.stage import Stage, StageStats  # noqa: E402
from cake_py.config import ServeSettings, WorkerSpec, parse_cpus  # noqa: E402
from cake_py.engine.engine import Engine  # noqa: E402
from cake_py.models import graphs  # noqa: E402
from cake_py.models.device import release_openmp_threads, set_process_batch, set_process_cpus  # noqa: E402
from cake_py.models.gguf import GGUFWeights  # noqa: E402
from cake_py.models.hub import ModelSource, resolve_model  # noqa: E402
from cake_py.models.kv_cache import SequenceSlice  # noqa: E402
from cake_py.models.sampling import SamplingParams  # noqa: E402
from cake_py.rpc.codec import dtype_from_name  # noqa: E402


class RecordingStats(StageStats):
    """StageStats that also keeps every call's figures."""

    def __init__(self) -> None:
        super().__init__()
        self.hops_ms: list[float] = []
        self.forwards_ms: list[float] = []

    def record(self, forward_ms: float, round_trip_ms: float = 0.0, sent: int = 0, received: int = 0) -> None:
        super().record(forward_ms, round_trip_ms, sent, received)
        self.forwards_ms.append(forward_ms)
        if round_trip_ms:
            self.hops_ms.append(round_trip_ms - forward_ms)


def decode_ms(engine: Engine, ids: list[int], tokens: int) -> float:
    """ms per generated token after the first, of one greedy generation."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    first = None
    for event in engine.generate(ids, params):
        if event.error:
            raise SystemExit(f"generation failed: {event.error}")
        if first is None and event.tokens:
            first = time.perf_counter()
    assert first is not None
    return (time.perf_counter() - first) / (tokens - 1) * 1000


def start_engine(pipeline: Pipeline, source: ModelSource, threads: int, ids: list[int]) -> Engine:
    """An engine whose thread computes with `threads` torch threads: a thread takes the count that is set when it
    first computes, so each engine runs a warm-up generation before the next one's count is set."""
    torch.set_num_threads(threads)
    engine = Engine(pipeline, source.tokenizer)
    release_openmp_threads()  # loading ran on this thread; the engine thread must own the only OpenMP pool
    engine.start()
    decode_ms(engine, ids, 8)
    return engine


def back_to_back_hops(stage: Stage, hidden_size: int, dtype: torch.dtype, device: str, calls: int) -> list[float]:
    """Forward calls of one decode token each to one worker, one right after the other (nothing else runs in
    between): each call's round trip minus the worker's own compute, in ms."""
    recorder = RecordingStats()
    stage.stats = recorder
    hidden = torch.zeros(1, hidden_size, dtype=dtype, device=device)
    seq_id = 1 << 40  # no engine's
    with torch.inference_mode():
        for position in range(calls):
            stage.forward(hidden, [SequenceSlice(seq_id, position, 1)])
    stage.release([seq_id])
    return recorder.hops_ms


def write_dense_checkpoint(source: ModelSource, folder: Path) -> ModelSource:
    """SmolLM2 as the Hub publishes it: a bf16 safetensors folder (config, tokenizer, chat template), written from
    the embedded GGUF with every weight dequantized, and served like any local HF folder."""
    weights = source.weights
    assert isinstance(weights, GGUFWeights)
    save_file(weights.load(weights.names(), torch.bfloat16), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**weights.config, "torch_dtype": "bfloat16"}))
    (folder / "tokenizer.json").write_text(weights.tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps(weights.tokenizer_config()))
    return resolve_model(str(folder))


def start_workers(
    count: int, cache: Path, device: str, graphs_flag: list[str], threads: int = 1, spin: int | None = None
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """`count` workers with `threads` torch threads each; `spin` caps how long their idle OpenMP threads spin."""
    processes, addresses = [], []
    environment = dict(os.environ) if spin is None else {**os.environ, "GOMP_SPINCOUNT": str(spin)}
    for index in range(count):
        with socket.socket() as probe:  # a free port (another run may hold fixed ones)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "cake_py.cli", "worker", "--host", "127.0.0.1", "--port", str(port),
                   "--threads", str(threads), "--cache-dir", str(cache / f"{threads}-{index}"),
                   "--log-level", "warning", "--device", device, *graphs_flag]  # fmt: skip
        processes.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, env=environment))
        addresses.append(f"127.0.0.1:{port}")
    time.sleep(1.0)
    return processes, addresses


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cpus", default="0", help="cores of the pinned configurations (taskset list form)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (4-bit int4 kernels unless --dense) or float32")
    parser.add_argument("--dense", action="store_true", help="the Hub's bf16 checkpoint: every weight dequantized")
    parser.add_argument("--device", default="cpu", help="where the master and the workers compute (cpu or cuda)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="GPU: every step eager")
    parser.add_argument("--hop-calls", type=int, default=200, help="back-to-back Forward calls to one worker")
    parser.add_argument("--worker-threads", type=int, default=0, help="also measure workers with this many threads")
    parser.add_argument("--worker-spin", type=int, default=10000, help="GOMP_SPINCOUNT of --worker-threads workers")
    args = parser.parse_args()
    graphs.set_enabled(args.cuda_graphs)
    everywhere = tuple(sorted(os.sched_getaffinity(0)))
    pinned = parse_cpus(args.cpus) or everywhere
    names = ["single, --cpus", "single, all cores", "cluster, --cpus", "cluster, no chain", "cluster, unpinned"]
    threaded = f"cluster, {args.worker_threads} threads"
    names += [threaded] if args.worker_threads else []
    results: dict[str, list[float]] = {name: [] for name in names}
    stats: dict[str, list[RecordingStats]] = {}
    back_to_back: dict[bool, list[float]] = {}  # unpinned or not: hop ms of back-to-back Forward calls
    with tempfile.TemporaryDirectory() as cache:
        source = resolve_model(None)
        if args.dense:
            (Path(cache) / "dense").mkdir()
            source = write_dense_checkpoint(source, Path(cache) / "dense")
        ids = source.tokenizer.encode_chat([{"role": "user", "content": "Tell me about Paris."}])
        graphs_flag = [] if args.cuda_graphs else ["--no-cuda-graphs"]
        workers, addresses = start_workers(3, Path(cache), args.device, graphs_flag)
        more_addresses: list[str] = []
        if args.worker_threads:
            more, more_addresses = start_workers(
                2, Path(cache), args.device, graphs_flag, args.worker_threads, args.worker_spin
            )
            workers += more
        specs = [WorkerSpec(f"w{i}", address) for i, address in enumerate(addresses[:2])]
        engines: dict[str, Engine] = {}
        try:
            single = build_pipeline(ServeSettings(dtype=args.dtype), source, args.device)
            cluster = build_pipeline(ServeSettings(dtype=args.dtype, workers=specs), source, args.device)
            # The same stages (workers, connections) behind a pipeline that never chains.
            unchained = Pipeline(cluster.ends, cluster.stages, chain=False)
            setups = {  # pipeline, torch threads
                "single, --cpus": (single, 1),
                "single, all cores": (single, len(everywhere)),
                "cluster, --cpus": (cluster, 1),
                "cluster, no chain": (unchained, 1),
                "cluster, unpinned": (cluster, 1),
            }
            if args.worker_threads:  # the master keeps one thread: a second pool would make libgomp stop spinning
                threaded_specs = [WorkerSpec(f"t{i}", address) for i, address in enumerate(more_addresses)]
                settings = ServeSettings(dtype=args.dtype, workers=threaded_specs)
                setups[threaded] = (build_pipeline(settings, source, args.device), 1)
            for name, (pipeline, threads) in setups.items():
                engines[name] = start_engine(pipeline, source, threads, ids)
                stats[name] = [RecordingStats() for _ in pipeline.stages]
            for round_index in range(args.rounds):
                for name in names:
                    unpinned = name in ("single, all cores", "cluster, unpinned", threaded)
                    for pid in [os.getpid()] + [worker.pid for worker in workers]:
                        set_process_cpus(pid, everywhere if unpinned else pinned)
                        set_process_batch(pid, not unpinned)  # as --cpus does
                    engine = engines[name]
                    for stage, recorder in zip(engine.pipeline.stages, stats[name], strict=True):
                        stage.stats = recorder
                    results[name].append(decode_ms(engine, ids, args.tokens))
                print(f"round {round_index + 1}: " + ", ".join(f"{n} {results[n][-1]:.2f}" for n in names), flush=True)
            # The hop alone: a third worker holding one layer, called back to back (the master keeps the rest).
            torch.set_num_threads(1)
            one_layer = build_pipeline(
                ServeSettings(dtype=args.dtype, workers=[WorkerSpec("hop", addresses[2], layers=(0, 1))]),
                source,
                args.device,
            )
            try:
                for unpinned in (False, True):
                    for pid in [os.getpid()] + [worker.pid for worker in workers]:
                        set_process_cpus(pid, everywhere if unpinned else pinned)
                        set_process_batch(pid, not unpinned)
                    hidden_size = source.config.hidden_size
                    back_to_back[unpinned] = back_to_back_hops(
                        one_layer.stages[0], hidden_size, dtype_from_name(args.dtype), args.device, args.hop_calls
                    )
            finally:
                one_layer.close()
        finally:
            for engine in engines.values():
                engine.stop()
                engine.pipeline.close()  # before the workers go: its stages would report them down
            for worker in workers:
                worker.kill()
                worker.wait()
    median = {name: statistics.median(values) for name, values in results.items()}

    def ratio(over: str, under: str) -> float:
        return statistics.median(a / b for a, b in zip(results[over], results[under], strict=True))

    weights = "Q4_1 dequantized to a bf16 safetensors checkpoint" if args.dense else "Q4_1"
    print(f"\nSmolLM2-135M {weights}, --dtype {args.dtype}, {len(ids)}-token prompt, {args.tokens} new tokens, "
          f"{args.rounds} rounds, --cpus {args.cpus}, {len(everywhere)} cores, --device {args.device}"
          f"{'' if args.cuda_graphs else ' --no-cuda-graphs'}")  # fmt: skip
    for name in names:
        print(f"{name:20s} {median[name]:7.2f} ms/token (median of rounds)")
    for name in ("single, --cpus", "cluster, --cpus"):
        compute = sum(statistics.median(recorder.forwards_ms) for recorder in stats[name])
        print(f"the 30 layers' own compute per token, {name}: {compute:.2f} ms")
    print(f"cluster, --cpus / single, --cpus     {ratio('cluster, --cpus', 'single, --cpus'):.2f}x")
    print(f"cluster, --cpus / single, all cores  {ratio('cluster, --cpus', 'single, all cores'):.2f}x")
    print(f"cluster, no chain / single, --cpus   {ratio('cluster, no chain', 'single, --cpus'):.2f}x")
    print(f"cluster, unpinned / single, all cores {ratio('cluster, unpinned', 'single, all cores'):.2f}x")
    if args.worker_threads:
        print(f"{threaded} / single, all cores  {ratio(threaded, 'single, all cores'):.2f}x")
    hops = {f"in the pipeline, {name}": [h for r in stats[name] for h in r.hops_ms] for name in names[2:]}
    hops["back to back, --cpus"] = back_to_back[False]
    hops["back to back, unpinned"] = back_to_back[True]
    for name, values in hops.items():
        print(f"one hop, {name}: p50 {percentile(values, 0.5):.3f} ms, p90 {percentile(values, 0.9):.3f} ms "
              f"over {len(values)} calls")  # fmt: skip


if __name__ == "__main__":
    main()
