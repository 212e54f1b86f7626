#!/usr/bin/env bash
# Sets everything up, then runs every check CI runs: lint, types, stale generated code, the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
.venv/bin/ruff check cake_py tests scripts benchmarks examples
.venv/bin/ruff format --check cake_py tests scripts benchmarks examples
.venv/bin/mypy
# CAKE_NO_SKIP turns any skipped test into a failure: CI must run the browser, cluster and parity tests.
CAKE_NO_SKIP=1 .venv/bin/python -m pytest -q --durations=30 "$@"
