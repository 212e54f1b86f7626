#!/usr/bin/env bash
# OpenAI-compatible chat: POST /v1/chat/completions, blocking then streaming (SSE).
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

echo "== blocking"
"${CURL[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"}
  ],
  "max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 42, "stop": ["\n\n"]
}'
echo

echo "== streaming: a role chunk, content deltas, a finish chunk with usage, then data: [DONE]"
"${CURL[@]}" -N "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "Write a haiku about cake."}],
  "max_tokens": 32, "stream": true
}'

echo "== the same route under Cake's alias, two choices (seed + i for choice i)"
"${CURL[@]}" "$BASE/api/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "Name a cake."}], "max_tokens": 16, "n": 2, "seed": 7
}'
echo
