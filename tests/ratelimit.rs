//! RateLimitPolicy enforcement and concurrency caps over real sockets (brief §4.5, §4.6): the
//! product's listeners and handler on 127.0.0.1:0, real hyper backends, snapshots republished
//! the way a rebuild does. Periods are long (an hour) so no token refills while a test runs;
//! refill arithmetic itself is tested with paused time in `proxy::ratelimit`.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use portico::model::{
    PolicyRef, RateLimit, RateLimitKey, RoutePolicy, SslRedirect, TokenBucketSpec,
};
use portico::proxy::ProxyConfig;
use support::*;

fn cfg() -> ProxyConfig {
    quiet_config()
}

fn trusting_loopback() -> ProxyConfig {
    ProxyConfig {
        trusted_proxies: vec!["127.0.0.0/8".parse().expect("net")],
        ..cfg()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

fn bucket(name: &str, requests: u32, burst: u32, key: RateLimitKey) -> RateLimit {
    RateLimit {
        policy: PolicyRef {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}").into(),
        },
        bucket: Some(TokenBucketSpec {
            requests,
            period: HOUR,
            burst,
        }),
        key,
        max_in_flight: None,
    }
}

fn in_flight_cap(name: &str, cap: u32) -> RateLimit {
    RateLimit {
        bucket: None,
        max_in_flight: Some(cap),
        ..bucket(name, 1, 1, RateLimitKey::Global)
    }
}

/// A route on `host` for Ingress `ing` to `backend`, limited by `limits`.
fn limited(host: &str, backend: &TestBackend, limits: &[RateLimit]) -> RouteSpec {
    let limits: Arc<[RateLimit]> = limits.to_vec().into();
    RouteSpec::prefix(Some(host), "/", &[backend.addr])
        .ingress("ing")
        .policy(move |p: &mut RoutePolicy| p.rate_limits = limits)
}

async fn get_h(p: &TestProxy, host: &str, headers: &[(&str, &str)]) -> Got {
    let mut all = vec![("host", host)];
    all.extend_from_slice(headers);
    send(p.addr, request("GET", "/", &all, ""))
        .await
        .expect("response")
}

fn header<'a>(got: &'a Got, name: &str) -> &'a str {
    got.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Start `n` requests that the gated backend holds, and wait until all of them arrived there.
// ---------------------------------------------------------------- 429 and headers

#[tokio::test]
async fn after_the_burst_429_with_retry_after_and_ratelimit_headers() {
    let b = echo_backend("b").await;
    let free = echo_backend("free").await;
    let p = start_proxy(cfg(), false).await;
    p.publisher.publish(snapshot(&[
        limited(
            "shop",
            &b,
            &[bucket("per-client", 3, 3, RateLimitKey::ClientIp)],
        ),
        RouteSpec::prefix(Some("free"), "/", &[free.addr]).ingress("free"),
    ]));
    for left in [2, 1, 0] {
        let got = get(p.addr, "shop", "/").await;
        assert_eq!(got.status, 200);
        // draft-ietf-httpapi-ratelimit-headers-10: q = burst, w = seconds to refill it.
        assert_eq!(
            header(&got, "ratelimit-policy"),
            "\"per-client\";q=3;w=3600"
        );
        let state = header(&got, "ratelimit");
        assert!(
            state.starts_with(&format!("\"per-client\";r={left};t=")),
            "{state}"
        );
    }
    let over = get(p.addr, "shop", "/").await;
    assert_eq!(over.status, 429);
    // 3 per hour: the next token is 20 minutes away (a few ms already refilled, rounded up).
    assert_eq!(header(&over, "retry-after"), "1200");
    assert_eq!(
        header(&over, "ratelimit-policy"),
        "\"per-client\";q=3;w=3600"
    );
    // The reset is the next token too, so it is never later than Retry-After (draft §6).
    assert_eq!(header(&over, "ratelimit"), "\"per-client\";r=0;t=1200");
    assert_eq!(over.text(), "Too Many Requests\n");
    // Refused requests never reach the backend.
    assert_eq!(b.requests.load(Ordering::SeqCst), 3);
    let m = p.metrics.clone();
    assert_eq!(
        m.ratelimit_rejected
            .with_label_values(&["default", "ing", "per-client"])
            .get(),
        1
    );
    // Unlimited routes carry no rate-limit headers.
    let other = get(p.addr, "free", "/").await;
    assert_eq!(other.status, 200);
    assert!(other.headers.get("ratelimit").is_none());
    assert!(other.headers.get("ratelimit-policy").is_none());
}

