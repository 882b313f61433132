#!/usr/bin/env bash
# N sidecars on loopback behind the shipped nginx configuration, in one command.
#
#   scripts/local-cluster.sh up --replicas N --port P --shared DIR [-- extra serve flags]
#   scripts/local-cluster.sh down
#   scripts/local-cluster.sh restart NAME     (one replica, same name, port and data dir)
#
# `up` starts N sidecars (`--instance-name s0…`, each its own data dir, all sharing DIR
# for avatars) and nginx from deploy/proxy/nginx.conf.in on 127.0.0.1:P, prints one JSON
# line per process it started ({"role": "sidecar"|"proxy", "pid": …, "port": …, …}) and
# returns once every one answers. `down` stops what `up` started. State lives in
# $LOCAL_CLUSTER_DIR (default .local-cluster/); the binary is $MUSETALK_SIDECAR_BIN
# (default: a release build, made here). nginx is installed with apt-get where missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
state=${LOCAL_CLUSTER_DIR:-$repo/.local-cluster}

die() {
    printf 'local-cluster: %s\n' "$*" >&2
    # Nothing half-started is left behind.
    [ "${starting:-0}" = 1 ] && stop_all
    exit 1
}

# Waits up to 10 s for PID to exit after its SIGTERM, then kills it.
reap() {
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
}

stop_all() {
    [ -d "$state" ] || return 0
    # All told at once, then each waited for: they drain side by side.
    for pidfile in "$state"/*.pid; do
        [ -e "$pidfile" ] && kill -TERM "$(cat "$pidfile")" 2>/dev/null
    done
    for pidfile in "$state"/*.pid; do
        [ -e "$pidfile" ] || continue
        reap "$(cat "$pidfile")"
        rm -f "$pidfile"
    done
}

# Polls `$@` every 0.1 s for up to 60 s; fails if it never succeeds.
poll() {
    for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}

# Starts replica NAME from its recorded command line; prints its JSON line once ready.
start_replica() {
    local name=$1 addr=""
    : >"$state/$name/sidecar.log"
    # shellcheck disable=SC2046
    eval "setsid $(cat "$state/$name.cmd") >\"\$state/\$name/stdout.log\" 2>\"\$state/\$name/sidecar.log\" </dev/null &"
    echo $! >"$state/$name.pid"
    for _ in $(seq 600); do
        addr=$(grep -o 'listening on http://[0-9.:]*' "$state/$name/sidecar.log" | head -1 | sed 's|listening on http://||') || true
        [ -n "$addr" ] && break
        kill -0 "$(cat "$state/$name.pid")" 2>/dev/null || die "sidecar $name exited: $(tail -3 "$state/$name/sidecar.log")"
        sleep 0.1
    done
    [ -n "$addr" ] || die "sidecar $name did not start listening"
    poll curl -fsS "http://$addr/readyz" || die "sidecar $name is not ready: $(tail -3 "$state/$name/sidecar.log")"
    # From now on it restarts on this port, where the proxy expects it.
    sed -i "s|--listen 127.0.0.1:0 |--listen $addr |" "$state/$name.cmd"
    echo "$addr" >"$state/$name.addr"
    printf '{"role":"sidecar","name":"%s","pid":%s,"port":%s}\n' "$name" "$(cat "$state/$name.pid")" "${addr##*:}"
}

case "${1:-}" in
    down)
        stop_all
        exit 0
        ;;
    restart)
        name=${2:-}
        [ -f "$state/$name.cmd" ] || die "no replica named '$name' in $state"
        if [ -f "$state/$name.pid" ]; then
            pid=$(cat "$state/$name.pid")
            # Only if it is still that replica (a pid can be reused after a crash).
            if grep -q -- "--instance-name" "/proc/$pid/cmdline" 2>/dev/null; then
                kill -TERM "$pid" 2>/dev/null || true
                reap "$pid"
            fi
        fi
        start_replica "$name"
        exit 0
        ;;
    up) shift ;;
    *) die "usage: $0 up --replicas N --port P --shared DIR [-- serve flags] | $0 down" ;;
esac

replicas=3 port=8080 shared=""
while [ $# -gt 0 ]; do
    case "$1" in
        --replicas) replicas=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --shared) shared=$2; shift 2 ;;
        --) shift; break ;;
        *) die "unknown argument $1" ;;
    esac
done
[ -n "$shared" ] || die "--shared DIR is required (the avatars every replica shares)"
[[ "$replicas" =~ ^[1-9][0-9]*$ ]] || die "--replicas must be a positive number"
extra=("$@")

scripts/ensure-deps.sh nginx >&2
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
bin=${MUSETALK_SIDECAR_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --bins >&2
    bin=$repo/target/release/musetalk-sidecar
fi
stop_all
starting=1
# Anything that fails from here on stops what was started.
trap 'if [ "$starting" = 1 ]; then stop_all; fi' EXIT
mkdir -p "$state" "$shared"
shared=$(cd "$shared" && pwd)

servers="" owners=""
for i in $(seq 0 $((replicas - 1))); do
    name=s$i
    mkdir -p "$state/$name"
    printf '%q ' "$bin" serve --listen 127.0.0.1:0 --data-dir "$state/$name/data" --instance-name "$name" \
        --shared-dir "$shared" --log-format json ${extra[@]+"${extra[@]}"} >"$state/$name.cmd"
    start_replica "$name"
    addr=$(cat "$state/$name.addr")
    servers+="server $addr max_fails=0;"$'\n        '
    owners+="$name $addr;"$'\n        '
done
owners+='default none;'

mkdir -p "$state/nginx"
conf=$state/nginx/nginx.conf
main="pid $state/nginx/nginx.pid;
error_log $state/nginx/error.log warn;
worker_processes 2;
daemon off;"
temp="client_body_temp_path $state/nginx/body;
    proxy_temp_path $state/nginx/proxy;
    fastcgi_temp_path $state/nginx/fastcgi;
    uwsgi_temp_path $state/nginx/uwsgi;
    scgi_temp_path $state/nginx/scgi;"
MAIN=$main TEMP=$temp OWNERS=$owners SERVERS=$servers LISTEN="127.0.0.1:$port" python3 - "$repo/deploy/proxy/nginx.conf.in" "$conf" <<'PY'
import os, sys
text = open(sys.argv[1]).read()
for k, v in {"@MAIN@": os.environ["MAIN"], "@TEMP_PATHS@": os.environ["TEMP"], "@OWNERS@": os.environ["OWNERS"],
             "@SERVERS@": os.environ["SERVERS"], "@RESOLVER@": "", "@LISTEN@": os.environ["LISTEN"]}.items():
    text = text.replace(k, v)
open(sys.argv[2], "w").write(text)
PY
"$nginx_bin" -t -q -e "$state/nginx/error.log" -p "$state/nginx" -c "$conf" >&2 || die "nginx refused $conf"
setsid "$nginx_bin" -e "$state/nginx/error.log" -p "$state/nginx" -c "$conf" </dev/null >/dev/null 2>&1 &
echo $! >"$state/proxy.pid"
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    kill -0 "$(cat "$state/proxy.pid")" 2>/dev/null || die "nginx exited: $(tail -3 "$state/nginx/error.log")"
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 || die "nginx does not answer on 127.0.0.1:$port"
printf '{"role":"proxy","pid":%s,"port":%s}\n' "$(cat "$state/proxy.pid")" "$port"
starting=0
