#!/usr/bin/env bash
# portico's benchmark (issue 6), end to end: `make bench`. Never part of `make test`.
#
# Steps (BENCH_STEPS, default "micro load churn rss"):
#   micro  criterion micro-benchmarks (benches/snapshot.rs): route match, translate, endpoint update
#   load   portico vs nginx vs HAProxy in front of a local nginx upstream, one at a time, the proxy
#          pinned to core BENCH_PROXY_CPU (0), load generator and upstream on BENCH_LOAD_CPU (1);
#          seven scenarios; proxies alternate within each repetition; medians of BENCH_REPS
#   churn  portico under steady wrk load while bench/churn.py rewrites its EndpointSlice 10×/s and
#          toggles an unrelated Ingress; failed requests and the p99 shift vs a steady run and vs
#          a control run (the same writer rewriting a copy portico does not watch); the writer
#          runs on the load core, beside wrk and the upstream
#   rss    portico's RSS with 10 000 generated Ingresses (50 000 paths, 100 000 endpoints) loaded
#
# Knobs: BENCH_DURATION (s per measured run, 10), BENCH_REPS (3), BENCH_CHURN_DURATION (30),
# BENCH_CHURN_REPS (3; 1 in quick mode), BENCH_PORT_BASE (24700: ports base+1 .. base+31),
# BENCH_QUICK=1 (validate the scripts: 2 s runs, 1 rep, 5 s churn, 1 000 Ingresses, short micro),
# BENCH_SCENARIOS, BENCH_PROXIES, BENCH_OUT (results dir, default target/bench/<UTC time>),
# BENCH_PORTICO_BIN (another portico build; nothing is built then), BENCH_PORTICO_B_BIN (a second portico build, run as
# the proxy `portico-b`: put it in BENCH_PROXIES for an A/B run that alternates the two builds
# within each repetition, as it does the proxies).
#
# Installs nginx, haproxy, wrk, nghttp2-client (h2load) and apache2-utils (ab) with apt-get when missing. Binds only
# 127.0.0.0/8. Every loop is bounded; only processes this script started are stopped (by PID, on
# exit too).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
export PATH="$PATH:/usr/sbin:/sbin"

QUICK=${BENCH_QUICK:-0}
if [[ $QUICK != 0 ]]; then
    DURATION=${BENCH_DURATION:-2}
    REPS=${BENCH_REPS:-1}
    CHURN_DURATION=${BENCH_CHURN_DURATION:-5}
    SCALE_N=${BENCH_SCALE_INGRESSES:-1000}
else
    DURATION=${BENCH_DURATION:-10}
    REPS=${BENCH_REPS:-3}
    CHURN_DURATION=${BENCH_CHURN_DURATION:-30}
    SCALE_N=${BENCH_SCALE_INGRESSES:-10000}
fi
# One churn run's p99 varies by up to 1.5x between identical runs: quote a median of three.
if [[ $QUICK != 0 ]]; then CHURN_REPS=${BENCH_CHURN_REPS:-1}; else CHURN_REPS=${BENCH_CHURN_REPS:-3}; fi
STEPS=${BENCH_STEPS:-micro load churn rss}
SCENARIOS=${BENCH_SCENARIOS:-h1_small h1_16k h1_newconn https_keepalive tls_handshake tls_resume h2_tls}
PROXIES=${BENCH_PROXIES:-portico nginx haproxy}
PROXY_CPU=${BENCH_PROXY_CPU:-0}
LOAD_CPU=${BENCH_LOAD_CPU:-1}
OUT=${BENCH_OUT:-$ROOT/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
# Connections: keep-alive scenarios, connection-per-request scenarios, h2 (connections × streams).
CONNS_KA=${BENCH_CONNS:-32}
CONNS_NEW=${BENCH_CONNS_NEW:-16}
H2_CONNS=${BENCH_H2_CONNS:-4}
H2_STREAMS=${BENCH_H2_STREAMS:-16}
WARMUP=1
# TLS 1.3 cipher suites in portico's order of preference (src/proxy/tls.rs CIPHER_SUITES),
# given to nginx and HAProxy too, with the server's order deciding, so all three negotiate the
# same suite with OpenSSL clients (which list AES-256-GCM first).
TLS13_SUITES=TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256

# Ports (127.0.0.1 only; the upstream also on .2 and .3), all from one base so a clash with
# something else on the machine is one knob away. Keep them below the kernel's ephemeral range
# (ip_local_port_range, usually 32768-60999): thousands of client connections per second would
# otherwise occupy a listener's port just before that proxy starts.
PORT_BASE=${BENCH_PORT_BASE:-24700}
UP_PORT=$((PORT_BASE + 1))
PORTICO_HTTP=$((PORT_BASE + 10)) PORTICO_HTTPS=$((PORT_BASE + 11)) PORTICO_ADMIN=$((PORT_BASE + 12))
NGINX_HTTP=$((PORT_BASE + 20)) NGINX_HTTPS=$((PORT_BASE + 21))
HAPROXY_HTTP=$((PORT_BASE + 30)) HAPROXY_HTTPS=$((PORT_BASE + 31))

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# processes: every PID we start is tracked, and only those are ever signalled
# ---------------------------------------------------------------------------------------------
STARTED=()
WORK=""

forget() {
    local keep=() p
    for p in "${STARTED[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    STARTED=("${keep[@]}")
}

# stop PID: TERM, up to 5 s, then KILL; reaped, then forgotten (so a reused PID is never hit).
stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget "$pid"
}

