#!/usr/bin/env bash
# Sets everything up, then runs the main job: `cake serve` on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cake serve "$@"
