#!/usr/bin/env bash
# Where portico's keep-alive time goes: portico (release build, symbols kept) under
# `valgrind --tool=callgrind` while wrk sends HTTP/1.1 keep-alive requests with a small body
# through it to a local nginx upstream. Instrumentation is switched on only after the first
# snapshot serves, so start-up is not counted. Prints instructions per request and the top
# functions by self and inclusive cost; keeps the callgrind file for callgrind_annotate/kcachegrind.
#
# perf would be the first choice, but hardware counters are not available in this VM
# (`perf stat -e instructions true` reports <not supported>); callgrind counts instructions
# exactly, which is also what makes its numbers stable on a shared, noisy machine.
#
# Usage: bench/profile.sh [SECONDS] (default 10). PROFILE_CLOSE=1 sends `Connection: close`, so
# every request is a new connection (wrk drops a -H value without a space after the colon, so
# this cannot go through PROFILE_WRK_ARGS); PROFILE_TLS=1 sends the requests to the HTTPS
# listener (with PROFILE_CLOSE=1, a TLS 1.3 resumption per request: wrk keeps its session).
# PROFILE_LOAD=h2load puts h2 over TLS on it instead (h2load -c4 -m16, as bench/run.sh's
# h2_tls); PROFILE_LOAD=ab full TLS handshakes (ab -c16, one request per fresh TLS session, as
# tls_handshake). PROFILE_WRK_ARGS adds further wrk arguments (split on spaces). PROFILE_BIN
# profiles another portico binary (default target/release/portico), e.g. a saved copy for a
# before/after. PROFILE_TOOL=perf samples the native process instead (`perf record -e cpu-clock
# -g`, 999 Hz; no instruction counts, but CPU features valgrind hides, such as the ADX/BMI2
# paths of ring's X25519, are used).
# Binds only 127.0.0.1; stops only what it started.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
export PATH="$PATH:/usr/sbin:/sbin"
SECS=${1:-10}
OUT=${BENCH_OUT:-$ROOT/target/bench/profile-$(date -u +%Y%m%dT%H%M%SZ)}
B=${BENCH_PORT_BASE:-24800}
UP_PORT=$((B + 1)) HTTP=$((B + 10)) HTTPS=$((B + 11)) ADMIN=$((B + 12))

command -v valgrind >/dev/null || { apt-get install -y -qq valgrind >/dev/null; }
if [[ ${PROFILE_TOOL:-callgrind} == perf ]]; then
    command -v perf >/dev/null || { apt-get install -y -qq linux-perf >/dev/null; }
fi
command -v nginx >/dev/null && command -v wrk >/dev/null || {
    echo "run bench/run.sh once first (it installs nginx and wrk)" >&2
    exit 1
}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/portico-profile.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/tmp"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

# Stop a profiled process (TERM, so callgrind writes its file) and wait, bounded, for it.
stop_wait() {
    local p=$1 i
    kill -TERM "$p" 2>/dev/null || true
    for i in $(seq 1 600); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    local keep=() q
    for q in "${PIDS[@]}"; do [[ $q == "$p" ]] || keep+=("$q"); done
    PIDS=("${keep[@]}")
}

temp_paths() { for d in client_body proxy fastcgi uwsgi scgi; do echo "  ${d}_temp_path $WORK/tmp/$1-$d;"; done; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench.local \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
python3 "$HERE/gen_manifests.py" load "$WORK/manifests" "$WORK/cert.pem" "$WORK/key.pem" "$UP_PORT"
cat >"$WORK/up.conf" <<EOF
worker_processes 1;
pid $WORK/up.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
$(temp_paths up)
  server { listen 127.0.0.1:$UP_PORT; location / { return 200 "ok\n"; } }
}
EOF
nginx -p "$WORK" -c "$WORK/up.conf" -e "$WORK/up.err" -g 'daemon off;' >/dev/null 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$UP_PORT/" 10

wrk_run() {
    case ${PROFILE_LOAD:-wrk} in
    h2load) h2load -t1 -c4 -m16 -D"$SECS" "$1" >"$2" 2>&1 || true ;;
    ab) ab -q -t"$SECS" -n 100000000 -c16 "$1" >"$2" 2>&1 || true ;;
    *)
        local close=()
        [[ ${PROFILE_CLOSE:-0} == 1 ]] && close=(-H 'Connection: close')
        # shellcheck disable=SC2086 # PROFILE_WRK_ARGS is a list of words on purpose
        wrk -t1 -c8 -d"${SECS}s" --timeout 10s "${close[@]}" ${PROFILE_WRK_ARGS:-} "$1" >"$2" 2>&1 || true
        ;;
    esac
}

