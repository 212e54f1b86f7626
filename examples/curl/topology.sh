#!/usr/bin/env bash
# Cluster topology: GET /api/v1/topology (nodes, layer assignment, memory, per-tensor metadata, live figures).
#   CAKE_UI_AUTH   USER:PASS when the server runs with --ui-auth (HTTP Basic stands in for the key there)
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

if [[ -n "${CAKE_UI_AUTH:-}" ]]; then CURL=(curl -sS --fail-with-body -u "$CAKE_UI_AUTH"); fi
"${CURL[@]}" "$BASE/api/v1/topology"
echo
