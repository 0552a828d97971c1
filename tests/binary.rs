//! End-to-end tests of the real `portico` binary on a manifests directory: `check`, bad objects
//! next to good ones, live updates under load, and the SIGTERM drain sequence. Everything on
//! 127.0.0.1, ports chosen by the OS and read back from the binary's `listening` log line.

#[path = "support/process.rs"]
mod process;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

use process::{
    AcceptAny, BIN, Backend, DEADLINE, HttpClient, Portico, backend, cert_for, client, eventually,
    get, handshake, tls_secret_yaml,
};

fn service_yaml(ns: &str, name: &str, endpoints: &[SocketAddr]) -> String {
    let port = endpoints.first().map(|a| a.port()).unwrap_or(1);
    let mut eps = String::new();
    for e in endpoints {
        eps.push_str(&format!(
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n",
            e.ip()
        ));
    }
    // All endpoints of one slice share the port; tests give one slice per port.
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{port}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n{eps}"
    )
}

fn ingress_yaml(ns: &str, name: &str, host: &str, path: &str, service: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ingressClassName: portico\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - path: {path}\n        pathType: Prefix\n        backend: {{service: {{name: {service}, port: {{name: http}}}}}}\n"
    )
}

/// `file` in `dir`: a Service (`service_yaml` arguments) and an Ingress routing to it
/// (`ingress_yaml` arguments).
fn write_route(
    dir: &Path,
    file: &str,
    service: (&str, &str, &[SocketAddr]),
    ingress: (&str, &str, &str, &str, &str),
) {
    let (ns, name, endpoints) = service;
    let (ins, iname, host, path, svc) = ingress;
    std::fs::write(
        dir.join(file),
        format!(
            "{}---\n{}",
            service_yaml(ns, name, endpoints),
            ingress_yaml(ins, iname, host, path, svc)
        ),
    )
    .expect("write");
}

/// Write atomically (temp file + rename), as editors and ConfigMap updates do.
fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write tmp");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

const GARBAGE_SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: broken-tls, namespace: shop}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: \"-----BEGIN CERTIFICATE-----\\nnot base64 at all\\n-----END CERTIFICATE-----\\n\"\n  tls.key: garbage\n";

fn bad_objects(dir: &Path) {
    std::fs::write(
        dir.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("orphan.yaml"),
        ingress_yaml("shop", "orphan", "orphan.test", "/", "missing"),
    )
    .expect("write");
    let tls_ingress = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: tls-broken, namespace: shop}\nspec:\n  ingressClassName: portico\n  tls: [{hosts: [secure.test], secretName: broken-tls}]\n  rules:\n  - host: secure.test\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}\n";
    std::fs::write(
        dir.join("tls.yaml"),
        format!("{GARBAGE_SECRET}---\n{tls_ingress}"),
    )
    .expect("write");
}

/// `portico check DIR`: its exit code and what it printed.
fn check(dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("check")
        .arg(dir)
        .output()
        .expect("run check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn quickstart_example_checks_clean() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart");
    let (code, text) = check(Path::new(dir));
    assert_eq!(code, Some(0), "check failed:\n{text}");
}

#[test]
fn check_reports_every_problem_and_exits_nonzero() {
    let dir = tempfile::tempdir().expect("tempdir");
    bad_objects(dir.path());
    let (code, text) = check(dir.path());
    assert_eq!(code, Some(1), "check must fail:\n{text}");
    assert!(
        text.contains("broken.yaml"),
        "malformed file reported:\n{text}"
    );
    assert!(
        text.contains("Ingress shop/orphan"),
        "missing Service reported:\n{text}"
    );
    assert!(text.contains("ServiceNotFound"), "{text}");
    assert!(
        text.contains("shop/tls-broken"),
        "garbage PEM reported:\n{text}"
    );
}

