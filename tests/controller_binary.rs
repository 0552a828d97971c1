//! The real `portico` binary as a Kubernetes ingress controller: a generated kubeconfig points
//! it at the in-tree fake API server; objects created, edited and deleted there change what real
//! HTTP requests get, and `/readyz` waits for every store to sync.

#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/process.rs"]
mod process;

use std::ffi::OsString;
use std::net::SocketAddr;

use serde_json::{Value, json};

use fake_api::FakeApi;
use process::{Portico, backend, client, eventually, get};

fn service(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": 80}]}
    })
}

fn slice(ns: &str, service: &str, addr: SocketAddr) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-{}", addr.port()), "namespace": ns,
            "labels": {"kubernetes.io/service-name": service}
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": addr.port()}],
        "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": true}}]
    })
}

fn ingress(ns: &str, name: &str, host: &str, path: &str, service: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "ingressClassName": "portico",
            "rules": [{"host": host, "http": {"paths": [{
                "path": path, "pathType": "Prefix",
                "backend": {"service": {"name": service, "port": {"name": "http"}}}
            }]}}]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_in_the_api_drive_real_traffic() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.write_kubeconfig(dir.path()).expect("kubeconfig");
    let blue = backend("blue").await;
    let green = backend("green").await;
    for obj in [
        service("shop", "blue"),
        slice("shop", "blue", blue.addr),
        service("shop", "green"),
        slice("shop", "green", green.addr),
        ingress("shop", "web", "shop.test", "/", "blue"),
    ] {
        api.create(obj).expect("create");
    }
    let args: Vec<OsString> = vec!["--kubeconfig".into(), kubeconfig.into()];
    let p = Portico::run(&args);
    let c = client();
    eventually("ready once every store synced", || async {
        matches!(get(&c, p.admin, "a", "/readyz").await, Ok((200, _)))
    })
    .await;
    assert_eq!(
        get(&c, p.http, "shop.test", "/").await,
        Ok((200, "blue".to_string()))
    );

    // Edit the Ingress: the route now goes to green.
    let mut edited = api
        .get("networking.k8s.io/v1", "Ingress", "shop", "web")
        .expect("get");
    edited["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] = json!("green");
    api.update(edited).expect("update");
    eventually("edited route serves green", || async {
        get(&c, p.http, "shop.test", "/").await == Ok((200, "green".to_string()))
    })
    .await;

    // Delete it: 404, and the other objects keep the process healthy.
    api.delete("networking.k8s.io/v1", "Ingress", "shop", "web")
        .expect("delete");
    eventually("deleted route is 404", || async {
        matches!(get(&c, p.http, "shop.test", "/").await, Ok((404, _)))
    })
    .await;
    assert_eq!(get(&c, p.admin, "a", "/readyz").await.map(|r| r.0), Ok(200));
}

/// `shop.test/` routed to a backend answering "web": its Service, EndpointSlice and Ingress
/// created in `api`. Keep the backend alive for the test.
async fn shop_served_by_web(api: &FakeApi) -> process::Backend {
    let web = backend("web").await;
    for obj in [
        service("shop", "web"),
        slice("shop", "web", web.addr),
        ingress("shop", "web", "shop.test", "/", "web"),
    ] {
        api.create(obj).expect("create");
    }
    web
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_api_is_unreachable_then_serves() {
    let api = FakeApi::start().await;
    api.refuse_connections();
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.write_kubeconfig(dir.path()).expect("kubeconfig");
    let _web = shop_served_by_web(&api).await;
    let args: Vec<OsString> = vec!["--kubeconfig".into(), kubeconfig.into()];
    let p = Portico::run(&args);
    let c = client();
    // Alive but not ready, and no snapshot: 503 on the proxy port.
    assert_eq!(
        get(&c, p.admin, "a", "/healthz").await.map(|r| r.0),
        Ok(200)
    );
    assert_eq!(get(&c, p.admin, "a", "/readyz").await.map(|r| r.0), Ok(503));
    assert_eq!(
        get(&c, p.http, "shop.test", "/").await.map(|r| r.0),
        Ok(503)
    );
    api.accept_connections();
    eventually("ready after the API comes back", || async {
        matches!(get(&c, p.admin, "a", "/readyz").await, Ok((200, _)))
    })
    .await;
    assert_eq!(
        get(&c, p.http, "shop.test", "/").await,
        Ok((200, "web".to_string()))
    );
}

/// Portico with a 1 s `--api-timeout` against an API that leaves the first Ingress LIST
/// hanging (`mode`): the list is abandoned at the deadline, retried, and portico becomes ready.
async fn a_stalled_list_is_abandoned_and_retried(mode: fake_api::StallMode) {
    let api = FakeApi::start().await;
    api.stall("list", "ingresses", mode, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let _web = shop_served_by_web(&api).await;
    let p = ready_portico_with(&api, dir.path(), &["--api-timeout", "1s"]).await;
    let c = client();
    assert!(
        api.count("list", "ingresses") >= 2,
        "the stalled list was retried"
    );
    // portico's output is read by another thread: wait for the line rather than race it.
    eventually("the watch error names the deadline", || async {
        p.log_contains("within 1s (--api-timeout)")
    })
    .await;
    assert_eq!(
        get(&c, p.http, "shop.test", "/").await,
        Ok((200, "web".to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_with_no_answer_is_abandoned_at_the_api_timeout() {
    a_stalled_list_is_abandoned_and_retried(fake_api::StallMode::Head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_whose_body_stops_is_abandoned_at_the_api_timeout() {
    a_stalled_list_is_abandoned_and_retried(fake_api::StallMode::Body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_not_cut_by_the_api_timeout() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let web = backend("web").await;
    for obj in [service("shop", "web"), slice("shop", "web", web.addr)] {
        api.create(obj).expect("create");
    }
    let p = ready_portico_with(&api, dir.path(), &["--api-timeout", "1s"]).await;
    let c = client();
    // Ready follows the lists; the watch requests go out right after them.
    eventually("the Ingress watch is open", || async {
        api.count("watch", "ingresses") == 1
    })
    .await;
    let watches = api.count("watch", "ingresses");
    // The property under test is a duration: the watch outlives the 1 s request deadline.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    api.create(ingress("shop", "web", "shop.test", "/", "web"))
        .expect("create");
    eventually("the new Ingress arrives over the same watch", || async {
        matches!(get(&c, p.http, "shop.test", "/").await, Ok((200, _)))
    })
    .await;
    assert_eq!(api.count("watch", "ingresses"), watches, "no re-watch");
    assert!(!p.log_contains("--api-timeout"), "no request timed out");
}

/// Start portico against `api` and wait until it is ready.
async fn ready_portico(api: &FakeApi, dir: &std::path::Path) -> Portico {
    ready_portico_with(api, dir, &[]).await
}

/// [`ready_portico`] with `extra` flags.
async fn ready_portico_with(api: &FakeApi, dir: &std::path::Path, extra: &[&str]) -> Portico {
    let kubeconfig = api.write_kubeconfig(dir).expect("kubeconfig");
    let mut args: Vec<OsString> = vec!["--kubeconfig".into(), kubeconfig.into()];
    args.extend(extra.iter().map(OsString::from));
    let p = Portico::run(&args);
    let c = client();
    eventually("ready", || async {
        matches!(get(&c, p.admin, "a", "/readyz").await, Ok((200, _)))
    })
    .await;
    p
}

fn slice_of(ns: &str, service: &str, name: &str, addrs: &[SocketAddr]) -> Value {
    let port = addrs.first().map(|a| a.port()).unwrap_or(1);
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a.ip().to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port}],
        "endpoints": endpoints
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_scaled_and_replaced_under_load_drop_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    // Endpoints share one port per slice (a slice has one port list), on distinct loopback IPs
    // is not portable, so each slice holds one endpoint and scaling adds slices.
    let backends = [backend("1").await, backend("2").await, backend("3").await];
    let api = FakeApi::start().await;
    api.create(service("live", "app")).expect("svc");
    api.create(slice_of("live", "app", "app-a", &[backends[0].addr]))
        .expect("slice");
    api.create(ingress("live", "app", "live.test", "/", "app"))
        .expect("ingress");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = ready_portico(&api, dir.path()).await;
    let c = client();

    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let served = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (c, f, served, stop, http) = (
            c.clone(),
            failures.clone(),
            served.clone(),
            stop.clone(),
            p.http,
        );
        workers.push(tokio::spawn(async move {
            for sent in 0..5_000 {
                if sent >= 300 && stop.load(Ordering::Relaxed) {
                    break;
                }
                match get(&c, http, "live.test", "/").await {
                    Ok((200, _)) => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    other => f.lock().expect("lock").push(format!("{other:?}")),
                }
            }
        }));
    }
    let hits = |i: usize| backends[i].hits.load(Ordering::Relaxed);
    let wait_traffic = |i: usize, what: &'static str| {
        let before = hits(i);
        async move {
            eventually(what, || async { hits(i) > before + 10 }).await;
        }
    };
    // Scale up: a second slice with endpoint 2.
    api.create(slice_of("live", "app", "app-b", &[backends[1].addr]))
        .expect("scale up");
    wait_traffic(1, "scaled-up endpoint gets traffic").await;
    // Replace: endpoint 3 in a new slice, then the old slices go away.
    api.create(slice_of("live", "app", "app-c", &[backends[2].addr]))
        .expect("replacement");
    wait_traffic(2, "replacement endpoint gets traffic").await;
    api.delete("discovery.k8s.io/v1", "EndpointSlice", "live", "app-a")
        .expect("delete a");
    api.delete("discovery.k8s.io/v1", "EndpointSlice", "live", "app-b")
        .expect("delete b");
    let (h0, h1) = (hits(0), hits(1));
    wait_traffic(2, "only the replacement serves").await;
    wait_traffic(2, "only the replacement serves, still").await;
    // After the deletes reached the snapshot, the old endpoints see (almost) nothing new: at
    // most the requests already in flight when the snapshot swapped.
    let late = (hits(0) - h0) + (hits(1) - h1);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let f = failures.lock().expect("lock");
    assert!(
        f.is_empty(),
        "{} failed requests, first: {:?}",
        f.len(),
        f.first()
    );
    assert!(served.load(Ordering::Relaxed) >= 900);
    assert!(late < 1_000, "old endpoints kept receiving traffic: {late}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_secret_rotated_in_the_api_reaches_new_handshakes() {
    let api = FakeApi::start().await;
    let web = backend("web").await;
    let (c1, k1, d1) = process::cert_for("secure.test");
    let (c2, k2, d2) = process::cert_for("secure.test");
    let secret = |cert: &str, key: &str| tls_secret_json("shop", "secure-tls", cert, key);
    let mut ing = ingress("shop", "secure", "secure.test", "/", "web");
    ing["spec"]["tls"] = json!([{"hosts": ["secure.test"], "secretName": "secure-tls"}]);
    for obj in [
        service("shop", "web"),
        slice("shop", "web", web.addr),
        ing,
        secret(&c1, &k1),
    ] {
        api.create(obj).expect("create");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let p = ready_portico(&api, dir.path()).await;
    let roots = [d1.clone(), d2.clone()];
    eventually("first certificate", || async {
        serves_certificate(p.https, "secure.test", &roots, &d1).await
    })
    .await;
    rotate_secret(&api, "shop", "secure-tls", &secret(&c2, &k2));
    eventually("rotated certificate", || async {
        serves_certificate(p.https, "secure.test", &roots, &d2).await
    })
    .await;
}

/// `--default-certificate` in a namespace portico does not watch: a watcher on that one Secret
/// brings it in, so handshakes without a matching certificate get it rather than the
/// generated fallback, from the first snapshot on, and its rotation reaches new handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_certificate_outside_the_watched_namespaces_is_served() {
    let api = FakeApi::start().await;
    let _web = shop_served_by_web(&api).await;
    let (c1, k1, d1) = process::cert_for("default.test");
    let (c2, k2, d2) = process::cert_for("default.test");
    let secret = |cert: &str, key: &str| tls_secret_json("certs", "wildcard", cert, key);
    api.create(secret(&c1, &k1)).expect("create secret");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = ready_portico_with(
        &api,
        dir.path(),
        &[
            "--watch-namespace",
            "shop",
            "--default-certificate",
            "certs/wildcard",
        ],
    )
    .await;
    let roots = [d1.clone(), d2.clone()];
    // Ready means the first snapshot: it already serves the configured default certificate.
    assert!(serves_certificate(p.https, "default.test", &roots, &d1).await);
    rotate_secret(&api, "certs", "wildcard", &secret(&c2, &k2));
    eventually("rotated default certificate", || async {
        serves_certificate(p.https, "default.test", &roots, &d2).await
    })
    .await;
}

/// Without RBAC for a `--default-certificate` outside the watched namespaces, portico still
/// becomes ready (serving the generated fallback, with the diagnostic), and picks the
/// certificate up once a grant lets its watcher list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_certificate_without_rbac_does_not_keep_portico_unready() {
    let api = FakeApi::start().await;
    let _web = shop_served_by_web(&api).await;
    let (cert, key, der) = process::cert_for("default.test");
    api.create(tls_secret_json("certs", "wildcard", &cert, &key))
        .expect("create secret");
    api.forbid("list", "secrets", "certs");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = ready_portico_with(
        &api,
        dir.path(),
        &[
            "--watch-namespace",
            "shop",
            "--default-certificate",
            "certs/wildcard",
        ],
    )
    .await;
    let roots = [der.clone()];
    assert_eq!(
        process::handshake(p.https, "default.test", &roots).await,
        None,
        "the generated fallback serves (not trusted by these roots)"
    );
    api.allow("list", "secrets", "certs");
    eventually("the default certificate once the grant exists", || async {
        serves_certificate(p.https, "default.test", &roots, &der).await
    })
    .await;
}

/// A `kubernetes.io/tls` Secret as the API holds it.
fn tls_secret_json(ns: &str, name: &str, cert: &str, key: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns},
        "data": {"tls.crt": base64(cert.as_bytes()), "tls.key": base64(key.as_bytes())}
    })
}

/// Replace the data of Secret `ns`/`name` with `with`'s, as a certificate rotation does.
fn rotate_secret(api: &FakeApi, ns: &str, name: &str, with: &Value) {
    let mut s = api.get("v1", "Secret", ns, name).expect("get");
    s["data"] = with["data"].clone();
    api.update(s).expect("rotate");
}

/// Whether a handshake with `sni`, trusting `roots`, gets the certificate `want` (DER).
async fn serves_certificate(addr: SocketAddr, sni: &str, roots: &[Vec<u8>], want: &[u8]) -> bool {
    process::handshake(addr, sni, roots)
        .await
        .map(|h| h.1)
        .as_deref()
        == Some(want)
}

/// Base64 as the API encodes Secret data: through k8s-openapi's `ByteString`.
fn base64(bytes: &[u8]) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_faults_keep_serving_and_converge() {
    let api = FakeApi::start().await;
    let blue = backend("blue").await;
    let green = backend("green").await;
    for obj in [
        service("shop", "blue"),
        slice("shop", "blue", blue.addr),
        service("shop", "green"),
        slice("shop", "green", green.addr),
        ingress("shop", "web", "shop.test", "/", "blue"),
    ] {
        api.create(obj).expect("create");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let p = ready_portico(&api, dir.path()).await;
    let c = client();
    let switch_to = |name: &str| {
        let mut ing = api
            .get("networking.k8s.io/v1", "Ingress", "shop", "web")
            .expect("get");
        ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] = json!(name);
        api.update(ing).expect("update");
    };
    let serves = |name: &'static str| {
        let c = c.clone();
        let http = p.http;
        async move { get(&c, http, "shop.test", "/").await == Ok((200, name.to_string())) }
    };
    assert!(serves("blue").await);

    // 1. Watches dropped, and a change made while they are down.
    api.atomically(|s| s.drop_watches());
    switch_to("green");
    eventually("converges after dropped watches", || serves("green")).await;

    // 2. History compacted under the watchers (in-stream 410 → relist).
    api.atomically(|s| {
        s.drop_watches();
        s.compact();
    });
    switch_to("blue");
    eventually("converges after 410 relist", || serves("blue")).await;

    // 3. API down for 10 s: the last snapshot keeps serving the whole time; a change made
    //    during the outage arrives after it.
    api.refuse_connections_for(std::time::Duration::from_secs(10));
    switch_to("green");
    let outage_end = std::time::Instant::now() + std::time::Duration::from_secs(9);
    let mut samples = 0;
    while std::time::Instant::now() < outage_end {
        assert!(
            serves("blue").await,
            "the last good snapshot stopped serving"
        );
        assert_eq!(get(&c, p.admin, "a", "/readyz").await.map(|r| r.0), Ok(200));
        samples += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(samples > 10);
    eventually("converges after the outage", || serves("green")).await;
}

fn rate_limit_policy(ns: &str, name: &str, target: &str) -> Value {
    json!({
        "apiVersion": "portico.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "targetRef": {"kind": "Ingress", "name": target},
            "limit": {"requests": 100, "period": "1m"}
        }
    })
}

fn lease_holder(api: &FakeApi) -> Option<String> {
    api.get(
        "coordination.k8s.io/v1",
        "Lease",
        "default",
        "portico-leader",
    )
    .ok()
    .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    .filter(|h| !h.is_empty())
}

fn status_ip(api: &FakeApi, name: &str) -> Option<String> {
    api.get("networking.k8s.io/v1", "Ingress", "shop", name)
        .ok()
        .and_then(|i| {
            i["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .map(str::to_string)
        })
}

/// Events about Ingress shop/`name` with `reason`, found as `kubectl describe ingress` finds
/// them: by the live object's uid as well as its name.
fn events_for(api: &FakeApi, name: &str, reason: &str) -> usize {
    let uid = api
        .get("networking.k8s.io/v1", "Ingress", "shop", name)
        .map(|i| i["metadata"]["uid"].clone())
        .expect("the Ingress exists");
    assert!(uid.as_str().is_some_and(|u| !u.is_empty()), "{uid}");
    api.list("events.k8s.io/v1", "Event")
        .iter()
        .filter(|e| {
            e["regarding"]["name"] == name && e["regarding"]["uid"] == uid && e["reason"] == reason
        })
        .count()
}

fn condition(api: &FakeApi, name: &str) -> Option<(String, String, i64)> {
    let p = api
        .get("portico.dev/v1alpha1", "RateLimitPolicy", "shop", name)
        .ok()?;
    let c = p["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["observedGeneration"].as_i64()?,
    ))
}

/// `--publish-service` in a namespace portico does not watch: its own watcher feeds the
/// status writer, so the address follows the Service (pending load balancer: nothing; then its
/// address) without a single GET of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_service_outside_the_watched_namespace_is_watched_not_fetched() {
    let api = FakeApi::start().await;
    let _web = shop_served_by_web(&api).await;
    api.create(rate_limit_policy("shop", "good", "web"))
        .expect("create policy");
    api.create(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "edge", "namespace": "ingress"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
    }))
    .expect("create service");
    let dir = tempfile::tempdir().expect("tempdir");
    let _p = ready_portico_with(
        &api,
        dir.path(),
        &[
            "--watch-namespace",
            "shop",
            "--publish-service",
            "ingress/edge",
            "--lease-namespace",
            "default",
        ],
    )
    .await;
    // The policy condition is written by the same status sync, after the Ingress part: once
    // it is there, the Ingress part has run with the load balancer still pending.
    eventually("a status sync", || async {
        condition(&api, "good").is_some()
    })
    .await;
    assert_eq!(status_ip(&api, "web"), None, "the cluster IP was published");
    let mut svc = api
        .get("v1", "Service", "ingress", "edge")
        .expect("service");
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}});
    api.update_status(svc).expect("service status");
    eventually("the load balancer's address in Ingress status", || async {
        status_ip(&api, "web").as_deref() == Some("203.0.113.7")
    })
    .await;
    assert_eq!(
        api.count("get", "services"),
        0,
        "the publish Service was fetched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_writes_status_and_events_then_hands_over() {
    let api = FakeApi::start().await;
    let web = backend("web").await;
    for obj in [
        service("shop", "web"),
        slice("shop", "web", web.addr),
        ingress("shop", "web", "shop.test", "/", "web"),
        // A bad Ingress: its Service does not exist.
        ingress("shop", "bad", "bad.test", "/", "missing"),
        rate_limit_policy("shop", "good", "web"),
        rate_limit_policy("shop", "orphan", "nope"),
    ] {
        api.create(obj).expect("create");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.write_kubeconfig(dir.path()).expect("kubeconfig");
    let replica = |addr: &str| -> Vec<OsString> {
        [
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8 path"),
            "--publish-status-address",
            addr,
            "--lease-namespace",
            "default",
            "--lease-duration",
            "2s",
            "--renew-deadline",
            "1500ms",
            "--retry-period",
            "200ms",
        ]
        .iter()
        .map(Into::into)
        .collect()
    };
    let mut a = Portico::run(&replica("10.0.0.1"));
    let mut b = Portico::run(&replica("10.0.0.2"));
    let c = client();
    eventually("a leader", || async { lease_holder(&api).is_some() }).await;
    let holder = lease_holder(&api).expect("holder");
    let (leader_ip, other_ip) = if holder.ends_with(&format!("-{}", a.child.id())) {
        ("10.0.0.1", "10.0.0.2")
    } else {
        assert!(holder.ends_with(&format!("-{}", b.child.id())), "{holder}");
        ("10.0.0.2", "10.0.0.1")
    };
    eventually("leader wrote Ingress status", || async {
        status_ip(&api, "web").as_deref() == Some(leader_ip)
    })
    .await;
    eventually("policy conditions written", || async {
        condition(&api, "good").is_some() && condition(&api, "orphan").is_some()
    })
    .await;
    assert_eq!(
        condition(&api, "good"),
        Some(("True".into(), "Accepted".into(), 1))
    );
    assert_eq!(
        condition(&api, "orphan"),
        Some(("False".into(), "TargetNotFound".into(), 1))
    );
    eventually("an Event on the bad Ingress", || async {
        events_for(&api, "bad", "ServiceNotFound") == 1
    })
    .await;
    // Both replicas serve traffic; the bad Ingress never affects the good route.
    for p in [&a, &b] {
        eventually("replica ready", || async {
            matches!(get(&c, p.admin, "a", "/readyz").await, Ok((200, _)))
        })
        .await;
        assert_eq!(
            get(&c, p.http, "shop.test", "/").await,
            Ok((200, "web".to_string()))
        );
        assert_eq!(get(&c, p.http, "bad.test", "/").await.map(|r| r.0), Ok(503));
    }

    // Repeated rebuilds (unrelated edits) write no new status and no new Event.
    let patches = api.count("patch", "ingresses/status");
    for i in 0..5 {
        let mut s = api.get("v1", "Service", "shop", "web").expect("svc");
        s["metadata"]["labels"] = json!({"rev": i.to_string()});
        api.update(s).expect("touch");
    }
    // Give the (debounced) rebuilds a chance to happen: wait for both replicas' snapshots to
    // have been rebuilt by observing one more Ingress appear and serve.
    api.create(ingress("shop", "probe", "probe.test", "/", "web"))
        .expect("probe");
    eventually("probe route on both replicas", || async {
        get(&c, a.http, "probe.test", "/").await == Ok((200, "web".to_string()))
            && get(&c, b.http, "probe.test", "/").await == Ok((200, "web".to_string()))
    })
    .await;
    eventually("probe Ingress got status", || async {
        status_ip(&api, "probe").as_deref() == Some(leader_ip)
    })
    .await;
    assert_eq!(events_for(&api, "bad", "ServiceNotFound"), 1, "event storm");
    assert_eq!(status_ip(&api, "web").as_deref(), Some(leader_ip));
    // Only the probe Ingress's status was new.
    assert!(
        api.count("patch", "ingresses/status") <= patches + 1,
        "status rewritten without a change"
    );

    // Kill the leader without a chance to release: the other takes over after the lease.
    let (leader, survivor) = if leader_ip == "10.0.0.1" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    leader.child.kill().expect("kill leader");
    let _ = leader.child.wait();
    eventually("the other replica took over and wrote status", || async {
        status_ip(&api, "web").as_deref() == Some(other_ip)
    })
    .await;
    let holder = lease_holder(&api).expect("holder");
    assert!(holder.ends_with(&format!("-{}", survivor.child.id())));

    // Graceful shutdown releases the Lease at once.
    assert_eq!(terminate(survivor).await, Some(0));
    assert_eq!(lease_holder(&api), None, "lease not released");
}

/// After the drain, shutdown waits a bounded time for the Lease release: an API server that
/// stops answering (here: every Lease update hangs) does not hold the exit past
/// `terminationGracePeriodSeconds`, where the kubelet would SIGKILL it. Exit is still 0.
#[tokio::test]
async fn shutdown_is_bounded_when_the_lease_release_hangs() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = ready_portico_with(
        &api,
        dir.path(),
        &["--lease-namespace", "default", "--retry-period", "200ms"],
    )
    .await;
    eventually("a leader", || async { lease_holder(&api).is_some() }).await;
    api.stall("update", "leases", fake_api::StallMode::Head, 1_000);
    // Without the bound the release would wait for --api-timeout (60 s), past the deadline.
    assert_eq!(terminate(&mut p).await, Some(0));
    assert!(
        p.log_contains("exiting anyway"),
        "the bound was what ended it"
    );
}

/// SIGTERM `p` and wait (up to [`process::DEADLINE`]) for it to exit; its exit code.
async fn terminate(p: &mut Portico) -> Option<i32> {
    let pid = p.child.id().to_string();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    let deadline = std::time::Instant::now() + process::DEADLINE;
    loop {
        if let Some(s) = p.child.try_wait().expect("try_wait") {
            return s.code();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
