#!/usr/bin/env bash
# Sets everything up, then runs the main job: two local `cake worker`s and the `cake serve` master on the
# embedded default model (SmolLM2-135M-Instruct), at http://127.0.0.1:8080 (override with PORT=...); the workers
# listen on WORKER_PORT and the port after it (10128, 10129).
# Extra arguments go to `cake serve`. Ctrl-C stops the master and both workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT="${PORT:-8080}"
WORKER_PORT="${WORKER_PORT:-10128}"
CACHE="${CAKE_WORKER_CACHE:-.cache/workers}"
# A batch-1 pipeline runs one stage at a time: master and workers on the same core hand each token over with a
# context switch instead of waking an idle core (benchmarks/cluster.py: 1.15-1.22x single node instead of ~1.6x).
CPUS="${CAKE_CPUS:-$(.venv/bin/python -c 'import os; print(min(os.sched_getaffinity(0)))')}"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM HUP
for i in 1 2; do
    # One torch thread each: three processes share this machine's cores without spinning against each other.
    # In a session of their own (setsid), so that Ctrl-C reaches the master alone: it stops first, telling the
    # workers to drop its layers, and cleanup then stops them (with the terminal's Ctrl-C they were gone already).
    setsid .venv/bin/cake worker --host 127.0.0.1 --port $((WORKER_PORT + i - 1)) --name "local-$i" --threads 1 --cpus "$CPUS" \
        --cache-dir "$CACHE/local-$i" &
    pids+=($!)
done
.venv/bin/cake serve --workers "127.0.0.1:$WORKER_PORT,127.0.0.1:$((WORKER_PORT + 1))" --port "$PORT" --threads 1 --cpus "$CPUS" "$@"
