#!/bin/sh
# The container's command: serve on 0.0.0.0:8000 (the port Prometheus scrapes and the healthcheck polls).
# MODEL is a model directory inside the container (e.g. /models/Qwen3-0.6B); unset or empty serves the built-in
# demo model. Arguments are passed on as extra flags (`docker run IMAGE --max-model-len 4096`).
# exec: the server replaces this shell as PID 1, so it receives SIGTERM itself and drains before exiting.
set -e
if [ -n "${MODEL:-}" ]; then
    exec attnserve serve --host 0.0.0.0 --port 8000 --model "$MODEL" "$@"
fi
exec attnserve serve --host 0.0.0.0 --port 8000 "$@"
