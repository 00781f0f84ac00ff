#!/bin/sh
# The container's command: serve on 0.0.0.0:8000 (the port Prometheus scrapes and the healthcheck polls).
# MODEL is a model directory inside the container (e.g. /models/Qwen3-0.6B); unset or empty serves the built-in
# demo model. A non-empty key file at $ATTNSERVE_API_KEY_PATH (compose mounts $ATTNSERVE_API_KEY_FILE there, the
# same file Prometheus sends) sets the API key, unless ATTNSERVE_API_KEY is set already. Arguments are passed on
# as extra flags (`docker run IMAGE --max-model-len 4096`).
# exec: the server replaces this shell as PID 1, so it receives SIGTERM itself and drains before exiting.
set -e
key_path="${ATTNSERVE_API_KEY_PATH:-/run/attnserve/api_key}"
if [ -z "${ATTNSERVE_API_KEY:-}" ] && [ -s "$key_path" ]; then
    ATTNSERVE_API_KEY="$(cat "$key_path")"
    export ATTNSERVE_API_KEY
fi
if [ -n "${MODEL:-}" ]; then
    exec attnserve serve --host 0.0.0.0 --port 8000 --model "$MODEL" "$@"
fi
exec attnserve serve --host 0.0.0.0 --port 8000 "$@"