cleanup() {
    local p
    for p in "${STARTED[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${STARTED[@]}"; do
        for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# bg LOGFILE CMD...: start in the background, remember the PID in $BG_PID.
bg() {
    local logf=$1
    shift
    "$@" >"$logf" 2>&1 &
    BG_PID=$!
    STARTED+=("$BG_PID")
}

# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

ports_free() {
    python3 - "$@" <<'PY'
import socket, sys
busy = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        busy.append(port)
    finally:
        s.close()
if busy:
    sys.exit(f"ports in use on 127.0.0.1: {busy}")
PY
}

# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
install_tools() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx-light)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v h2load >/dev/null || missing+=(nghttp2-client)
    command -v ab >/dev/null || missing+=(apache2-utils)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]} (apt-get)"
    local sudo=""
    [[ $(id -u) == 0 ]] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

machine_info() {
    {
        echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
        echo "kernel: $(uname -srm)"
        lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket|CPU max MHz|L[123])' || true
        echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "rustc: $(rustc --version)"
        echo "nginx: $(nginx -v 2>&1)"
        echo "haproxy: $(haproxy -v | head -1)"
        echo "wrk: $(wrk -v 2>&1 | head -1)"
        echo "h2load: $(h2load --version | head -1)"
        echo "ab: $(ab -V | head -1)"
        echo "openssl: $(openssl version)"
        echo "settings: duration=${DURATION}s reps=$REPS churn=${CHURN_DURATION}s x$CHURN_REPS conns=$CONNS_KA/$CONNS_NEW h2=${H2_CONNS}x$H2_STREAMS proxy-cpu=$PROXY_CPU load-cpu=$LOAD_CPU"
    } >"$OUT/machine.txt"
    cat "$OUT/machine.txt" >&2
}

setup_common() {
    WORK=$(mktemp -d /tmp/portico-bench.XXXXXX)
    chmod 755 "$WORK" # nginx workers run as nobody and read the 16 KiB body from here
    mkdir -p "$WORK/tmp" "$OUT"
    PORTICO=${BENCH_PORTICO_BIN:-$ROOT/target/release/portico}
    PORTICO_B=${BENCH_PORTICO_B_BIN:-}
    [[ " $PROXIES " != *" portico-b "* || -x $PORTICO_B ]] ||
        die "proxy portico-b needs BENCH_PORTICO_B_BIN, an executable portico build"
    # One self-signed ECDSA P-256 certificate for all three proxies (same handshake work).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=bench.local -addext 'subjectAltName=DNS:bench.local,IP:127.0.0.1' \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/combined.pem"
    head -c 16384 /dev/zero | tr '\0' 'x' >"$WORK/16k.bin"
    chmod 644 "$WORK/16k.bin"
    python3 "$HERE/gen_manifests.py" load "$WORK/manifests" "$WORK/cert.pem" "$WORK/key.pem" "$UP_PORT"
    write_configs
}

