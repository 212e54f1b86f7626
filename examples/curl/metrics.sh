#!/usr/bin/env bash
# Prometheus metrics: GET /metrics (text format). Shown here: request, token and per-stage figures.
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

metrics="$("${CURL[@]}" "$BASE/metrics")"
grep -E '^cake_(http_requests_total|generated_tokens_total|prompt_tokens_total|stage_forward_ms)' <<<"$metrics"
