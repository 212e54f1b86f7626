#!/usr/bin/env bash
# Model management (seed 001), the read-only routes: what is served, and what could be loaded.
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

echo "== GET /models/current"
"${CURL[@]}" "$BASE/models/current"
echo
echo "== GET /models/available (\"load_as\" is what to send to /models/load)"
"${CURL[@]}" "$BASE/models/available"
echo
# Switching the model re-places it across the whole cluster (requests meanwhile get 503 with Retry-After):
#   curl -sS "$BASE/models/load" -H 'Content-Type: application/json' -d '{"model_id": "HuggingFaceTB/SmolLM2-360M-Instruct"}'
#   curl -sS "$BASE/models/load" -H 'Content-Type: application/json' -d '{"model_id": null}'   # the embedded default
#   curl -sS -X POST "$BASE/models/unload"
