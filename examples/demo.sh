#!/usr/bin/env bash
# Quick start without a cluster: two echo backends and portico serving examples/quickstart.
# Started by `make demo` after building; Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/debug

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$BIN/examples/echo" --name blue --listen 127.0.0.1:9001 & pids+=($!)
"$BIN/examples/echo" --name green --listen 127.0.0.1:9002 & pids+=($!)
"$BIN/portico" run --manifests examples/quickstart --log-format text \
    --http-addr 127.0.0.1:8080 --https-addr 127.0.0.1:8443 --admin-addr 127.0.0.1:9090 & pids+=($!)

# Wait (bounded) until portico serves its first snapshot.
for _ in $(seq 1 100); do
    curl -fsS -o /dev/null http://127.0.0.1:9090/readyz 2>/dev/null && break
    sleep 0.1
done

cat <<'TXT'

portico is serving examples/quickstart. Try, in another terminal:

  # path routing over HTTPS (self-signed demo certificate, hence -k); HTTP/2 via ALPN
  curl -k --resolve demo.localtest.me:8443:127.0.0.1 https://demo.localtest.me:8443/blue
  curl -k --http2 --resolve demo.localtest.me:8443:127.0.0.1 https://demo.localtest.me:8443/green
  # plain HTTP to a TLS host is redirected (308) to HTTPS
  curl -i -H 'Host: demo.localtest.me' http://127.0.0.1:8080/blue
  # a host that opted out of the redirect; and h2c with prior knowledge
  curl -H 'Host: plain.localtest.me' http://127.0.0.1:8080/
  curl --http2-prior-knowledge -H 'Host: plain.localtest.me' http://127.0.0.1:8080/
  # unknown host → 404; metrics and readiness on the admin port
  curl -i -H 'Host: nope.example' http://127.0.0.1:8080/
  curl -s http://127.0.0.1:9090/metrics | grep portico_requests_total

Edit files under examples/quickstart/ and watch the routes change live. Ctrl-C to stop.
TXT
wait "${pids[2]}"
