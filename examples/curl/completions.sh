#!/usr/bin/env bash
# OpenAI-compatible plain completion: POST /v1/completions (no chat template), with log-probabilities.
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

"${CURL[@]}" "$BASE/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "The best cake is", "max_tokens": 32, "temperature": 0.8, "logprobs": 2}'
echo
