#!/usr/bin/env bash
# End-to-end check of a portico installed in kind (`make kind-up kind-load deploy e2e`): two echo
# backends, Ingresses with host and path rules, a TLS Secret and a RateLimitPolicy; then curl
# over HTTP and HTTPS through the node ports kind maps to this machine, and check the status
# portico writes (Ingress status.loadBalancer, RateLimitPolicy Accepted). Every wait is bounded.
#
# Environment: KUBECTL (default .tools/bin/kubectl), PORTICO_NAMESPACE (portico),
# E2E_ADDRESS (127.0.0.1), E2E_HTTP_PORT (80), E2E_HTTPS_PORT (443),
# E2E_STATUS_ADDRESS (127.0.0.1, what charts/portico/ci/kind-values.yaml publishes).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
kubectl="${KUBECTL:-$root/.tools/bin/kubectl}"
release_ns="${PORTICO_NAMESPACE:-portico}"
addr="${E2E_ADDRESS:-127.0.0.1}"
http_port="${E2E_HTTP_PORT:-80}"
https_port="${E2E_HTTPS_PORT:-443}"
status_address="${E2E_STATUS_ADDRESS:-127.0.0.1}"
ns=portico-e2e
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

k() { "$kubectl" "$@"; }
step() { echo "e2e: $*"; }
dump() {
    k get pods -A -o wide || true
    k -n "$release_ns" logs -l app.kubernetes.io/name=portico --tail=200 || true
    k -n "$ns" get ingress,ratelimitpolicies -o yaml || true
}
fail() {
    echo "e2e: FAIL: $*" >&2
    dump >&2
    exit 1
}

# curl HOST PORT SCHEME PATH [extra curl args]: prints "<status> <body>".
request() {
    local host="$1" port="$2" scheme="$3" path="$4"
    shift 4
    curl -sS --max-time 5 --resolve "$host:$port:$addr" -o "$tmp/body" -w '%{http_code}' \
        "$@" "$scheme://$host:$port$path" >"$tmp/code" 2>"$tmp/err" || true
    printf '%s %s' "$(cat "$tmp/code")" "$(tr -d '\r\n' <"$tmp/body")"
}

# expect WANT HOST PORT SCHEME PATH [curl args]: polls (at most 60 tries, 1 s apart) until the
# response is exactly "<status> <body>" (routes appear within about a second of an apply).
expect() {
    local want="$1"
    shift
    local got=""
    for _ in $(seq 1 60); do
        got="$(request "$@")"
        if [ "$got" = "$want" ]; then
            step "ok: $3://$1:$2$4 -> $want"
            return 0
        fi
        sleep 1
    done
    fail "$*: want '$want', last got '$got' ($(cat "$tmp/err"))"
}

step "portico is rolled out"
k -n "$release_ns" rollout status deployment/portico --timeout=180s || fail "portico not ready"

step "backends"
k apply -f "$here/backends.yaml"
k -n "$ns" rollout status deployment/echo-one --timeout=180s || fail "echo-one not ready"
k -n "$ns" rollout status deployment/echo-two --timeout=180s || fail "echo-two not ready"

step "TLS Secret e2e-tls for secure.portico.test"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=secure.portico.test" \
    -addext "subjectAltName=DNS:secure.portico.test" \
    -keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null
k -n "$ns" create secret tls e2e-tls --cert="$tmp/tls.crt" --key="$tmp/tls.key" \
    --dry-run=client -o yaml | k apply -f -

step "Ingresses and RateLimitPolicy"
k apply -f "$here/routes.yaml"

step "HTTP host and path rules"
expect "200 echo-one" e2e.portico.test "$http_port" http /one
expect "200 echo-one" e2e.portico.test "$http_port" http /one/deeper
expect "200 echo-two" e2e.portico.test "$http_port" http /two
# Host matched, no path matched, no default backend (README "Routing").
expect "404 Not Found" e2e.portico.test "$http_port" http /three

step "HTTPS with the Secret's certificate (SNI), and the 308 from plain HTTP"
expect "200 echo-two" secure.portico.test "$https_port" https / --cacert "$tmp/tls.crt"
code="$(curl -sS --max-time 5 --resolve "secure.portico.test:$http_port:$addr" -o /dev/null \
    -w '%{http_code} %{redirect_url}' "http://secure.portico.test:$http_port/x")"
case "$code" in
    "308 https://secure.portico.test"*) step "ok: plain HTTP to a TLS host -> $code" ;;
    *) fail "plain HTTP to secure.portico.test: want 308 to https, got '$code'" ;;
esac

step "status: Ingress status.loadBalancer and RateLimitPolicy Accepted"
k -n "$ns" wait ingress/paths --for=jsonpath='{.status.loadBalancer.ingress[0].ip}'="$status_address" \
    --timeout=60s || fail "Ingress paths has no status.loadBalancer $status_address"
k -n "$ns" wait ratelimitpolicy/limited --for=condition=Accepted --timeout=60s \
    || fail "RateLimitPolicy limited not Accepted"

step "rate limit: a bucket of 3 (refill 3/h, Global key) refuses a burst of 10 with 429"
# The route is there once it answers 200 (or already 429, when an earlier run emptied the bucket).
served=""
for _ in $(seq 1 60); do
    case "$(request limited.portico.test "$http_port" http /)" in
        "200 echo-one" | "429 "*) served=yes && break ;;
    esac
    sleep 1
done
[ -n "$served" ] || fail "limited.portico.test never served"
limited=""
for i in $(seq 1 10); do
    code="$(curl -sS --max-time 5 --resolve "limited.portico.test:$http_port:$addr" \
        -o /dev/null -D "$tmp/headers" -w '%{http_code}' "http://limited.portico.test:$http_port/")"
    if [ "$code" = 429 ]; then
        grep -qi '^retry-after: *[1-9]' "$tmp/headers" || fail "429 without Retry-After"
        limited="request $i"
        break
    fi
done
[ -n "$limited" ] || fail "10 requests to limited.portico.test, none got 429"
step "ok: 429 with Retry-After at $limited"

step "all checks passed (kubectl delete namespace $ns cleans up)"
