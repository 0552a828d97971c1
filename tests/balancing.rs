//! Load balancing and health over real sockets (brief §4.6): least request, consistent hashing
//! on a header, the client IP and a sticky cookie (across snapshot rebuilds), passive ejection,
//! active health checks and the retry budget. The real listeners and handler, real hyper
//! backends on 127.0.0.1:0; waits are bounded polling on observable state, never sleeps.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;

use portico::model::{HashKey, HealthCheck, LoadBalance};
use portico::proxy::ProxyConfig;
use support::*;

fn cfg() -> ProxyConfig {
    quiet_config()
}

fn lb(strategy: LoadBalance) -> impl FnOnce(&mut portico::model::RoutePolicy) {
    move |p| p.load_balance = strategy
}

async fn get_with(addr: SocketAddr, headers: &[(&str, &str)]) -> Got {
    let mut h = vec![("host", "x")];
    h.extend_from_slice(headers);
    send(addr, request("GET", "/", &h, ""))
        .await
        .expect("response")
}

// ---------------------------------------------------------------- least request

#[tokio::test]
async fn least_request_sends_everything_to_the_idle_endpoint_while_one_is_busy() {
    let slow = gated_backend().await;
    let fast = echo_backend("fast").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[slow.addr, fast.addr])
        .service("lr")
        .policy(lb(LoadBalance::LeastRequest))])
    .await;
    let addr = p.addr;
    // Ties are broken at random: send requests one by one until one is held at `slow`.
    let mut held = None;
    for _ in 0..64 {
        let h = tokio::spawn(async move { get(addr, "x", "/").await });
        wait_until(|| h.is_finished() || slow.requests.load(Ordering::SeqCst) == 1).await;
        if slow.requests.load(Ordering::SeqCst) == 1 {
            held = Some(h);
            break;
        }
        assert_eq!(h.await.expect("task").echo().name, "fast");
    }
    let held = held.expect("one request reached the slow endpoint");
    assert_eq!(p.handler.upstreams().endpoint_in_flight(slow.addr), 1);
    let gauge = p
        .metrics
        .upstream_in_flight
        .with_label_values(&["default", "lr"]);
    wait_until(|| gauge.get() == 1).await;
    // One in flight at `slow`, none at `fast`: power of two choices over two endpoints
    // compares both every time, so every request goes to `fast`.
    for i in 0..20 {
        assert_eq!(get(addr, "x", "/").await.echo().name, "fast", "request {i}");
    }
    assert_eq!(slow.requests.load(Ordering::SeqCst), 1);
    slow.gate.add_permits(1);
    assert_eq!(held.await.expect("task").status, StatusCode::OK);
    wait_until(|| gauge.get() == 0).await;
    assert_eq!(p.handler.upstreams().endpoint_in_flight(slow.addr), 0);
}

// ---------------------------------------------------------------- consistent hashing

#[tokio::test]
async fn consistent_hash_on_a_header_keeps_each_key_on_one_endpoint() {
    let bs = [
        echo_backend("a").await,
        echo_backend("b").await,
        echo_backend("c").await,
    ];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &addrs).policy(lb(
        LoadBalance::ConsistentHash(HashKey::Header("x-user".into())),
    ))])
    .await;
    let mut home: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for u in 0..30 {
            let user = format!("user-{u}");
            let got = get_with(p.addr, &[("x-user", &user)]).await.echo().name;
            let first = home.entry(user.clone()).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "{user} moved in round {round}");
        }
    }
    let used: HashSet<_> = home.values().collect();
    assert!(used.len() >= 2, "30 keys all on one endpoint: {home:?}");
}

#[tokio::test]
async fn consistent_hash_on_client_ip_uses_the_address_behind_trusted_proxies() {
    let bs = [
        echo_backend("a").await,
        echo_backend("b").await,
        echo_backend("c").await,
    ];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let p = start_proxy(
        ProxyConfig {
            trusted_proxies: vec!["127.0.0.0/8".parse().expect("net")],
            ..cfg()
        },
        false,
    )
    .await;
    p.publisher
        .publish(snapshot(&[RouteSpec::prefix(None, "/", &addrs)
            .policy(lb(LoadBalance::ConsistentHash(HashKey::ClientIp)))]));
    let mut home: HashMap<String, String> = HashMap::new();
    for _ in 0..3 {
        for c in 1..=30 {
            let client = format!("203.0.113.{c}");
            let got = get_with(p.addr, &[("x-forwarded-for", &client)])
                .await
                .echo()
                .name;
            let first = home.entry(client.clone()).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "{client} moved");
        }
    }
    let used: HashSet<_> = home.values().collect();
    assert!(used.len() >= 2, "30 clients all on one endpoint: {home:?}");
}