# Requests served, from whichever load tool's output.
requests_in() {
    sed -n -e 's/^ *\([0-9]*\) requests in.*/\1/p' -e 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' \
        -e 's/^Complete requests: *\([0-9]*\).*/\1/p' "$1" | head -1
}

# profile NAME URL CMD...: run CMD under callgrind (instrumentation off), wait for URL, switch
# collection on, run wrk, stop; leaves $OUT/NAME.callgrind and $OUT/NAME.wrk.
profile() {
    local name=$1 url=$2
    shift 2
    valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$OUT/$name.callgrind.%p" "$@" >"$OUT/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_http "$url" 120 || { echo "$name did not start under valgrind" >&2; exit 1; }
    timeout 20 callgrind_control -i on "$pid" >/dev/null 2>&1 || true
    wrk_run "$url" "$OUT/$name.wrk"
    timeout 20 callgrind_control -i off "$pid" >/dev/null 2>&1 || true
    stop_wait "$pid"
}

# perf_profile NAME URL CMD...: run CMD natively, wait for URL, sample it with perf while wrk
# runs; leaves $OUT/NAME.perf.data, $OUT/NAME.wrk and $OUT/NAME.summary.txt.
perf_profile() {
    local name=$1 url=$2
    shift 2
    "$@" >"$OUT/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_http "$url" 30 || { echo "$name did not start" >&2; exit 1; }
    perf record -q -e cpu-clock -F 999 -g -p "$pid" -o "$OUT/$name.perf.data" >/dev/null 2>&1 &
    local perf_pid=$!
    PIDS+=("$perf_pid")
    wrk_run "$url" "$OUT/$name.wrk"
    stop_wait "$perf_pid"
    stop_wait "$pid"
    set +o pipefail
    local reqs
    reqs=$(requests_in "$OUT/$name.wrk")
    {
        echo "== $name: $reqs requests (perf samples of the native process, cpu-clock)"
        echo "-- self"
        perf report -i "$OUT/$name.perf.data" --no-children --sort symbol --stdio 2>/dev/null |
            grep -v '^#' | grep '%' | head -45
        echo "-- inclusive"
        perf report -i "$OUT/$name.perf.data" --children --sort symbol --stdio -g none 2>/dev/null |
            grep -v '^#' | grep '%' | head -60
    } | tee "$OUT/$name.summary.txt"
    set -o pipefail
}

summarise() {
    # `head` closes the pipe early on purpose: no pipefail here (SIGPIPE is not a failure).
    set +o pipefail
    local name=$1 f best="" max=0 ir
    # The file with the most events is the process that served; `totals:` is what callgrind
    # writes at exit (`summary:` stays 0 when instrumentation starts late).
    for f in "$OUT/$name".callgrind.*; do
        ir=$(sed -n 's/^totals: \([0-9]*\).*/\1/p' "$f" | head -1)
        [[ -n $ir ]] && ((ir > max)) && { max=$ir; best=$f; }
    done
    local reqs
    reqs=$(requests_in "$OUT/$name.wrk")
    {
        echo "== $name: $reqs requests, $max instructions, $((max / (reqs > 0 ? reqs : 1))) instructions/request ($best)"
        echo "-- self cost"
        callgrind_annotate --inclusive=no "$best" 2>/dev/null | sed -n '/^Ir/,$p' | head -45
        echo "-- inclusive cost"
        callgrind_annotate --inclusive=yes "$best" 2>/dev/null | sed -n '/^Ir/,$p' | head -60
    } | tee "$OUT/$name.summary.txt"
    set -o pipefail
}

URL="http://127.0.0.1:$HTTP/"
[[ ${PROFILE_TLS:-0} == 1 || ${PROFILE_LOAD:-wrk} != wrk ]] && URL="https://127.0.0.1:$HTTPS/"
RUN=profile
[[ ${PROFILE_TOOL:-callgrind} == perf ]] && RUN=perf_profile
RUST_LOG=warn $RUN portico "$URL" "${PROFILE_BIN:-$ROOT/target/release/portico}" run \
    --manifests "$WORK/manifests" --worker-threads 1 --no-access-log --log-format text \
    --http-addr "127.0.0.1:$HTTP" --https-addr "127.0.0.1:$HTTPS" --admin-addr "127.0.0.1:$ADMIN" \
    --default-certificate bench/bench-tls
if [[ $RUN == profile ]]; then
    summarise portico
    echo "callgrind files in $OUT" >&2
else
    echo "perf data in $OUT" >&2
fi
