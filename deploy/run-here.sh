#!/usr/bin/env bash
# The team setup of README "Running it for a team", on one machine, on loopback: the commands of
# deploy/systemd/*.service run by hand (for machines where systemd is not PID 1, e.g. a container).
#
#   deploy/run-here.sh start    # redis, 2 llama-server replicas, smg, 2 gateways, nginx on :4000
#   deploy/run-here.sh stop
#
# Needs: make venv smg llamacpp redis; nginx (apt-get install nginx) for the load balancer.
# The backends are the tiny test model (tests/llamacpp/); a real fleet runs vLLM/sglang there.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=${RESP2CHAT_RUN_DIR:-/tmp/resp2chat-team}
LLAMA=${RESP2CHAT_LLAMACPP_DIR:-$HOME/.cache/resp2chat-llamacpp}
SMG=${SMG_BIN:-$ROOT/.tools/smg-1.13.0/bin/smg}
KEY=${RESP2CHAT_GATEWAY_API_KEY:-team-key-change-me}

bg() {  # name, command...: start in the background, remember the pid
    local name=$1; shift
    "$@" >"$RUN/$name.log" 2>&1 &
    echo $! >"$RUN/$name.pid"
}

wait_http() {
    for _ in $(seq 1 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
    echo "no answer from $1" >&2; return 1
}

start() {
    mkdir -p "$RUN"
    bg redis redis-server --port 16379 --bind 127.0.0.1 --save "" --appendonly no --dir "$RUN"
    for i in 1 2; do  # backend replicas: 8 slots of 16k tokens each (Codex's prompt is ~10k)
        bg "llama$i" "$LLAMA/bin/llama-server" -m "$LLAMA/tiny-qwen3.gguf" --alias tiny-qwen3 \
            --host 127.0.0.1 --port "1800$i" --jinja --reasoning-format deepseek -np 8 -c 131072 -n 64 \
            --cache-reuse 64 --seed 0 --metrics
    done
    wait_http http://127.0.0.1:18001/health && wait_http http://127.0.0.1:18002/health
    # deploy/systemd/smg.service
    bg smg "$SMG" launch --host 127.0.0.1 --port 30000 \
        --worker-urls http://127.0.0.1:18001 http://127.0.0.1:18002 \
        --policy consistent_hashing --routing-key-headers x-smg-routing-key \
        --prometheus-host 127.0.0.1 --prometheus-port 29000 --log-level warn
    wait_http http://127.0.0.1:30000/v1/models
    # deploy/config.yaml, with the tiny model's stop bias and the bundled demo as the "hosted" fallback
    sed -e "s|https://llm.example.com/v1|demo|" -e "s|redis://127.0.0.1:6379/0|redis://127.0.0.1:16379/0|" \
        -e "s|REPLACE-WITH-ONE-LONG-RANDOM-SECRET|$(head -c 24 /dev/urandom | base64)|" \
        -e "s|REPLACE-WITH-THE-TEAM-KEY|$KEY|" -e "s|access_log_path: \"-\"|access_log_path: $RUN/access.jsonl|" \
        "$ROOT/deploy/config.yaml" >"$RUN/config.yaml"
    printf 'upstream_extra_params: {"logit_bias": {"151645": 3}}\n' >>"$RUN/config.yaml"
    for port in 4001 4002; do  # deploy/systemd/resp2chat@.service
        RESP2CHAT_CONFIG="$RUN/config.yaml" RESP2CHAT_BIND_ADDR="127.0.0.1:$port" HOME="$RUN/home-$port" \
            bg "gateway-$port" "$ROOT/.venv/bin/resp2chat" start -- --set termlog_verbosity=warn --set flow_detail=0
    done
    wait_http http://127.0.0.1:4001/healthz && wait_http http://127.0.0.1:4002/healthz
    sed "s|listen 4000;|listen 127.0.0.1:4000;|" "$ROOT/deploy/nginx.conf" >"$RUN/resp2chat.conf"
    cat >"$RUN/nginx.conf" <<NGINX
pid $RUN/nginx.pid;
error_log $RUN/nginx-error.log;
events {}
http {
    access_log $RUN/nginx-access.log;
    client_body_temp_path $RUN/nginx-body;
    include $RUN/resp2chat.conf;
}
NGINX
    nginx -c "$RUN/nginx.conf" -g "daemon off;" >"$RUN/nginx.log" 2>&1 &
    echo $! >"$RUN/nginx-master.pid"
    wait_http http://127.0.0.1:4000/healthz
    echo "team gateway: http://127.0.0.1:4000/v1 (key: $KEY); metrics: http://127.0.0.1:4001/metrics, :4002/metrics"
}

stop() {  # SIGTERM, and SIGKILL what is still there after 10 s (smg waits out a grace period)
    local pids=()
    for name in nginx-master gateway-4001 gateway-4002 smg llama1 llama2 redis; do
        [ -f "$RUN/$name.pid" ] || continue
        pids+=("$(cat "$RUN/$name.pid")")
        rm -f "$RUN/$name.pid"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 100); do
        local alive=()
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
        [ ${#alive[@]} -gt 0 ] || return 0
        sleep 0.1
    done
    kill -9 "${alive[@]}" 2>/dev/null || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