fn sticky(ttl: Option<Duration>) -> LoadBalance {
    LoadBalance::ConsistentHash(HashKey::Cookie {
        name: "sid".into(),
        ttl,
    })
}

/// `sid=<value>` from a response's Set-Cookie.
fn issued_cookie(got: &Got) -> (String, String) {
    let sc = got
        .headers
        .get("set-cookie")
        .expect("a sticky cookie is issued")
        .to_str()
        .expect("ascii")
        .to_string();
    let pair = sc.split(';').next().expect("pair").to_string();
    (pair, sc)
}

/// A WebSocket handshake without the cookie gets one on its 101, so a reconnect finds the
/// same endpoint (it may be the client's first request on the route).
#[tokio::test]
async fn a_websocket_handshake_is_issued_the_sticky_cookie() {
    let ws = websocket_backend().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[ws.addr]).policy(lb(sticky(None)))]).await;
    let mut s = tokio::net::TcpStream::connect(p.addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let head = String::from_utf8_lossy(&read_head(&mut s).await).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("\r\nset-cookie: sid=") && head.contains("; path=/; httponly"),
        "{head}"
    );
}

#[tokio::test]
async fn cookie_stickiness_survives_rebuilds_and_a_missing_cookie_is_issued() {
    let bs = [
        echo_backend("a").await,
        echo_backend("b").await,
        echo_backend("c").await,
        echo_backend("d").await,
    ];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let route = |eps: &[SocketAddr]| {
        RouteSpec::prefix(Some("shop.example"), "/", eps)
            .service("shop")
            .policy(lb(sticky(None)))
    };
    let p = proxy_with(&[route(&addrs)]).await;
    let shop = |cookie: Option<&str>| {
        let mut h = vec![("host", "shop.example")];
        if let Some(c) = cookie {
            h.push(("cookie", c));
        }
        let req = request("GET", "/", &h, "");
        async move { send(p.addr, req).await.expect("response") }
    };

    // No cookie: one is issued, session-scoped over plain HTTP.
    let first = shop(None).await;
    assert_eq!(first.status, StatusCode::OK);
    let (pair, full) = issued_cookie(&first);
    assert!(pair.starts_with("sid=") && pair.len() > 4, "{full}");
    assert_eq!(full, format!("{pair}; Path=/; HttpOnly; SameSite=Lax"));
    let home = first.echo().name;

    // With it: always the same endpoint, nothing new issued; other cookies do not matter.
    let with_others = format!("theme=dark; {pair}");
    for c in [pair.as_str(), with_others.as_str()] {
        for _ in 0..10 {
            let got = shop(Some(c)).await;
            assert!(got.headers.get("set-cookie").is_none());
            assert_eq!(got.echo().name, home);
        }
    }

    // Rebuilds: endpoints listed in another order, an unrelated route added, then an
    // endpoint other than the home one removed.
    let other = echo_backend("other").await;
    let mut rebuilt = snapshot(&[
        route(&addrs),
        RouteSpec::prefix(Some("other.example"), "/", &[other.addr]),
    ]);
    // `snapshot` sorts endpoints like translate does; reverse them by hand so the new
    // snapshot really lists them in another order.
    let mut table = (*rebuilt.backends).clone();
    for b in &mut table.backends {
        let mut eps = b.endpoints.to_vec();
        eps.reverse();
        b.endpoints = eps.into();
    }
    rebuilt.backends = std::sync::Arc::new(table);
    assert_eq!(
        p.publisher.publish(rebuilt),
        portico::publish::Published::Swapped
    );
    for _ in 0..10 {
        assert_eq!(shop(Some(&pair)).await.echo().name, home);
    }
    let names = ["a", "b", "c", "d"];
    let home_addr = addrs[names.iter().position(|n| *n == home).expect("known")];
    let fewer: Vec<_> = addrs
        .iter()
        .copied()
        .filter(|a| *a != home_addr)
        .take(2)
        .chain([home_addr])
        .collect();
    p.publisher.publish(snapshot(&[route(&fewer)]));
    for _ in 0..10 {
        assert_eq!(shop(Some(&pair)).await.echo().name, home);
    }

    // Many fresh clients spread over the endpoints, each staying where it started.
    let mut homes = HashSet::new();
    for _ in 0..20 {
        let got = shop(None).await;
        let (c, _) = issued_cookie(&got);
        let at = got.echo().name;
        assert_eq!(shop(Some(&c)).await.echo().name, at);
        homes.insert(at);
    }
    assert!(homes.len() >= 2, "{homes:?}");

    // A TTL becomes Max-Age.
    p.publisher.publish(snapshot(&[RouteSpec::prefix(
        Some("shop.example"),
        "/",
        &addrs,
    )
    .service("shop")
    .policy(lb(sticky(Some(Duration::from_secs(3600)))))]));
    let (_, full) = issued_cookie(&shop(None).await);
    assert!(full.ends_with("; Max-Age=3600"), "{full}");
}

