#!/usr/bin/env bash
# Native multipart generation (seed 000): POST /generate as a form; text outputs are base64 UTF-8.
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

echo "== blocking: {request_id, outputs: {text: [{data: <base64>, metadata: {finish_reason, usage, model}}]}}"
"${CURL[@]}" "$BASE/generate" -F 'text=Hello' -F 'streaming=false' -F 'output_modalities=text' \
  -F 'model_kwargs={"max_output_tokens": 64, "temperature": 0.7, "system": "Answer briefly."}' \
  -F 'request_id=curl-example'
echo

echo "== streaming: application/x-ndjson, one object per line; the last has \"done\": true"
"${CURL[@]}" -N "$BASE/generate" -F 'text=Tell me a story' -F 'streaming=true' \
  -F 'model_kwargs={"max_output_tokens": 32}'
