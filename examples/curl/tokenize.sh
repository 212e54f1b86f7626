#!/usr/bin/env bash
# Tokens: POST /tokenize (vLLM's prompt and messages forms, llama.cpp's content form), POST /detokenize.
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

tokenized=$("${CURL[@]}" "$BASE/tokenize" -H 'Content-Type: application/json' \
  -d '{"prompt": "Hello, world!", "return_token_strs": true}')
echo "$tokenized"
"${CURL[@]}" "$BASE/tokenize" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}'
echo
"${CURL[@]}" "$BASE/tokenize" -H 'Content-Type: application/json' -d '{"content": "Hello, world!", "with_pieces": true}'
echo
# Back to text: the ids of "Hello, world!" above.
ids=$(sed -E 's/.*"tokens":(\[[^]]*\]).*/\1/' <<<"$tokenized")
"${CURL[@]}" "$BASE/detokenize" -H 'Content-Type: application/json' -d "{\"tokens\": $ids}"
echo