#[tokio::test]
async fn answers_decided_before_the_limits_carry_their_headers_and_spend_nothing() {
    let b = echo_backend("b").await;
    let p = start_proxy(cfg(), false).await;
    let limits: Arc<[RateLimit]> = vec![bucket("per-client", 3, 3, RateLimitKey::ClientIp)].into();
    let (l1, l2) = (limits.clone(), limits.clone());
    p.publisher.publish(snapshot(&[
        // The same policy on three routes: one with no ready endpoint, one that redirects
        // plain HTTP to HTTPS, one that serves. They share the policy's buckets.
        RouteSpec::prefix(Some("empty"), "/", &[])
            .ingress("empty")
            .policy(move |p: &mut RoutePolicy| p.rate_limits = l1),
        RouteSpec::prefix(Some("secure"), "/", &[b.addr])
            .ingress("secure")
            .policy(move |p: &mut RoutePolicy| {
                p.rate_limits = l2;
                p.ssl_redirect = SslRedirect::Yes;
            }),
        limited("shop", &b, &limits),
    ]));
    for (host, status) in [
        ("empty", 503),
        ("secure", 308),
        ("empty", 503),
        ("secure", 308),
    ] {
        let got = get(p.addr, host, "/").await;
        assert_eq!(got.status, status, "{host}");
        assert_eq!(
            header(&got, "ratelimit-policy"),
            "\"per-client\";q=3;w=3600",
            "{host}"
        );
        // A full bucket: no reset, nothing more to come (draft §4.1.2).
        assert_eq!(header(&got, "ratelimit"), "\"per-client\";r=3", "{host}");
    }
    // None of those spent a token: the first served request takes the first one.
    let served = get(p.addr, "shop", "/").await;
    assert_eq!(served.status, 200);
    assert!(
        header(&served, "ratelimit").starts_with("\"per-client\";r=2;t="),
        "{}",
        header(&served, "ratelimit")
    );
    assert_eq!(b.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn several_policies_all_apply_and_a_refusal_spends_no_other_token() {
    let b = echo_backend("b").await;
    let p = start_proxy(cfg(), false).await;
    p.publisher.publish(snapshot(&[limited(
        "shop",
        &b,
        &[
            bucket("a-wide", 100, 10, RateLimitKey::Global),
            bucket("b-tight", 1, 2, RateLimitKey::ClientIp),
        ],
    )]));
    assert_eq!(get(p.addr, "shop", "/").await.status, 200);
    assert_eq!(get(p.addr, "shop", "/").await.status, 200);
    for _ in 0..5 {
        let got = get(p.addr, "shop", "/").await;
        assert_eq!(got.status, 429);
        // One list member per policy; a-wide still has 8 (refused requests gave theirs back).
        let state = header(&got, "ratelimit");
        assert!(state.starts_with("\"a-wide\";r=8;t="), "{state}");
        assert!(state.contains(", \"b-tight\";r=0;t="), "{state}");
        assert_eq!(
            header(&got, "ratelimit-policy"),
            "\"a-wide\";q=10;w=360, \"b-tight\";q=2;w=7200"
        );
    }
    assert_eq!(
        p.metrics
            .ratelimit_rejected
            .with_label_values(&["default", "ing", "b-tight"])
            .get(),
        5
    );
}

// ---------------------------------------------------------------- keys

#[tokio::test]
async fn client_ip_buckets_are_per_client_through_a_trusted_hop() {
    let b = echo_backend("b").await;
    let p = start_proxy(trusting_loopback(), false).await;
    p.publisher.publish(snapshot(&[limited(
        "shop",
        &b,
        &[bucket("ip", 1, 1, RateLimitKey::ClientIp)],
    )]));
    let xff = |v: &'static str| [("x-forwarded-for", v)];
    assert_eq!(get_h(&p, "shop", &xff("203.0.113.1")).await.status, 200);
    assert_eq!(get_h(&p, "shop", &xff("203.0.113.1")).await.status, 429);
    // Another client behind the same trusted hop has its own bucket.
    assert_eq!(get_h(&p, "shop", &xff("203.0.113.2")).await.status, 200);
    // A client cannot escape by prepending entries: the right-most untrusted one counts.
    let spoofed = [("x-forwarded-for", "198.51.100.9, 203.0.113.1")];
    assert_eq!(get_h(&p, "shop", &spoofed).await.status, 429);
    // Trusted hops to the right are skipped (127.0.0.5 is a trusted proxy here).
    let chain = [("x-forwarded-for", "203.0.113.1, 127.0.0.5")];
    assert_eq!(get_h(&p, "shop", &chain).await.status, 429);
    // X-Real-IP is never trusted for this (brief §4.5).
    let real_ip = [
        ("x-forwarded-for", "203.0.113.2"),
        ("x-real-ip", "192.0.2.50"),
    ];
    assert_eq!(get_h(&p, "shop", &real_ip).await.status, 429);
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let b = echo_backend("b").await;
    let p = start_proxy(cfg(), false).await;
    p.publisher.publish(snapshot(&[limited(
        "shop",
        &b,
        &[bucket("ip", 1, 1, RateLimitKey::ClientIp)],
    )]));
    let first = [("x-forwarded-for", "203.0.113.1")];
    let second = [("x-forwarded-for", "203.0.113.2")];
    assert_eq!(get_h(&p, "shop", &first).await.status, 200);
    // Same peer (127.0.0.1), whatever it claims: same bucket.
    assert_eq!(get_h(&p, "shop", &second).await.status, 429);
}

#[tokio::test]
async fn header_key_buckets_per_value_and_a_missing_header_shares_one() {
    let b = echo_backend("b").await;
    let p = start_proxy(cfg(), false).await;
    p.publisher.publish(snapshot(&[limited(
        "api",
        &b,
        &[bucket(
            "keys",
            1,
            1,
            RateLimitKey::Header("x-api-key".into()),
        )],
    )]));
    assert_eq!(
        get_h(&p, "api", &[("x-api-key", "alice")]).await.status,
        200
    );
    // Header names are case-insensitive.
    assert_eq!(
        get_h(&p, "api", &[("X-Api-Key", "alice")]).await.status,
        429
    );
    assert_eq!(get_h(&p, "api", &[("x-api-key", "bob")]).await.status, 200);
    assert_eq!(get_h(&p, "api", &[]).await.status, 200);
    assert_eq!(get_h(&p, "api", &[]).await.status, 429);
    // A huge value is its own (hashed) key, not a way to share or blow up memory.
    let huge = "k".repeat(4000);
    assert_eq!(get_h(&p, "api", &[("x-api-key", &huge)]).await.status, 200);
    assert_eq!(get_h(&p, "api", &[("x-api-key", &huge)]).await.status, 429);
    assert_eq!(p.handler.limiter().tracked(), 4);
}

#[tokio::test]
async fn global_key_is_one_bucket_for_every_client() {
    let b = echo_backend("b").await;
    let p = start_proxy(trusting_loopback(), false).await;
    p.publisher.publish(snapshot(&[limited(
        "shop",
        &b,
        &[bucket("all", 1, 2, RateLimitKey::Global)],
    )]));
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(get_h(&p, "shop", &from("203.0.113.1")).await.status, 200);
    assert_eq!(get_h(&p, "shop", &from("203.0.113.2")).await.status, 200);
    assert_eq!(get_h(&p, "shop", &from("203.0.113.3")).await.status, 429);
}

// ---------------------------------------------------------------- state across snapshots

#[tokio::test]
async fn buckets_survive_an_endpoint_change_and_an_unrelated_edit() {
    let one = echo_backend("one").await;
    let two = echo_backend("two").await;
    let other = echo_backend("other").await;
    let limits = [bucket("per-client", 1, 3, RateLimitKey::ClientIp)];
    let p = start_proxy(cfg(), false).await;
    p.publisher
        .publish(snapshot(&[limited("shop", &one, &limits).service("web")]));
    assert_eq!(get(p.addr, "shop", "/").await.status, 200);
    assert_eq!(get(p.addr, "shop", "/").await.status, 200);
    let tracked = p.handler.limiter().tracked();
    assert_eq!(tracked, 1);

    // EndpointSlice change (the Service's pod moved) plus an unrelated new Ingress: a rebuild
    // publishes a new snapshot with new Arc'd policies.
    let rebuilt = snapshot(&[
        limited("shop", &two, &limits).service("web"),
        RouteSpec::prefix(Some("other"), "/", &[other.addr]).ingress("other"),
    ]);
    p.publisher.publish(rebuilt);
    let got = get(p.addr, "shop", "/").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.echo().name, "two", "the new snapshot serves");
    // The bucket carried over: the third token of three was the last one.
    assert!(header(&got, "ratelimit").starts_with("\"per-client\";r=0;"));
    assert_eq!(get(p.addr, "shop", "/").await.status, 429);
    assert_eq!(get(p.addr, "other", "/").await.status, 200);
    assert_eq!(p.handler.limiter().tracked(), 1);
}

#[tokio::test]
async fn a_policy_edit_clamps_the_tokens_and_keeps_them() {
    let b = echo_backend("b").await;
    let p = start_proxy(cfg(), false).await;
    p.publisher.publish(snapshot(&[limited(
        "shop",
        &b,
        &[bucket("p", 10, 10, RateLimitKey::ClientIp)],
    )]));
    for _ in 0..2 {
        assert_eq!(get(p.addr, "shop", "/").await.status, 200);
    }
    // 8 left; the edit lowers the burst to 3: clamped to 3, not reset to a full 10.
    p.publisher.publish(snapshot(&[limited(
        "shop",
        &b,
        &[bucket("p", 10, 3, RateLimitKey::ClientIp)],
    )]));
    let got = get(p.addr, "shop", "/").await;
    assert_eq!(got.status, 200);
    assert!(
        header(&got, "ratelimit").starts_with("\"p\";r=2;"),
        "{got:?}",
        got = header(&got, "ratelimit")
    );
    assert_eq!(header(&got, "ratelimit-policy"), "\"p\";q=3;w=1080");
    for _ in 0..2 {
        assert_eq!(get(p.addr, "shop", "/").await.status, 200);
    }
    assert_eq!(get(p.addr, "shop", "/").await.status, 429);
    // Raising the numbers keeps the (empty) bucket: still limited until it refills.
    p.publisher.publish(snapshot(&[limited(
        "shop",
        &b,
        &[bucket("p", 10, 100, RateLimitKey::ClientIp)],
    )]));
    assert_eq!(get(p.addr, "shop", "/").await.status, 429);
}

// ---------------------------------------------------------------- concurrency caps

#[tokio::test]
async fn max_in_flight_is_503_exactly_over_the_cap_across_the_policy_routes() {
    let gate = gated_backend().await;
    let p = start_proxy(cfg(), false).await;
    let limits: Arc<[RateLimit]> = vec![in_flight_cap("cap", 2)].into();
    let (l1, l2) = (limits.clone(), limits.clone());
    p.publisher.publish(snapshot(&[
        RouteSpec::prefix(Some("shop"), "/a", &[gate.addr])
            .ingress("ing")
            .policy(move |p: &mut RoutePolicy| p.rate_limits = l1),
        RouteSpec::prefix(Some("shop"), "/b", &[gate.addr])
            .ingress("ing")
            .policy(move |p: &mut RoutePolicy| p.rate_limits = l2),
    ]));
    // One held on each route: the policy's slots are shared by the routes it covers.
    let mut held = hold(&p, "shop", "/a", 1, &gate).await;
    held.extend(hold(&p, "shop", "/b", 1, &gate).await);
    let over = get(p.addr, "shop", "/a").await;
    assert_eq!(over.status, 503);
    assert_eq!(
        header(&over, "ratelimit-policy"),
        "\"cap\";q=2;qu=\"concurrent-requests\""
    );
    assert_eq!(header(&over, "ratelimit"), "\"cap\";r=0");
    assert_eq!(
        p.metrics
            .concurrency_rejected
            .with_label_values(&["policy", "default", "ing", "cap"])
            .get(),
        1
    );
    gate.gate.add_permits(2);
    for h in held {
        assert_eq!(h.await.expect("join"), 200);
    }
    // Slots come back once responses finish: exactly two fit again.
    let counter = p.handler.limiter().in_flight(&limits[0].policy);
    wait_until(|| counter.load(Ordering::SeqCst) == 0).await;
    let held = hold(&p, "shop", "/b", 2, &gate).await;
    assert_eq!(get(p.addr, "shop", "/b").await.status, 503);
    gate.gate.add_permits(2);
    for h in held {
        assert_eq!(h.await.expect("join"), 200);
    }
}

#[tokio::test]
async fn global_cap_is_503_over_the_cap_and_counted() {
    let gate = gated_backend().await;
    let p = start_proxy(
        ProxyConfig {
            max_concurrent_requests: Some(2),
            ..cfg()
        },
        false,
    )
    .await;
    p.publisher
        .publish(snapshot(&[RouteSpec::prefix(None, "/", &[gate.addr])]));
    let held = hold(&p, "x", "/", 2, &gate).await;
    assert_eq!(get(p.addr, "x", "/").await.status, 503);
    assert_eq!(get(p.addr, "y", "/").await.status, 503);
    let rejected = |m: &portico::metrics::Metrics| {
        m.concurrency_rejected
            .with_label_values(&["global", "", "", ""])
            .get()
    };
    assert_eq!(rejected(&p.metrics), 2);
    gate.gate.add_permits(2);
    for h in held {
        assert_eq!(h.await.expect("join"), 200);
    }
    let handler = p.handler.clone();
    wait_until(|| handler.in_flight() == 0).await;
    gate.gate.add_permits(1);
    assert_eq!(get(p.addr, "x", "/").await.status, 200);
    assert_eq!(rejected(&p.metrics), 2);
    // Also under the pre-routing reason label.
    let refused = p
        .metrics
        .rejected_requests
        .with_label_values(&["global_concurrency"])
        .get();
    assert_eq!(refused, 2);
}

#[tokio::test]
async fn per_ingress_cap_is_503_over_the_cap_counted_and_isolated() {
    let gate = gated_backend().await;
    let free = echo_backend("free").await;
    let p = start_proxy(cfg(), false).await;
    p.publisher.publish(snapshot(&[
        RouteSpec::prefix(Some("capped"), "/", &[gate.addr])
            .ingress("capped")
            .policy(|p: &mut RoutePolicy| p.max_concurrent_requests = Some(3)),
        RouteSpec::prefix(Some("free"), "/", &[free.addr]).ingress("free"),
    ]));
    let held = hold(&p, "capped", "/", 3, &gate).await;
    assert_eq!(get(p.addr, "capped", "/").await.status, 503);
    assert_eq!(get(p.addr, "free", "/").await.status, 200);
    assert_eq!(
        p.metrics
            .concurrency_rejected
            .with_label_values(&["ingress", "default", "capped", ""])
            .get(),
        1
    );
    gate.gate.add_permits(3);
    for h in held {
        assert_eq!(h.await.expect("join"), 200);
    }
}

#[tokio::test]
async fn max_in_flight_refusal_spends_no_token() {
    let gate = gated_backend().await;
    let p = start_proxy(cfg(), false).await;
    let both = RateLimit {
        max_in_flight: Some(1),
        ..bucket("both", 1, 2, RateLimitKey::ClientIp)
    };
    p.publisher
        .publish(snapshot(&[limited("shop", &gate, &[both])]));
    let held = hold(&p, "shop", "/", 1, &gate).await;
    let over = get(p.addr, "shop", "/").await;
    assert_eq!(over.status, 503);
    // One token was spent by the held request; the 503 spent none.
    assert!(header(&over, "ratelimit").starts_with("\"both\";r=1;"));
    gate.gate.add_permits(2);
    for h in held {
        assert_eq!(h.await.expect("join"), 200);
    }
    let counter = p.handler.limiter().in_flight(&limits_policy("both"));
    wait_until(|| counter.load(Ordering::SeqCst) == 0).await;
    assert_eq!(get(p.addr, "shop", "/").await.status, 200);
    let counter = p.handler.limiter().in_flight(&limits_policy("both"));
    wait_until(|| counter.load(Ordering::SeqCst) == 0).await;
    assert_eq!(get(p.addr, "shop", "/").await.status, 429);
}

fn limits_policy(name: &str) -> PolicyRef {
    bucket(name, 1, 1, RateLimitKey::Global).policy
}