/// `portico check` judges certificate dates by the clock it runs at: an expired certificate
/// is a warning on its Secret, naming the host it serves.
#[test]
fn check_warns_about_an_expired_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_route(
        dir.path(),
        "web.yaml",
        ("shop", "web", &[]),
        ("shop", "web", "shop.test", "/", "web"),
    );
    let mut params = rcgen::CertificateParams::new(vec!["old.test".to_string()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    let indent = |pem: String| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: old, namespace: shop}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(cert.pem()),
        indent(key.serialize_pem())
    );
    let ingress = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: old, namespace: shop}\nspec:\n  ingressClassName: portico\n  tls: [{hosts: [old.test], secretName: old}]\n  rules:\n  - host: old.test\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n";
    std::fs::write(
        dir.path().join("old.yaml"),
        format!("{secret}---\n{ingress}"),
    )
    .expect("write");
    let (code, text) = check(dir.path());
    assert!(
        text.contains("warning: Secret shop/old: CertificateExpired: tls.crt expired 2001-01-01T00:00:00Z: clients refuse it for old.test"),
        "{text}"
    );
    assert_eq!(code, Some(0), "a warning, not an error:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_never_break_other_routes() {
    let web = backend("web").await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_route(
        dir.path(),
        "web.yaml",
        ("shop", "web", &[web.addr]),
        ("shop", "web", "shop.test", "/", "web"),
    );
    bad_objects(dir.path());
    let p = Portico::start(dir.path(), &[]);
    let c = client();
    eventually("good route serves", || async {
        matches!(get(&c, p.http, "shop.test", "/").await, Ok((200, ref b)) if b == "web")
    })
    .await;
    // The TLS host with a garbage Secret still answers over plain HTTP (no redirect).
    assert_eq!(
        get(&c, p.http, "secure.test", "/").await.map(|r| r.0),
        Ok(200)
    );
    // The Ingress whose Service is missing answers 503, not the whole proxy.
    assert_eq!(
        get(&c, p.http, "orphan.test", "/").await.map(|r| r.0),
        Ok(503)
    );
    let (status, metrics) = get(&c, p.admin, "admin", "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics
            .contains("portico_config_diagnostics{kind=\"Ingress\",reason=\"ServiceNotFound\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portico_manifest_files_invalid 1"),
        "{metrics}"
    );
    assert_eq!(
        get(&c, p.admin, "admin", "/readyz").await.map(|r| r.0),
        Ok(200)
    );
    eventually("diagnostics logged", || async {
        p.log_contains("ServiceNotFound")
            && p.log_contains("broken.yaml")
            && p.log_contains("tls-broken")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_updates_under_load_drop_nothing() {
    // Two sets of endpoints; the EndpointSlice file flips between them while a bounded load
    // runs, and an unrelated Ingress is toggled at every flip. Each flip waits (bounded) until
    // the new set really receives traffic, so the test synchronises on behaviour, not time.
    let sets = [
        [backend("a").await, backend("a").await],
        [backend("b").await, backend("b").await],
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    let svc = |set: &[Backend; 2]| {
        // One slice per endpoint port: portico merges the slices of one Service.
        let s0 = service_yaml("live", "app", &[set[0].addr]);
        let s1 = service_yaml("live", "app", &[set[1].addr]);
        let slice1 = s1.split("---\n").nth(1).unwrap_or_default().to_string();
        format!("{s0}---\n{slice1}")
    };
    let hits =
        |set: &[Backend; 2]| -> usize { set.iter().map(|x| x.hits.load(Ordering::Relaxed)).sum() };
    write_atomic(&d, "app.yaml", &svc(&sets[0]));
    write_atomic(
        &d,
        "ingress.yaml",
        &ingress_yaml("live", "app", "live.test", "/", "app"),
    );
    let p = Portico::start(&d, &[]);
    let c = client();
    eventually("route serves", || async {
        matches!(get(&c, p.http, "live.test", "/").await, Ok((200, _)))
    })
    .await;

    const WORKERS: usize = 4;
    // Each worker sends at least MIN and keeps going while flips happen, up to MAX.
    const MIN_PER_WORKER: usize = 600;
    const MAX_PER_WORKER: usize = 5_000;
    const FLIPS: usize = 20;
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let served = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (c, f, http) = (c.clone(), failures.clone(), p.http);
        let (served, stop) = (served.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            for sent in 0..MAX_PER_WORKER {
                if sent >= MIN_PER_WORKER && stop.load(Ordering::Relaxed) {
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
    let mut flipped = 0;
    for i in 0..FLIPS {
        let next = &sets[(i + 1) % 2];
        let before = hits(next);
        write_atomic(&d, "app.yaml", &svc(next));
        let other = d.join("other.yaml");
        if other.exists() {
            std::fs::remove_file(&other).expect("remove other.yaml");
        } else {
            write_atomic(
                &d,
                "other.yaml",
                &ingress_yaml("live", "other", "other.test", "/", "app"),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while hits(next) <= before + 10 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            hits(next) > before + 10,
            "flip {i}: the new endpoints received no traffic"
        );
        flipped += 1;
    }
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
    assert_eq!(flipped, FLIPS);
    assert!(served.load(Ordering::Relaxed) >= WORKERS * MIN_PER_WORKER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_request_finish_then_exits_zero() {
    // A backend that holds its response until the test releases it.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gate = Arc::new(Notify::new());
    let (arrived_tx, mut arrived_rx) = mpsc::channel::<()>(1);
    {
        let gate = gate.clone();
        tokio::spawn(async move {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper::service::service_fn(move |_req| {
                let (gate, arrived) = (gate.clone(), arrived_tx.clone());
                async move {
                    let _ = arrived.send(()).await;
                    gate.notified().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"slow")),
                    ))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_route(
        dir.path(),
        "app.yaml",
        ("slow", "app", &[addr]),
        ("slow", "app", "slow.test", "/", "app"),
    );
    let mut p = Portico::start(
        dir.path(),
        &["--shutdown-delay", "200ms", "--shutdown-grace", "20s"],
    );
    let c = client();
    eventually("ready", || async {
        matches!(get(&c, p.admin, "a", "/readyz").await, Ok((200, _)))
    })
    .await;
    let in_flight = {
        let (c, http) = (c.clone(), p.http);
        tokio::spawn(async move { get(&c, http, "slow.test", "/").await })
    };
    arrived_rx
        .recv()
        .await
        .expect("request reached the backend");
    let pid = p.child.id().to_string();
    let st = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    // Readiness flips at once, while the request is still in flight.
    eventually("readyz 503 while draining", || async {
        matches!(get(&client(), p.admin, "a", "/readyz").await, Ok((503, _)))
    })
    .await;
    gate.notify_one();
    let res = in_flight.await.expect("join");
    assert_eq!(res, Ok((200, "slow".to_string())));
    assert_eq!(
        exit_code(&mut p).await,
        Some(0),
        "portico did not exit after SIGTERM"
    );
}

/// A host named only in `spec.tls`, served by a host-less rule: plain HTTP to it is redirected
/// (the catch-all route does not name it, but the host has a certificate), while other hosts
/// on the same rule are served over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_host_served_by_the_catch_all_rule_is_redirected() {
    let web = backend("web").await;
    let (cert, key, _) = cert_for("secure.test");
    let dir = tempfile::tempdir().expect("tempdir");
    let ingress = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: any, namespace: shop}\nspec:\n  ingressClassName: portico\n  tls: [{hosts: [secure.test], secretName: secure-tls}]\n  rules:\n  - http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}\n";
    std::fs::write(
        dir.path().join("app.yaml"),
        format!(
            "{}---\n{ingress}---\n{}",
            service_yaml("shop", "web", &[web.addr]),
            tls_secret_yaml("shop", "secure-tls", &cert, &key)
        ),
    )
    .expect("write");
    let p = Portico::start(dir.path(), &[]);
    let c = client();
    eventually("the catch-all rule serves", || async {
        matches!(get(&c, p.http, "plain.test", "/").await, Ok((200, ref b)) if b == "web")
    })
    .await;
    let req = http::Request::get(format!("http://{}/x?y=1", p.http))
        .header("host", "secure.test")
        .body(Empty::new())
        .expect("req");
    let resp = c.request(req).await.expect("response");
    assert_eq!(resp.status(), 308);
    assert_eq!(resp.headers()["location"], "https://secure.test/x?y=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_secret_file_rotation_reaches_new_handshakes_and_h2_is_served() {
    let web = backend("web").await;
    let (c1, k1, d1) = cert_for("secure.test");
    let (c2, k2, d2) = cert_for("secure.test");
    let dir = tempfile::tempdir().expect("tempdir");
    let ingress = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: secure, namespace: shop}\nspec:\n  ingressClassName: portico\n  tls: [{hosts: [secure.test], secretName: secure-tls}]\n  rules:\n  - host: secure.test\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}\n";
    std::fs::write(
        dir.path().join("app.yaml"),
        format!("{}---\n{ingress}", service_yaml("shop", "web", &[web.addr])),
    )
    .expect("write");
    write_atomic(
        dir.path(),
        "secret.yaml",
        &tls_secret_yaml("shop", "secure-tls", &c1, &k1),
    );
    let p = Portico::start(dir.path(), &[]);
    let roots = [d1.clone(), d2.clone()];
    eventually("first certificate served", || async {
        handshake(p.https, "secure.test", &roots).await.map(|h| h.1) == Some(d1.clone())
    })
    .await;

    // h2 over TLS through the binary, routed to the backend.
    let (alpn, _) = handshake(p.https, "secure.test", &roots)
        .await
        .expect("handshake");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let mut store = rustls::RootCertStore::empty();
    store
        .add(rustls_pki_types::CertificateDer::from(d1.clone()))
        .expect("root");
    let mut cc = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    cc.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(p.https)
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
        .connect(
            rustls_pki_types::ServerName::try_from("secure.test").expect("name"),
            tcp,
        )
        .await
        .expect("handshake");
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get("https://secure.test/")
                .body(Empty::new())
                .expect("req"),
        )
        .await
        .expect("response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"web");

    // Rotate the Secret file: new handshakes get the new certificate, no restart.
    write_atomic(
        dir.path(),
        "secret.yaml",
        &tls_secret_yaml("shop", "secure-tls", &c2, &k2),
    );
    eventually("rotated certificate served", || async {
        handshake(p.https, "secure.test", &roots).await.map(|h| h.1) == Some(d2.clone())
    })
    .await;
    // Unknown SNI gets the generated default, not the Secret's certificate.
    let tcp = tokio::net::TcpStream::connect(p.https)
        .await
        .expect("connect");
    let insecure = Arc::new(AcceptAny);
    let cc = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .dangerous()
    .with_custom_certificate_verifier(insecure)
    .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
        .connect(
            rustls_pki_types::ServerName::try_from("other.test").expect("name"),
            tcp,
        )
        .await
        .expect("handshake");
    let leaf = tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec();
    assert_ne!(leaf, d1);
    assert_ne!(leaf, d2);
}

/// The value of the unlabelled metric `name` in a Prometheus text exposition.
fn metric_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// portico serving `shop.test` with its stdout no longer read (a stuck log collector: the
/// pipe fills up), after more requests than the pipe (64 KiB, about 200 access-log lines) and
/// the writer's queue (16 384 lines) hold together, so some lines were dropped.
async fn portico_behind_a_stuck_stdout() -> (Backend, tempfile::TempDir, Portico, HttpClient) {
    let web = backend("web").await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_route(
        dir.path(),
        "web.yaml",
        ("shop", "web", &[web.addr]),
        ("shop", "web", "shop.test", "/", "web"),
    );
    let p = Portico::start(dir.path(), &[]);
    let c = client();
    eventually("route serves", || async {
        matches!(get(&c, p.http, "shop.test", "/").await, Ok((200, _)))
    })
    .await;

    p.stop_reading();
    const TASKS: usize = 8;
    const EACH: usize = 2_600;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (c, addr) = (c.clone(), p.http);
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let got = tokio::time::timeout(
                    DEADLINE,
                    get(&c, addr, "shop.test", &format!("/{t}/{i}")),
                )
                .await;
                assert!(
                    matches!(got, Ok(Ok((200, _)))),
                    "request {t}/{i} with stdout stuck: {got:?}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let (_, metrics) = get(&c, p.admin, "admin", "/metrics")
        .await
        .expect("metrics");
    let dropped = metric_value(&metrics, "portico_log_lines_dropped_total").expect("metric");
    assert!(dropped > 0.0, "{metrics}");
    (web, dir, p, c)
}

/// A log collector that stops reading portico's stdout never stops requests: lines queue for
/// the writer thread, those past its queue are dropped and counted, and logging resumes once
/// stdout drains. Every proxied request is either logged or counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_stdout_never_stops_requests() {
    let (web, _dir, p, c) = portico_behind_a_stuck_stdout().await;
    // The collector catches up: logging goes on. The writer's queue is still full for a
    // moment, so a request right now may have its line dropped too: request until a line of
    // these shows up.
    p.resume_reading();
    let mut n = 0;
    eventually("a line logged after the drain", || {
        n += 1;
        let path = format!("/after/{n}");
        let (c, p) = (&c, &p);
        async move {
            assert_eq!(
                get(c, p.http, "shop.test", &path).await.map(|r| r.0),
                Ok(200)
            );
            p.log_contains("\"/after/")
        }
    })
    .await;
    // Nothing lost silently: once the last lines are read, each proxied request was logged
    // or counted as dropped. (Proxied requests only: a 404 while the route was still loading
    // reached no backend, and was logged: stdout was read then.)
    let proxied = |l: &String| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v["target"] == "portico::access" && v["status"] == 200)
    };
    let hits = web.hits.load(Ordering::Relaxed);
    let seen = std::sync::Mutex::new((0, 0.0));
    eventually("logged + dropped = proxied requests", || {
        let (c, p) = (&c, &p);
        let seen = &seen;
        async move {
            let (_, metrics) = get(c, p.admin, "admin", "/metrics").await.expect("metrics");
            let dropped =
                metric_value(&metrics, "portico_log_lines_dropped_total").expect("metric");
            let logged = p
                .lines
                .lock()
                .expect("lock")
                .iter()
                .filter(|l| proxied(l))
                .count();
            *seen.lock().expect("lock") = (logged, dropped);
            logged + dropped as usize == hits
        }
    })
    .await;
    let seen = *seen.lock().expect("lock");
    assert!(seen.0 > 0 && seen.1 > 0.0, "{seen:?}");
}

/// A second SIGINT (or SIGTERM) during the shutdown sequence exits at once, with 130 as a
/// shell reports it, instead of sitting through the rest of the delay and grace (here a
/// minute of shutdown delay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_shutdown_exits_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Portico::start(dir.path(), &["--shutdown-delay", "60s"]);
    let c = client();
    eventually("ready", || async {
        matches!(get(&c, p.admin, "a", "/readyz").await, Ok((200, _)))
    })
    .await;
    let pid = p.child.id().to_string();
    let interrupt = || {
        let st = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill");
        assert!(st.success());
    };
    interrupt();
    // The first one is being handled: readiness is off, the delay runs.
    eventually("readyz 503 while draining", || async {
        matches!(get(&client(), p.admin, "a", "/readyz").await, Ok((503, _)))
    })
    .await;
    interrupt();
    assert_eq!(
        exit_code(&mut p).await,
        Some(130),
        "portico did not exit on the second signal"
    );
}

/// SIGTERM while stdout is still stuck: portico exits anyway (the flush of queued lines at
/// exit is bounded), and with 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stuck_stdout_still_exits() {
    let (_web, _dir, mut p, _c) = portico_behind_a_stuck_stdout().await;
    let pid = p.child.id().to_string();
    let st = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    assert_eq!(
        exit_code(&mut p).await,
        Some(0),
        "portico did not exit after SIGTERM with its stdout stuck"
    );
}

/// portico's exit code, once it exited within [`DEADLINE`]; `None` when it did not (or was
/// killed by a signal).
async fn exit_code(p: &mut Portico) -> Option<i32> {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if let Some(s) = p.child.try_wait().expect("try_wait") {
            return s.code();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Resident memory of a process, in KiB (Linux `/proc`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A backend whose every response is a body of `total` bytes in 16 KiB chunks, served as fast
/// as it is read; `sent` counts the bytes handed to its connection.
async fn streaming_backend(total: usize, sent: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let sent = sent.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let sent = sent.clone();
                    let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
                    let frames =
                        futures_util::stream::iter((0..total / chunk.len()).map(move |_| {
                            sent.fetch_add(chunk.len(), Ordering::Relaxed);
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                chunk.clone(),
                            ))
                        }));
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::StreamBody::new(frames),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An h2 client that opens its flow-control windows wide and then stops reading (a slow-read
/// attack) makes portico hold only a bounded amount of response data per stream: hyper's
/// default send buffer (400 KiB a stream, 40 MiB for 100 streams on one connection) is not
/// what an attacker with a few connections gets to pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_stops_reading_pins_bounded_memory() {
    const STREAMS: usize = 100;
    let sent = Arc::new(AtomicUsize::new(0));
    let up = streaming_backend(64 << 20, sent.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_route(
        dir.path(),
        "big.yaml",
        ("big", "big", &[up]),
        ("big", "big", "big.test", "/", "big"),
    );
    let p = Portico::start(dir.path(), &["--no-access-log"]);
    let c = client();
    // Ready: the first snapshot serves (before it, every request is a 503).
    eventually("ready", || async {
        matches!(get(&c, p.admin, "a", "/readyz").await, Ok((200, _)))
    })
    .await;
    // One whole response first, so the baseline has the buffers a response uses.
    assert_eq!(
        get(&c, p.http, "big.test", "/warm-up").await.map(|r| r.0),
        Ok(200)
    );
    let before = rss_kib(p.child.id());

    let tcp = tokio::net::TcpStream::connect(p.http)
        .await
        .expect("connect");
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    // The connection (all of the client's I/O) is driven until every response head arrived,
    // then held without being polled: nothing more is read from the socket.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let driver = tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            _ = &mut conn => return,
            _ = stop_rx => {}
        }
        let _ = release_rx.await;
    });
    let mut send = send.ready().await.expect("ready");
    let mut heads = Vec::new();
    for i in 0..STREAMS {
        let req = http::Request::get(format!("http://big.test/{i}"))
            .body(())
            .expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        heads.push(resp);
    }
    let mut bodies = Vec::new();
    for h in heads {
        let resp = tokio::time::timeout(DEADLINE, h)
            .await
            .expect("response head in time")
            .expect("response");
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }
    let _ = stop_tx.send(());
    // Wait until the pipeline is full: the backend stops being asked for more.
    let deadline = Instant::now() + DEADLINE;
    let mut last = sent.load(Ordering::Relaxed);
    let mut still = 0;
    while still < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sent.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    assert_eq!(still, 5, "the backend kept being read: {last} bytes");
    let after = rss_kib(p.child.id());
    // Measured (debug build): 67 MiB more with hyper's default, 24 MiB with 64 KiB a stream
    // (of which 6.4 MiB is the send buffers; the rest is the 100 upstream connections and
    // streams themselves).
    let grown = after.saturating_sub(before) / 1024;
    assert!(
        grown < 45,
        "portico's RSS grew by {grown} MiB for {STREAMS} streams that are not read \
         (backend sent {} MiB in all)",
        last >> 20
    );
    let _ = release_tx.send(());
    drop(bodies);
    let _ = driver.await;
}