#[tokio::test]
async fn the_sticky_cookie_issued_over_https_is_secure() {
    let b = echo_backend("b").await;
    let p = start_proxy(cfg(), true).await;
    p.publisher.publish(snapshot(&[
        RouteSpec::prefix(None, "/", &[b.addr]).policy(lb(sticky(None)))
    ]));
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(p.tls_root.clone().expect("tls root"))
        .expect("add root");
    let cc = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cc));
    let tcp = tokio::net::TcpStream::connect(p.tls_addr.expect("tls addr"))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let resp = tx
        .send_request(request("GET", "/", &[("host", "localhost")], ""))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let sc = resp.headers()["set-cookie"].to_str().expect("ascii");
    assert!(sc.starts_with("sid="), "{sc}");
    assert!(
        sc.ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure"),
        "{sc}"
    );
}

// ---------------------------------------------------------------- passive health

#[tokio::test]
async fn an_endpoint_that_starts_failing_is_ejected_and_traffic_moves_away() {
    let good = echo_backend("good").await;
    let (flaky, sw) = switch_backend("flaky").await;
    let p =
        proxy_with(&[RouteSpec::prefix(None, "/", &[flaky.addr, good.addr]).service("pas")]).await;
    let mut names = HashSet::new();
    for _ in 0..4 {
        names.insert(get(p.addr, "x", "/").await.echo().name);
    }
    assert_eq!(names.len(), 2, "both serve while healthy");

    sw.failing.store(true, Ordering::SeqCst);
    // GETs are retried on the good endpoint: clients never see the 503s.
    for i in 0..12 {
        let got = get(p.addr, "x", "/").await;
        assert_eq!(got.status, StatusCode::OK, "request {i}");
        assert_eq!(got.echo().name, "good");
    }
    let ups = p.handler.upstreams();
    assert!(ups.is_ejected(flaky.addr));
    assert!(!ups.is_ejected(good.addr), "never more than 50% ejected");
    let flaky_ep = flaky.addr.to_string();
    assert_eq!(
        p.metrics
            .upstream_ejections
            .with_label_values(&["default", "pas", &flaky_ep])
            .get(),
        1
    );
    // Ejected: no more traffic reaches it.
    let before = flaky.requests.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(get(p.addr, "x", "/").await.echo().name, "good");
    }
    assert_eq!(flaky.requests.load(Ordering::SeqCst), before);
    // The endpoint leaves its Service (the pod went away): its ejection series goes too, so
    // label values do not pile up with pod churn.
    let series = format!("portico_upstream_ejections_total{{endpoint=\"{flaky_ep}\"");
    assert!(p.metrics.render().contains(&series));
    p.publisher.publish(snapshot(&[
        RouteSpec::prefix(None, "/", &[good.addr]).service("pas")
    ]));
    wait_until(|| !p.metrics.render().contains(&series)).await;
    assert_eq!(get(p.addr, "x", "/").await.echo().name, "good");
    // ... and so does its ejection (forgotten first): back in the Service (ready again),
    // healthy, it serves at once rather than after the rest of its ejection.
    assert!(!ups.is_ejected(flaky.addr));
    sw.failing.store(false, Ordering::SeqCst);
    p.publisher.publish(snapshot(&[RouteSpec::prefix(
        None,
        "/",
        &[flaky.addr, good.addr],
    )
    .service("pas")]));
    let mut names = HashSet::new();
    for _ in 0..4 {
        names.insert(get(p.addr, "x", "/").await.echo().name);
    }
    assert_eq!(names.len(), 2, "both serve again");
    // (Restoration after the 10 s backoff is asserted with paused time in
    // proxy::upstream::tests::ejected_endpoint_is_skipped_by_every_strategy_and_restored_after_backoff.)
}

// ---------------------------------------------------------------- active health

fn fast_check() -> HealthCheck {
    HealthCheck {
        path: "/healthz".into(),
        interval: Duration::from_millis(30),
        timeout: Duration::from_secs(2),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    }
}

