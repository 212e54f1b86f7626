#!/usr/bin/env bash
# Cake's image and audio routes. cake_py serves text models, so today they answer 404 with a JSON error:
#   POST /v1/images/generations, POST /api/v1/image -> {"error": "No image model loaded"}
#   POST /v1/audio/speech                           -> {"error": "No audio model loaded"}
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

# No --fail-with-body here: the 404 is the expected answer; -w prints its status.
MEDIA=(curl -sS -w '\nHTTP %{http_code}\n' ${AUTH[@]+"${AUTH[@]}"})
"${MEDIA[@]}" "$BASE/v1/images/generations" -H 'Content-Type: application/json' \
  -d '{"prompt": "a cake", "response_format": "b64_json"}'
"${MEDIA[@]}" "$BASE/api/v1/image" -H 'Content-Type: application/json' -d '{"image_args": {"prompt": "a cake"}}'
"${MEDIA[@]}" "$BASE/v1/audio/speech" -H 'Content-Type: application/json' \
  -d '{"input": "hello", "response_format": "wav"}'
