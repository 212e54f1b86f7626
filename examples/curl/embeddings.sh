#!/usr/bin/env bash
# OpenAI embeddings: POST /v1/embeddings, two sentences as float vectors (pooled as the server's --pooling says).
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

"${CURL[@]}" "$BASE/v1/embeddings" -H 'Content-Type: application/json' \
  -d '{"input": ["The capital of France is Paris.", "Bananas are yellow."]}'
echo