#[tokio::test]
async fn active_checks_mark_a_failing_endpoint_down_and_back_up() {
    let (a, sw) = switch_backend("a").await;
    let b = echo_backend("b").await;
    let route = |eps: &[SocketAddr]| {
        RouteSpec::prefix(None, "/", eps)
            .service("checked")
            .health_check(fast_check())
    };
    let p = proxy_with(&[route(&[a.addr, b.addr])]).await;
    let ep_a = a.addr.to_string();
    let labels = ["default", "checked", ep_a.as_str()];
    let healthy = p.metrics.endpoint_healthy.with_label_values(&labels);
    let ok = p
        .metrics
        .health_checks
        .with_label_values(&["default", "checked", &ep_a, "success"]);
    let failed = p
        .metrics
        .health_checks
        .with_label_values(&["default", "checked", &ep_a, "failure"]);
    wait_until(|| ok.get() >= 1 && healthy.get() == 1).await;
    assert!(sw.probes.load(Ordering::SeqCst) >= 1);

    // /healthz fails: down after 2 consecutive failures; traffic avoids it.
    sw.unhealthy.store(true, Ordering::SeqCst);
    wait_until(|| healthy.get() == 0).await;
    assert!(failed.get() >= 2);
    for _ in 0..10 {
        assert_eq!(get(p.addr, "x", "/").await.echo().name, "b");
    }

    // Down but the only endpoint left: served anyway (panic mode), not 503.
    p.publisher.publish(snapshot(&[route(&[a.addr])]));
    let got = get(p.addr, "x", "/").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.echo().name, "a");

    // /healthz recovers: up after 2 successes; round robin reaches it again.
    p.publisher.publish(snapshot(&[route(&[a.addr, b.addr])]));
    sw.unhealthy.store(false, Ordering::SeqCst);
    wait_until(|| healthy.get() == 1).await;
    let mut names = HashSet::new();
    for _ in 0..6 {
        names.insert(get(p.addr, "x", "/").await.echo().name);
    }
    assert_eq!(names.len(), 2, "{names:?}");

    // The endpoint leaves the snapshot: its probes stop and its series go away.
    drop((healthy, ok, failed));
    p.publisher.publish(snapshot(&[route(&[b.addr])]));
    let needle = format!("endpoint=\"{ep_a}\"");
    wait_until(|| !p.metrics.render().contains(&needle)).await;
    let probes = sw.probes.load(Ordering::SeqCst);
    // Still probing `b` proves the checker ran long enough for `a` to have been probed again.
    let b_ok = p.metrics.health_checks.with_label_values(&[
        "default",
        "checked",
        &b.addr.to_string(),
        "success",
    ]);
    let target = b_ok.get() + 3;
    wait_until(|| b_ok.get() >= target).await;
    // One probe may have been in flight when the endpoint left.
    assert!(sw.probes.load(Ordering::SeqCst) <= probes + 1);
}

#[tokio::test]
async fn backends_without_a_check_are_never_probed() {
    let (a, sw) = switch_backend("a").await;
    let (c, csw) = switch_backend("c").await;
    let p = proxy_with(&[
        RouteSpec::prefix(Some("plain"), "/", &[a.addr]).service("plain"),
        RouteSpec::prefix(Some("checked"), "/", &[c.addr])
            .service("checked")
            .health_check(fast_check()),
    ])
    .await;
    wait_until(|| csw.probes.load(Ordering::SeqCst) >= 3).await;
    assert_eq!(sw.probes.load(Ordering::SeqCst), 0);
    assert_eq!(get(p.addr, "plain", "/").await.status, StatusCode::OK);
}

// ---------------------------------------------------------------- retry budget

#[tokio::test]
async fn the_retry_budget_caps_extra_load_on_a_failing_backend() {
    let bs = [
        status_backend(503).await,
        status_backend(503).await,
        status_backend(503).await,
    ];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &addrs).service("failing")]).await;
    let sent = 100usize;
    let started = tokio::time::Instant::now();
    for _ in 0..sent {
        assert_eq!(get(p.addr, "x", "/").await.status, 503);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let arrived: usize = bs.iter().map(|b| b.requests.load(Ordering::SeqCst)).sum();
    let extra = arrived - sent;
    // Without a budget every GET would be tried 3 times (2 retries): 200 extra. The budget
    // allows 20% of requests plus the floor (3 banked, refilled at 3/s).
    let allowed = 0.2 * sent as f64 + 3.0 + 3.0 * elapsed.ceil();
    assert!(
        (extra as f64) <= allowed,
        "{extra} retries reached the backend, at most {allowed} allowed"
    );
    assert!(extra >= 3, "retries do happen within the budget: {extra}");
    assert_eq!(
        p.metrics
            .upstream_retries
            .with_label_values(&["default", "failing"])
            .get() as usize,
        extra
    );
}
