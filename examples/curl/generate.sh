#!/usr/bin/env bash
# Native JSON generation (seed 001): POST /generate, blocking then streaming (SSE ending in data: [DONE]).
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

# Defaults: max_length 8192 (clipped to the context), temperature 0.7, top_p 0.9, top_k 80, repetition_penalty 1.15,
# do_sample true (false = greedy). The prompt is used as is (no chat template).
echo "== blocking"
"${CURL[@]}" "$BASE/generate" -H 'Content-Type: application/json' \
  -d '{"prompt": "Explain cake in one line:", "max_length": 64, "temperature": 0.7, "seed": 1}'
echo

echo "== streaming"
"${CURL[@]}" -N "$BASE/generate" -H 'Content-Type: application/json' \
  -d '{"prompt": "Hello", "max_length": 32, "stream": true}'
