#!/usr/bin/env bash
# entropy-steer with curl. STEER_URL (default http://127.0.0.1:8000), STEER_API_KEY optional.
set -euo pipefail
URL="${STEER_URL:-http://127.0.0.1:8000}"
AUTH=()
if [ -n "${STEER_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $STEER_API_KEY"); fi

# Typical sampling and per-token entropy.
curl -sf "$URL/v1/chat/completions" "${AUTH[@]}" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "Give me a name for a cat."}],
  "max_tokens": 16, "typical_p": 0.9, "steering": {"return_entropy": true}}'
echo

# Entropic particle filtering with four particles.
curl -sf "$URL/v1/chat/completions" "${AUTH[@]}" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "What is 12 + 7?"}], "max_tokens": 48,
  "steering": {"particles": {"n": 4, "max_steps": 4, "annealing": "ess"}}}'
echo

# Stored artifacts.
curl -sf "$URL/v1/steering/vectors" "${AUTH[@]}"
echo
curl -sf "$URL/v1/steering/probes" "${AUTH[@]}"
echo
