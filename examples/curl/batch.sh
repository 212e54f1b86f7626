#!/usr/bin/env bash
# Native batch (seed 001): POST /generate/batch runs every prompt concurrently in the engine (up to 64).
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

"${CURL[@]}" "$BASE/generate/batch" -H 'Content-Type: application/json' \
  -d '{"prompts": ["Write a haiku about nature", "Tell a short joke"], "max_length": 64}'
echo
