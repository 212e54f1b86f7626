#!/usr/bin/env bash
# OpenAI's Responses API: POST /v1/responses, a second turn by previous_response_id, its stream, the stored response,
# a background response and its events replayed, one cancelled.
#   CAKE_BASE_URL  the master (default http://127.0.0.1:8080)
#   CAKE_API_KEY   sent as "Authorization: Bearer ..." when set (the server's --api-key)
set -euo pipefail
BASE="${CAKE_BASE_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${CAKE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $CAKE_API_KEY"); fi
# --fail-with-body: an error answer (JSON, naming the problem) is printed and the script stops with curl's exit 22.
CURL=(curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"})

first=$("${CURL[@]}" "$BASE/v1/responses" -H 'Content-Type: application/json' \
  -d '{"instructions": "Answer in one sentence.", "input": "What is the capital of France?", "max_output_tokens": 32}')
echo "$first"
id=$(printf '%s' "$first" | sed -E 's/^\{"id": ?"([^"]+)".*/\1/')
"${CURL[@]}" "$BASE/v1/responses" -H 'Content-Type: application/json' \
  -d "{\"previous_response_id\": \"$id\", \"input\": \"And of Italy?\", \"max_output_tokens\": 32}"
echo
# Streamed: "event: response.created" … "event: response.output_text.delta" … "event: response.completed" (or
# response.incomplete at max_output_tokens), each with its data line; no [DONE].
"${CURL[@]}" -N "$BASE/v1/responses" -H 'Content-Type: application/json' \
  -d '{"input": "Write a haiku about cake.", "max_output_tokens": 32, "stream": true}'
"${CURL[@]}" "$BASE/v1/responses/$id"
echo
# In the background: answered whether or not anyone listens; read it, then replay its events after number 2.
job=$("${CURL[@]}" "$BASE/v1/responses" -H 'Content-Type: application/json' \
  -d '{"input": "Name three French cheeses.", "max_output_tokens": 32, "background": true}')
echo "$job"
job_id=$(printf '%s' "$job" | sed -E 's/^\{"id": ?"([^"]+)".*/\1/')
"${CURL[@]}" "$BASE/v1/responses/$job_id"
echo
"${CURL[@]}" -N "$BASE/v1/responses/$job_id?stream=true&starting_after=2"
# A long one, cancelled at once: it comes back "cancelled" with what it had written.
long=$("${CURL[@]}" "$BASE/v1/responses" -H 'Content-Type: application/json' \
  -d '{"input": "Write a long story about cheese.", "max_output_tokens": 400, "background": true}')
long_id=$(printf '%s' "$long" | sed -E 's/^\{"id": ?"([^"]+)".*/\1/')
"${CURL[@]}" -X POST "$BASE/v1/responses/$long_id/cancel"
echo
