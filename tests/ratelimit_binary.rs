//! RateLimitPolicy end to end through the real `portico` binary and the file provider: a
//! policy in the manifests directory limits its Ingress, and the bucket state survives an
//! EndpointSlice change plus an unrelated edit applied live; `portico check` rejects an
//! invalid policy. Everything on 127.0.0.1, ports read back from the `listening` log line.

#[path = "support/process.rs"]
mod process;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

use process::{BIN, Portico, backend, client, eventually};

fn service_yaml(name: &str, endpoint: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: shop\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n",
        port = endpoint.port(),
        ip = endpoint.ip()
    )
}

fn ingress_yaml(name: &str, host: &str, service: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  ingressClassName: portico\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - path: /\n        pathType: Prefix\n        backend: {{service: {{name: {service}, port: {{name: http}}}}}}\n"
    )
}

const POLICY: &str = "apiVersion: portico.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: per-client, namespace: shop}\nspec:\n  targetRef: {kind: Ingress, name: shop}\n  limit: {requests: 3, period: 1h}\n  key: {type: ClientIP}\n";

fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write tmp");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// GET with headers back: (status, `ratelimit`, `retry-after`, body).
async fn get(
    c: &process::HttpClient,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> (u16, String, String, String) {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = c.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (ratelimit, retry) = (h("ratelimit"), h("retry-after"));
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        ratelimit,
        retry,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_survive_endpoint_churn_and_unrelated_edits_in_the_binary() {
    let one = backend("one").await;
    let two = backend("two").await;
    let other = backend("other").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_atomic(d, "web.yaml", &service_yaml("web", one.addr));
    write_atomic(d, "shop.yaml", &ingress_yaml("shop", "shop.test", "web"));
    write_atomic(d, "policy.yaml", POLICY);
    let p = Portico::start(d, &[]);
    let c = client();
    // Wait on /readyz (not on the limited route, which would spend tokens).
    let admin = p.admin;
    eventually("first snapshot serving", || {
        let c = c.clone();
        async move {
            process::get(&c, admin, "admin", "/readyz")
                .await
                .is_ok_and(|(s, _)| s == 200)
        }
    })
    .await;

    for left in [2, 1] {
        let (status, ratelimit, _, body) = get(&c, p.http, "shop.test", "/").await;
        assert_eq!((status, body.as_str()), (200, "one"));
        assert!(
            ratelimit.starts_with(&format!("\"per-client\";r={left};")),
            "{ratelimit}"
        );
    }

    // The Service's pod moves (new EndpointSlice) and, in the same file, an unrelated Ingress
    // appears: once `other.test` answers, both are live.
    write_atomic(
        d,
        "web.yaml",
        &format!(
            "{}---\n{}---\n{}",
            service_yaml("web", two.addr),
            service_yaml("other", other.addr),
            ingress_yaml("other", "other.test", "other")
        ),
    );
    let http = p.http;
    eventually("unrelated Ingress served", || {
        let c = c.clone();
        async move {
            process::get(&c, http, "other.test", "/")
                .await
                .is_ok_and(|(s, b)| s == 200 && b == "other")
        }
    })
    .await;

    // Same bucket: the third of three tokens, now served by the new endpoint.
    let (status, ratelimit, _, body) = get(&c, p.http, "shop.test", "/").await;
    assert_eq!((status, body.as_str()), (200, "two"));
    assert!(ratelimit.starts_with("\"per-client\";r=0;"), "{ratelimit}");
    let (status, _, retry, _) = get(&c, p.http, "shop.test", "/").await;
    assert_eq!(status, 429);
    assert_eq!(retry, "1200");

    let (_, metrics) = process::get(&c, p.admin, "admin", "/metrics")
        .await
        .expect("metrics");
    assert!(
        metrics.contains(
            "portico_ratelimit_rejected_total{ingress=\"shop\",namespace=\"shop\",policy=\"per-client\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("portico_ratelimit_tracked_keys 1"),
        "{metrics}"
    );
}

#[test]
fn check_rejects_an_invalid_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_atomic(
        d,
        "web.yaml",
        &service_yaml("web", SocketAddr::from(([127, 0, 0, 1], 9))),
    );
    write_atomic(d, "shop.yaml", &ingress_yaml("shop", "shop.test", "web"));
    write_atomic(
        d,
        "policy.yaml",
        &POLICY.replace("kind: Ingress", "kind: Service"),
    );
    let out = Command::new(BIN)
        .arg("check")
        .arg(d)
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("RateLimitPolicy shop/per-client: InvalidTargetKind"),
        "{text}"
    );
}