nginx_common() {
    cat <<EOF
worker_processes 1;
pid $WORK/$1.pid;
error_log $WORK/$1.err warn;
events { worker_connections 16384; }
EOF
}

nginx_temp_paths() {
    local d
    for d in client_body proxy fastcgi uwsgi scgi; do echo "  ${d}_temp_path $WORK/tmp/$1-$d;"; done
}

write_configs() {
    # Upstream: `return 200` small body and a 16 KiB static body, on three loopback addresses
    # (the churn benchmark moves endpoints between them). No request limit per connection, so
    # every proxy keeps its pooled upstream connections for the whole run.
    {
        nginx_common up
        cat <<EOF
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  default_type text/plain;
$(nginx_temp_paths up)
  server {
    listen 127.0.0.1:$UP_PORT;
    listen 127.0.0.2:$UP_PORT;
    listen 127.0.0.3:$UP_PORT;
    location = /16k { alias $WORK/16k.bin; }
    location / { return 200 "ok\n"; }
  }
}
EOF
    } >"$WORK/upstream.conf"

    # nginx as the proxy under test: 1 worker, upstream keepalive pool, the forwarding headers
    # portico sets (brief §4.4), no access log, TLS 1.2 + 1.3, h2 on the TLS port.
    {
        nginx_common proxy
        cat <<EOF
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
$(nginx_temp_paths proxy)
  upstream up {
    server 127.0.0.1:$UP_PORT;
    keepalive 256;
    keepalive_requests 100000000;
  }
  server {
    listen 127.0.0.1:$NGINX_HTTP;
    listen 127.0.0.1:$NGINX_HTTPS ssl http2;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    # portico's TLS 1.3 suite order, the server's choice (as portico and HAProxy do).
    ssl_conf_command Ciphersuites $TLS13_SUITES;
    ssl_prefer_server_ciphers on;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header X-Forwarded-Port \$server_port;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Request-ID \$request_id;
    }
  }
}
EOF
    } >"$WORK/proxy-nginx.conf"

    # HAProxy: nbthread 1, keep-alive to the server with connection reuse, same headers, no log
    # lines, TLS 1.2 minimum (1.3 allowed), ALPN h2 + http/1.1.
    cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.2
  # portico's TLS 1.3 suite order; HAProxy follows the server's order by default.
  ssl-default-bind-ciphersuites $TLS13_SUITES
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
frontend fe
  bind 127.0.0.1:$HAPROXY_HTTP
  bind 127.0.0.1:$HAPROXY_HTTPS ssl crt $WORK/combined.pem alpn h2,http/1.1
  option forwardfor
  http-request set-header X-Forwarded-Proto https if { ssl_fc }
  http-request set-header X-Forwarded-Proto http unless { ssl_fc }
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request set-header X-Forwarded-Port %[dst_port]
  http-request set-header X-Real-IP %[src]
  http-request set-header X-Request-ID %[uuid] unless { req.hdr(x-request-id) -m found }
  default_backend be
backend be
  http-reuse always
  server up 127.0.0.1:$UP_PORT
EOF
    nginx -t -q -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/nginx-t.err" || die "upstream nginx config"
    nginx -t -q -p "$WORK" -c "$WORK/proxy-nginx.conf" -e "$WORK/nginx-t.err" || die "proxy nginx config"
    haproxy -c -q -f "$WORK/haproxy.cfg" || die "haproxy config"
}

start_upstream() {
    bg "$WORK/upstream.log" taskset -c "$LOAD_CPU" nginx -p "$WORK" -c "$WORK/upstream.conf" \
        -e "$WORK/up.err" -g 'daemon off;'
    UP_PID=$BG_PID
    wait_http "http://127.0.0.1:$UP_PORT/" || die "upstream did not start ($(cat "$WORK/up.err"))"
}

