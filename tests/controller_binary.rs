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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_api_is_unreachable_then_serves() {
    let api = FakeApi::start().await;
    api.refuse_connections();
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.write_kubeconfig(dir.path()).expect("kubeconfig");
    let web = backend("web").await;
    for obj in [
        service("shop", "web"),
        slice("shop", "web", web.addr),
        ingress("shop", "web", "shop.test", "/", "web"),
    ] {
        api.create(obj).expect("create");
    }
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