# start_proxy NAME [MANIFESTS]: sets PROXY_PID, HTTP_PORT, HTTPS_PORT.
start_proxy() {
    local name=$1 manifests=${2:-$WORK/manifests}
    case $name in
    portico | portico-b)
        local bin=$PORTICO
        [[ $name == portico-b ]] && bin=$PORTICO_B
        HTTP_PORT=$PORTICO_HTTP HTTPS_PORT=$PORTICO_HTTPS
        RUST_LOG=warn bg "$OUT/$name.log" taskset -c "$PROXY_CPU" "$bin" run \
            --manifests "$manifests" --worker-threads 1 --no-access-log --log-format text \
            --http-addr "127.0.0.1:$HTTP_PORT" --https-addr "127.0.0.1:$HTTPS_PORT" \
            --admin-addr "127.0.0.1:$PORTICO_ADMIN" --default-certificate bench/bench-tls
        ;;
    nginx)
        HTTP_PORT=$NGINX_HTTP HTTPS_PORT=$NGINX_HTTPS
        bg "$OUT/nginx.log" taskset -c "$PROXY_CPU" nginx -p "$WORK" -c "$WORK/proxy-nginx.conf" \
            -e "$WORK/proxy.err" -g 'daemon off;'
        ;;
    haproxy)
        HTTP_PORT=$HAPROXY_HTTP HTTPS_PORT=$HAPROXY_HTTPS
        bg "$OUT/haproxy.log" taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg"
        ;;
    *) die "unknown proxy $name" ;;
    esac
    PROXY_PID=$BG_PID
    wait_http "http://127.0.0.1:$HTTP_PORT/" 30 || die "$name did not serve http (see $OUT/$name.log)"
    wait_http "https://127.0.0.1:$HTTPS_PORT/" 10 || die "$name did not serve https"
}

# loadgen SCENARIO SECONDS OUTFILE AUXFILE: one run of the load generator, pinned to LOAD_CPU;
# AUXFILE gets h2load's per-request log (h2_tls) or ab's percentile CSV (tls_handshake).
loadgen() {
    local sc=$1 secs=$2 out=$3 aux=$4
    local http="http://127.0.0.1:$HTTP_PORT" https="https://127.0.0.1:$HTTPS_PORT"
    local wrk=(taskset -c "$LOAD_CPU" wrk -t1 --latency -d"${secs}s")
    case $sc in
    h1_small) "${wrk[@]}" -c"$CONNS_KA" "$http/" ;;
    h1_16k) "${wrk[@]}" -c"$CONNS_KA" "$http/16k" ;;
    h1_newconn) "${wrk[@]}" -c"$CONNS_NEW" -H 'Connection: close' "$http/" ;;
    https_keepalive) "${wrk[@]}" -c"$CONNS_KA" "$https/" ;;
    # ab opens every connection with a fresh TLS session (a full handshake, one HTTP/1.0
    # request, close). wrk keeps the session across its reconnects (SSL_clear), so with
    # Connection: close every request is a TLS 1.3 resumption (PSK with a new X25519 share).
    tls_handshake) taskset -c "$LOAD_CPU" ab -q -t"$secs" -n 100000000 -c"$CONNS_NEW" \
        -e "$aux" "$https/" ;;
    tls_resume) "${wrk[@]}" -c"$CONNS_NEW" -H 'Connection: close' "$https/" ;;
    h2_tls) taskset -c "$LOAD_CPU" h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D"$secs" \
        --log-file="$aux" "$https/" ;;
    *) die "unknown scenario $sc" ;;
    esac >"$out" 2>&1 || true
}

procstat() { python3 "$HERE/report.py" procstat "$1"; }

run_one() {
    local proxy=$1 sc=$2 rep=$3
    local tag="$sc-$proxy-$rep"
    start_proxy "$proxy"
    local idle cpu0 cpu1 ucpu0 ucpu1 hwm
    read -r _ idle _ _ < <(procstat "$PROXY_PID")
    loadgen "$sc" "$WARMUP" "$OUT/raw/$tag.warmup" "$OUT/raw/$tag.warmup.aux"
    read -r cpu0 _ _ ucpu0 < <(procstat "$PROXY_PID")
    loadgen "$sc" "$DURATION" "$OUT/raw/$tag.out" "$OUT/raw/$tag.aux"
    read -r cpu1 _ hwm ucpu1 < <(procstat "$PROXY_PID")
    stop "$PROXY_PID"
    local files=("$OUT/raw/$tag.out")
    [[ $sc == h2_tls || $sc == tls_handshake ]] && files+=("$OUT/raw/$tag.aux")
    python3 "$HERE/report.py" record "$OUT/runs.jsonl" kind=load proxy="$proxy" scenario="$sc" \
        rep="$rep" cpu0="$cpu0" cpu1="$cpu1" ucpu0="$ucpu0" ucpu1="$ucpu1" idle_kib="$idle" hwm_kib="$hwm" -- "${files[@]}"
    rm -f "$OUT/raw/$tag.aux" "$OUT/raw/$tag.warmup.aux" # large; the parsed numbers are kept
}

# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
step_micro() {
    log "micro-benchmarks (criterion)"
    (cd "$ROOT" && BENCH_QUICK=$QUICK cargo bench --locked --bench snapshot) 2>&1 | tee "$OUT/micro.txt" >&2
    python3 "$HERE/report.py" micro "$OUT/micro.txt" >"$OUT/micro.md"
}

step_load() {
    mkdir -p "$OUT/raw"
    local -a order
    read -r -a order <<<"$PROXIES"
    local rep sc i n=${#order[@]}
    for rep in $(seq 1 "$REPS"); do
        for sc in $SCENARIOS; do
            # Alternate: each repetition starts with a different proxy, so slow drift in the
            # machine's load (other builds) does not favour one of them.
            for i in $(seq 0 $((n - 1))); do
                run_one "${order[$(((i + rep - 1) % n))]}" "$sc" "$rep"
            done
        done
    done
    python3 "$HERE/report.py" table "$OUT/runs.jsonl" >"$OUT/results.md"
}

snapshot_builds() {
    curl -s --max-time 2 "http://127.0.0.1:$PORTICO_ADMIN/metrics" |
        awk '/^portico_snapshot_builds_total/ { s += $NF } END { print s + 0 }'
}

step_churn() {
    mkdir -p "$OUT/raw"
    local churn_dir="$WORK/manifests-churn" rep
    for rep in $(seq 1 "$CHURN_REPS"); do
        rm -rf "$churn_dir"
        cp -r "$WORK/manifests" "$churn_dir"
        start_proxy portico "$churn_dir"
        loadgen h1_small "$WARMUP" "$OUT/raw/churn-warmup-$rep.out" /dev/null
        local c0 c1 u0 u1
        read -r c0 _ _ u0 < <(procstat "$PROXY_PID")
        loadgen h1_small "$CHURN_DURATION" "$OUT/raw/churn-steady-$rep.out" /dev/null
        read -r c1 _ _ u1 < <(procstat "$PROXY_PID")
        python3 "$HERE/report.py" record "$OUT/runs.jsonl" kind=churn phase=steady proxy=portico \
            scenario=churn_steady rep="$rep" cpu0="$c0" cpu1="$c1" ucpu0="$u0" ucpu1="$u1" \
            -- "$OUT/raw/churn-steady-$rep.out"
        # control: the same writer, on a copy portico does not watch (its own cost on the load
        # core); churn: on the directory portico serves.
        local phase dir b0 writer builds writes toggles
        for phase in control churn; do
            dir=$churn_dir
            if [[ $phase == control ]]; then
                dir="$WORK/manifests-control"
                rm -rf "$dir"
                cp -r "$WORK/manifests" "$dir"
            fi
            b0=$(snapshot_builds)
            bg "$OUT/raw/churn-writer-$phase-$rep.out" taskset -c "$LOAD_CPU" \
                python3 "$HERE/churn.py" "$dir" "$UP_PORT" "$CHURN_DURATION" 10
            writer=$BG_PID
            read -r c0 _ _ u0 < <(procstat "$PROXY_PID")
            loadgen h1_small "$CHURN_DURATION" "$OUT/raw/churn-$phase-$rep.out" /dev/null
            read -r c1 _ _ u1 < <(procstat "$PROXY_PID")
            wait "$writer" || true
            forget "$writer"
            builds=$(($(snapshot_builds) - b0))
            writes=$(sed -n 's/.*writes=\([0-9]*\).*/\1/p' "$OUT/raw/churn-writer-$phase-$rep.out")
            toggles=$(sed -n 's/.*ingress_toggles=\([0-9]*\).*/\1/p' "$OUT/raw/churn-writer-$phase-$rep.out")
            python3 "$HERE/report.py" record "$OUT/runs.jsonl" kind=churn phase="$phase" \
                proxy=portico scenario="churn_$phase" rep="$rep" writes="${writes:-0}" \
                toggles="${toggles:-0}" builds="$builds" cpu0="$c0" cpu1="$c1" ucpu0="$u0" \
                ucpu1="$u1" -- "$OUT/raw/churn-$phase-$rep.out"
        done
        stop "$PROXY_PID"
    done
    python3 "$HERE/report.py" churn "$OUT/runs.jsonl" >"$OUT/churn.md"
}

step_rss() {
    local dir="$WORK/manifests-scale"
    log "generating $SCALE_N Ingresses"
    python3 "$HERE/gen_manifests.py" scale "$dir" "$SCALE_N"
    # The TLS Secret and class come along so the flags are the same as in the load runs.
    cp "$WORK/manifests/30-secret.yaml" "$dir/"
    local t0 t1 rss hwm
    t0=$(date +%s.%N)
    RUST_LOG=warn bg "$OUT/portico-scale.log" taskset -c "$PROXY_CPU" "$PORTICO" run \
        --manifests "$dir" --worker-threads 1 --no-access-log --log-format text \
        --http-addr "127.0.0.1:$PORTICO_HTTP" --https-addr "127.0.0.1:$PORTICO_HTTPS" \
        --admin-addr "127.0.0.1:$PORTICO_ADMIN" --default-certificate bench/bench-tls
    local pid=$BG_PID
    wait_http "http://127.0.0.1:$PORTICO_ADMIN/readyz" 300 || die "portico did not get ready with $SCALE_N Ingresses"
    t1=$(date +%s.%N)
    # Give the allocator a moment after the first build before reading the resident size.
    sleep 2
    read -r _ rss hwm _ < <(procstat "$pid")
    stop "$pid"
    python3 - "$OUT" "$SCALE_N" "$rss" "$hwm" "$t0" "$t1" <<'PY'
import json, sys
out, n, rss, hwm, t0, t1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
rec = {"kind": "rss", "ingresses": n, "rss_kib": rss, "hwm_kib": hwm, "ready_s": round(t1 - t0, 2)}
open(f"{out}/runs.jsonl", "a").write(json.dumps(rec) + "\n")
with open(f"{out}/rss.md", "w") as f:
    f.write("| Ingresses loaded | paths | endpoints | RSS MiB | peak RSS MiB | start to ready s |\n")
    f.write("|---:|---:|---:|---:|---:|---:|\n")
    f.write(f"| {n:,} | {n * 5:,} | {n * 10:,} | {rss / 1024:.1f} | {hwm / 1024:.1f} | {t1 - t0:.2f} |\n")
PY
}

main() {
    mkdir -p "$OUT"
    log "results in $OUT"
    case " $STEPS " in *" micro "*) step_micro ;; esac
    [[ $STEPS == micro ]] && { cat "$OUT/micro.md"; return 0; }
    install_tools
    # A given build (BENCH_PORTICO_BIN) is measured as it is: nothing to build then.
    if [[ -z ${BENCH_PORTICO_BIN:-} ]]; then
        log "building portico (release)"
        (cd "$ROOT" && cargo build --release --locked --bin portico) >&2
    fi
    ports_free "$UP_PORT" $PORTICO_HTTP $PORTICO_HTTPS $PORTICO_ADMIN $NGINX_HTTP $NGINX_HTTPS \
        $HAPROXY_HTTP $HAPROXY_HTTPS || die "free the ports above first"
    setup_common
    machine_info
    start_upstream
    case " $STEPS " in *" load "*) log "load benchmark"; step_load ;; esac
    case " $STEPS " in *" churn "*) log "churn benchmark"; step_churn ;; esac
    case " $STEPS " in *" rss "*) log "RSS with $SCALE_N Ingresses"; step_rss ;; esac
    {
        echo "# portico benchmark results"
        echo
        echo '```'
        cat "$OUT/machine.txt"
        echo '```'
        local f
        for f in micro load churn rss; do
            case $f in load) f=results ;; esac
            [[ -f $OUT/$f.md ]] || continue
            echo
            echo "## $f"
            echo
            cat "$OUT/$f.md"
        done
    } >"$OUT/report.md"
    cat "$OUT/report.md"
    log "done: $OUT/report.md"
}

main "$@"
