//! Tests of the fake Kubernetes API server (tests/support/fake_api) driven by the real kube
//! client: `kube::Client` from the generated kubeconfig, `kube::Api` with k8s-openapi types,
//! and `kube::runtime` watchers and reflectors. They pin the documented API behaviour
//! (https://kubernetes.io/docs/reference/using-api/api-concepts/) the controller relies on.

#[path = "support/fake_api/mod.rs"]
mod fake_api;

use fake_api::{FakeApi, Options, poll_until};
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(5);

fn svc(name: &str, labels: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"ports": [{"port": 80}]},
    }))
    .expect("service")
}

fn ingress(name: &str, host: &str) -> Ingress {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"rules": [{"host": host}]},
    }))
    .expect("ingress")
}

fn api_err(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API Status error, got {other:?}"),
    }
}

/// Next watch event, or a panic after the deadline.
async fn next<K>(
    s: &mut (impl Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
) -> WatchEvent<K> {
    tokio::time::timeout(DEADLINE, s.next())
        .await
        .expect("watch event before the deadline")
        .expect("stream still open")
        .expect("event decodes")
}

fn name_and_type<K: Resource>(ev: &WatchEvent<K>) -> (String, String) {
    match ev {
        WatchEvent::Added(o) => ("ADDED".into(), o.meta().name.clone().unwrap_or_default()),
        WatchEvent::Modified(o) => ("MODIFIED".into(), o.meta().name.clone().unwrap_or_default()),
        WatchEvent::Deleted(o) => ("DELETED".into(), o.meta().name.clone().unwrap_or_default()),
        WatchEvent::Bookmark(b) => ("BOOKMARK".into(), b.metadata.resource_version.clone()),
        WatchEvent::Error(e) => ("ERROR".into(), e.reason.clone()),
    }
}

/// Sends one request through the kube client's stack (auth, base URI) and returns the raw
/// status code and JSON body.
async fn raw(
    client: &kube::Client,
    method: &str,
    uri: &str,
    ctype: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut b = http::Request::builder().method(method).uri(uri);
    if let Some(c) = ctype {
        b = b.header("content-type", c);
    }
    let body = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(&body).expect("json")
    };
    let req = b.body(kube::client::Body::from(body)).expect("request");
    let resp = client.send(req).await.expect("send");
    let code = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Retries quickly so fault tests stay fast; the real controller uses kube's default backoff.
struct FastBackoff;

impl Iterator for FastBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }
}

impl Backoff for FastBackoff {
    fn reset(&mut self) {}
}

struct Reflector<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    task: tokio::task::JoinHandle<()>,
}

impl<K: Resource<DynamicType = ()> + 'static> Drop for Reflector<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn reflect<K>(api: Api<K>, cfg: watcher::Config) -> Reflector<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg)).backoff(FastBackoff);
    let task = tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(DEADLINE, store.wait_until_ready())
        .await
        .expect("reflector ready before the deadline")
        .expect("store ready");
    Reflector { store, task }
}

/// namespace/name → resourceVersion, of a reflector store and of the server.
fn store_view<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> BTreeMap<String, String> {
    store
        .state()
        .iter()
        .map(|o| {
            (
                format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()),
                o.resource_version().unwrap_or_default(),
            )
        })
        .collect()
}

fn server_view(fake: &FakeApi, api_version: &str, kind: &str) -> BTreeMap<String, String> {
    fake.list(api_version, kind)
        .iter()
        .map(|o| {
            let m = &o["metadata"];
            (
                format!(
                    "{}/{}",
                    m["namespace"].as_str().unwrap_or(""),
                    m["name"].as_str().unwrap_or("")
                ),
                m["resourceVersion"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn converges<K: Resource<DynamicType = ()> + Clone>(
    r: &Reflector<K>,
    fake: &FakeApi,
    av: &str,
    kind: &str,
) {
    let ok = poll_until(DEADLINE, || {
        store_view(&r.store) == server_view(fake, av, kind)
    })
    .await;
    assert!(
        ok,
        "store {:?} != server {:?}",
        store_view(&r.store),
        server_view(fake, av, kind)
    );
}

#[tokio::test]
async fn kubeconfig_file_and_bearer_token_are_required() {
    let fake = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fake.write_kubeconfig(dir.path()).expect("write kubeconfig");
    let kc = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    assert_eq!(cfg.default_namespace, "default");
    let client = kube::Client::try_from(cfg).expect("client");
    let api: Api<Service> = Api::default_namespaced(client);
    api.list(&ListParams::default())
        .await
        .expect("authorised list");

    // Without the token: 401 with a Status body.
    let mut s = tokio::net::TcpStream::connect(fake.addr())
        .await
        .expect("connect");
    s.write_all(b"GET /api/v1/services HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains("\"reason\":\"Unauthorized\""), "{out}");

    // Public info (/version, health) needs no credentials.
    let mut s = tokio::net::TcpStream::connect(fake.addr())
        .await
        .expect("connect");
    s.write_all(b"GET /version HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn list_pages_share_one_snapshot_resource_version() {
    let fake = FakeApi::start().await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    for i in 0..7 {
        api.create(&PostParams::default(), &svc(&format!("s{i}"), json!({})))
            .await
            .expect("create");
    }
    let lp = ListParams::default().limit(3);
    let p1 = api.list(&lp).await.expect("page 1");
    let list_rv = p1.metadata.resource_version.clone().expect("list rv");
    assert_eq!(
        list_rv,
        fake.resource_version().to_string(),
        "list RV is the server's RV"
    );
    assert_eq!(p1.items.len(), 3);
    assert_eq!(p1.metadata.remaining_item_count, Some(4));
    let tok = p1.metadata.continue_.clone().expect("continue token");

    // Writes between pages do not show up in later pages of the same list.
    api.create(&PostParams::default(), &svc("s3a", json!({})))
        .await
        .expect("create between pages");
    api.delete("s5", &DeleteParams::default())
        .await
        .expect("delete between pages");

    let p2 = api
        .list(&lp.clone().continue_token(&tok))
        .await
        .expect("page 2");
    assert_eq!(
        p2.metadata.resource_version.as_deref(),
        Some(list_rv.as_str())
    );
    let tok2 = p2.metadata.continue_.clone().expect("continue token 2");
    let p3 = api
        .list(&lp.clone().continue_token(&tok2))
        .await
        .expect("page 3");
    assert!(
        p3.metadata.continue_.as_deref().unwrap_or("").is_empty(),
        "last page has no token"
    );
    let names: Vec<String> = [p1.items, p2.items, p3.items]
        .concat()
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);

    // A fresh list sees the new state; its RV is the new global RV.
    let now = api.list(&ListParams::default()).await.expect("fresh list");
    let names: Vec<String> = now.items.iter().map(|s| s.name_any()).collect();
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s3a", "s4", "s6"]);
    assert_eq!(
        now.metadata.resource_version,
        Some(fake.resource_version().to_string())
    );

    // After compaction the old snapshot is gone: 410 Expired.
    let p1 = api.list(&lp).await.expect("page 1 again");
    // Compaction at the current revision keeps it readable (like etcd); compact past it.
    api.create(&PostParams::default(), &svc("late", json!({})))
        .await
        .expect("create");
    fake.compact();
    let tok = p1.metadata.continue_.expect("token");
    let err = api
        .list(&lp.continue_token(&tok))
        .await
        .expect_err("expired token");
    assert_eq!(api_err(err), (410, "Expired".into()));
}

#[tokio::test]
async fn list_rv_is_global_and_type_meta_follows_the_real_encoders() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    fake.create(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a", "namespace": "ns1"}}))
        .expect("secret");
    fake.create(json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": "portico"},
        "spec": {"controller": "portico.dev/ingress-controller"}}))
        .expect("class");
    fake.create(
        json!({"apiVersion": "portico.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "rl", "namespace": "ns1"}, "spec": {"maxInFlight": 5}}),
    )
    .expect("policy");
    let rv = fake.resource_version().to_string();

    // Cluster-wide list of a namespaced type; built-in list items carry no apiVersion/kind.
    let (code, list) = raw(&client, "GET", "/api/v1/secrets", None, Value::Null).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "SecretList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        rv.as_str(),
        "RV is global, not per type"
    );
    assert!(list["items"][0].get("kind").is_none());

    // Cluster-scoped type.
    let (code, list) = raw(
        &client,
        "GET",
        "/apis/networking.k8s.io/v1/ingressclasses",
        None,
        Value::Null,
    )
    .await;
    assert_eq!(
        (code, list["items"][0]["metadata"]["name"].as_str()),
        (200, Some("portico"))
    );
    assert!(list["items"][0]["metadata"].get("namespace").is_none());
    let (code, _) = raw(
        &client,
        "GET",
        "/apis/networking.k8s.io/v1/namespaces/ns1/ingressclasses",
        None,
        Value::Null,
    )
    .await;
    assert_eq!(code, 404, "cluster-scoped types have no namespaced URL");

    // Custom resources are unstructured: list items keep apiVersion/kind.
    let (code, list) = raw(
        &client,
        "GET",
        "/apis/portico.dev/v1alpha1/namespaces/ns1/ratelimitpolicies",
        None,
        Value::Null,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(list["items"][0]["kind"], "RateLimitPolicy");

    // A get carries apiVersion/kind and server-set metadata.
    let (code, obj) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/ns1/secrets/a",
        None,
        Value::Null,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        (obj["apiVersion"].as_str(), obj["kind"].as_str()),
        (Some("v1"), Some("Secret"))
    );
    assert!(
        obj["metadata"].get("generation").is_none(),
        "Secrets carry no generation"
    );
    let (_, class) = raw(
        &client,
        "GET",
        "/apis/networking.k8s.io/v1/ingressclasses/portico",
        None,
        Value::Null,
    )
    .await;
    assert_eq!(class["metadata"]["generation"], 1);
    assert!(
        obj["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36)
    );
    assert!(
        obj["metadata"]["creationTimestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    // resourceVersionMatch=Exact serves the past; unknown routes are 404 Status objects.
    let (code, list) = raw(
        &client,
        "GET",
        "/api/v1/secrets?resourceVersion=1&resourceVersionMatch=Exact",
        None,
        Value::Null,
    )
    .await;
    assert_eq!(
        (code, list["items"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (code, st) = raw(&client, "GET", "/apis/nope.io/v1/things", None, Value::Null).await;
    assert_eq!(
        (code, st["kind"].as_str(), st["reason"].as_str()),
        (404, Some("Status"), Some("NotFound"))
    );
}

#[tokio::test]
async fn watch_replays_after_a_resource_version_in_order_then_goes_live() {
    let fake = FakeApi::start().await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    api.create(&PostParams::default(), &svc("a", json!({})))
        .await
        .expect("a");
    api.create(&PostParams::default(), &svc("b", json!({})))
        .await
        .expect("b");
    let rv = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
    )
    .await
    .expect("patch a");
    api.create(&PostParams::default(), &svc("c", json!({})))
        .await
        .expect("c");
    api.delete("b", &DeleteParams::default())
        .await
        .expect("delete b");

    let mut w = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .expect("watch")
        .boxed();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(name_and_type(&next(&mut w).await));
    }
    let want = [("MODIFIED", "a"), ("ADDED", "c"), ("DELETED", "b")]
        .map(|(t, n)| (t.to_string(), n.to_string()));
    assert_eq!(got, want);

    api.create(&PostParams::default(), &svc("d", json!({})))
        .await
        .expect("d");
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("ADDED".into(), "d".into())
    );

    // resourceVersion "0": synthetic ADDED for the current state, then live.
    let mut w0 = api
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .expect("watch 0")
        .boxed();
    let mut names = Vec::new();
    for _ in 0..3 {
        match next(&mut w0).await {
            WatchEvent::Added(s) => names.push(s.name_any()),
            other => panic!("expected ADDED, got {other:?}"),
        }
    }
    assert_eq!(names, ["a", "c", "d"]);
}

#[tokio::test]
async fn bookmarks_periodic_and_on_request_and_timeout_ends_the_stream() {
    let fake = FakeApi::start_with(Options {
        bookmark_interval: Duration::from_millis(50),
        ..Options::default()
    })
    .await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    api.create(&PostParams::default(), &svc("a", json!({})))
        .await
        .expect("a");
    let rv = fake.resource_version().to_string();
    let mut w = api
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match next(&mut w).await {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, rv);
            assert_eq!(b.types.kind, "Service");
            assert_eq!(b.types.api_version, "v1");
        }
        other => panic!("expected a periodic BOOKMARK, got {other:?}"),
    }

    // With bookmarks disabled: the hook sends none, so the next event is the real one.
    // No periodic bookmarks here, so only the hook (and the timeout) can act.
    let slow = FakeApi::start_with(Options {
        bookmark_interval: Duration::from_secs(3600),
        ..Options::default()
    })
    .await;
    let api: Api<Service> = Api::namespaced(slow.client().await, "default");
    let rv = slow.resource_version().to_string();
    let mut quiet = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .expect("watch")
        .boxed();
    let mut loud = api
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    assert!(poll_until(DEADLINE, || slow.open_watches() == 2).await);
    slow.send_bookmarks();
    api.create(&PostParams::default(), &svc("b", json!({})))
        .await
        .expect("b");
    assert_eq!(
        name_and_type(&next(&mut loud).await),
        ("BOOKMARK".into(), rv.clone())
    );
    assert_eq!(
        name_and_type(&next(&mut loud).await),
        ("ADDED".into(), "b".into())
    );
    assert_eq!(
        name_and_type(&next(&mut quiet).await),
        ("ADDED".into(), "b".into())
    );

    // timeoutSeconds ends the stream cleanly.
    let mut short = api
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .expect("watch")
        .boxed();
    assert_eq!(
        name_and_type(&next(&mut short).await),
        ("ADDED".into(), "b".into())
    );
    let end = tokio::time::timeout(DEADLINE, short.next())
        .await
        .expect("stream ends by timeoutSeconds");
    assert!(end.is_none(), "stream ended, got {end:?}");
}

#[tokio::test]
async fn compaction_gives_an_in_stream_410_and_the_watcher_relists() {
    let fake = FakeApi::start().await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    api.create(&PostParams::default(), &svc("a", json!({})))
        .await
        .expect("a");
    let old_rv = fake.resource_version().to_string();
    api.create(&PostParams::default(), &svc("b", json!({})))
        .await
        .expect("b");
    fake.compact();

    // Raw watch from a compacted RV: HTTP 200, then one ERROR event with a 410 Status, then EOF.
    let mut w = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("watch opens with 200")
        .boxed();
    match next(&mut w).await {
        WatchEvent::Error(s) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    let end = tokio::time::timeout(DEADLINE, w.next())
        .await
        .expect("stream ends");
    assert!(end.is_none());

    // A running watcher whose resume RV gets compacted away relists by itself and converges.
    let r = reflect(api.clone(), watcher::Config::default()).await;
    assert!(poll_until(DEADLINE, || fake.open_watches() == 1).await);
    let lists_before = fake.count("list", "services");
    fake.atomically(|s| {
        s.drop_watches();
        let ty = s.find_type("", "v1", "services").expect("services");
        s.create(ty, "default", json!({"metadata": {"name": "c"}}))
            .expect("c");
        s.delete(ty, "default", "a", None, None).expect("delete a");
        s.compact();
    });
    converges(&r, &fake, "v1", "Service").await;
    assert!(
        fake.count("list", "services") > lists_before,
        "the watcher relisted"
    );
}

#[tokio::test]
async fn dropped_streams_are_resumed_without_a_relist_and_nothing_is_missed() {
    let fake = FakeApi::start().await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    api.create(&PostParams::default(), &svc("a", json!({})))
        .await
        .expect("a");
    let r = reflect(api.clone(), watcher::Config::default()).await;
    assert!(poll_until(DEADLINE, || fake.open_watches() == 1).await);
    fake.atomically(|s| {
        s.drop_watches();
        let ty = s.find_type("", "v1", "services").expect("services");
        s.create(ty, "default", json!({"metadata": {"name": "b"}}))
            .expect("b");
        s.merge_patch(
            ty,
            "default",
            "a",
            &json!({"metadata": {"labels": {"k": "v"}}}),
            false,
        )
        .expect("patch a");
    });
    converges(&r, &fake, "v1", "Service").await;
    assert_eq!(
        fake.count("list", "services"),
        1,
        "resumed from its RV, no relist"
    );
    assert!(fake.count("watch", "services") >= 2, "re-watched");
    let a = r
        .store
        .state()
        .into_iter()
        .find(|s| s.name_any() == "a")
        .expect("a in store");
    assert_eq!(a.labels().get("k").map(String::as_str), Some("v"));
}

#[tokio::test]
async fn refused_connections_for_a_while_then_the_watcher_recovers() {
    let fake = FakeApi::start().await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    api.create(&PostParams::default(), &svc("a", json!({})))
        .await
        .expect("a");
    let r = reflect(api.clone(), watcher::Config::default()).await;
    assert!(poll_until(DEADLINE, || fake.open_watches() == 1).await);

    fake.refuse_connections();
    // The watcher notices and keeps retrying against the closed door.
    assert!(poll_until(DEADLINE, || fake.refused_connections() >= 2).await);
    fake.create(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b", "namespace": "default"}}))
        .expect("b");
    fake.delete("v1", "Service", "default", "a")
        .expect("delete a");
    let err = api.get("b").await.expect_err("refused");
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "a transport error, not a Status: {err:?}"
    );
    fake.accept_connections();

    converges(&r, &fake, "v1", "Service").await;
    assert_eq!(
        api.get("b").await.expect("get after recovery").name_any(),
        "b"
    );
}

#[tokio::test]
async fn label_selectors_on_list_and_watch_with_stop_matching_as_deleted() {
    let fake = FakeApi::start().await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    for (n, l) in [
        ("web", json!({"app": "web", "tier": "front"})),
        ("api", json!({"app": "api", "tier": "back"})),
        ("db", json!({"app": "db"})),
    ] {
        api.create(&PostParams::default(), &svc(n, l))
            .await
            .expect("create");
    }
    let names = |l: kube::core::ObjectList<Service>| {
        l.items.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    };
    let cases = [
        ("app=web", vec!["web"]),
        ("app==api", vec!["api"]),
        ("app!=web", vec!["api", "db"]),
        ("app in (web,db)", vec!["db", "web"]),
        ("app notin (web,db)", vec!["api"]),
        ("tier", vec!["api", "web"]),
        ("!tier", vec!["db"]),
        ("tier,app!=api", vec!["web"]),
    ];
    for (sel, want) in cases {
        let got = names(
            api.list(&ListParams::default().labels(sel))
                .await
                .expect(sel),
        );
        assert_eq!(got, want, "selector {sel}");
    }
    let (code, st) = raw(
        &fake.client().await,
        "GET",
        "/api/v1/services?labelSelector=a%20in%20b",
        None,
        Value::Null,
    )
    .await;
    assert_eq!((code, st["reason"].as_str()), (400, Some("BadRequest")));

    let rv = fake.resource_version().to_string();
    let wp = WatchParams::default()
        .disable_bookmarks()
        .labels("tier=front");
    let mut w = api.watch(&wp, &rv).await.expect("watch").boxed();
    // web stops matching → DELETED; api starts matching → ADDED; db never matches → nothing.
    let relabel = |n: &str, tier: Value| {
        let api = api.clone();
        let n = n.to_string();
        async move {
            api.patch(
                &n,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"tier": tier}}})),
            )
            .await
            .expect("relabel")
        }
    };
    let web = relabel("web", json!("back")).await;
    relabel("db", json!("back")).await;
    relabel("api", json!("front")).await;
    match next(&mut w).await {
        WatchEvent::Deleted(s) => {
            assert_eq!(s.name_any(), "web");
            assert_eq!(
                s.labels().get("tier").map(String::as_str),
                Some("front"),
                "last matching state"
            );
            assert_eq!(
                s.resource_version(),
                web.resource_version(),
                "at the change's RV"
            );
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("ADDED".into(), "api".into())
    );
    relabel("api", json!("front2")).await;
    relabel("web", json!("front")).await;
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("DELETED".into(), "api".into())
    );
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("ADDED".into(), "web".into())
    );
}

#[tokio::test]
async fn field_selectors_on_list_and_watch() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    for (ns, n, ty) in [
        ("a", "tls1", "kubernetes.io/tls"),
        ("a", "op", "Opaque"),
        ("b", "tls2", "kubernetes.io/tls"),
    ] {
        fake.create(json!({"apiVersion": "v1", "kind": "Secret", "type": ty, "metadata": {"name": n, "namespace": ns}}))
            .expect("secret");
    }
    let all: Api<Secret> = Api::all(client.clone());
    let names = |l: kube::core::ObjectList<Secret>| {
        l.items.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    };
    let cases = [
        ("type=kubernetes.io/tls", vec!["tls1", "tls2"]),
        ("type!=kubernetes.io/tls", vec!["op"]),
        ("metadata.name==op", vec!["op"]),
        ("metadata.namespace=b", vec!["tls2"]),
        ("metadata.namespace=a,type==kubernetes.io/tls", vec!["tls1"]),
    ];
    for (sel, want) in cases {
        let got = names(
            all.list(&ListParams::default().fields(sel))
                .await
                .expect(sel),
        );
        assert_eq!(got, want, "selector {sel}");
    }
    let rv = fake.resource_version().to_string();
    let wp = WatchParams::default()
        .disable_bookmarks()
        .fields("type=kubernetes.io/tls");
    let mut w = all.watch(&wp, &rv).await.expect("watch").boxed();
    let ns_a: Api<Secret> = Api::namespaced(client, "a");
    let opaque: Secret =
        serde_json::from_value(json!({"metadata": {"name": "op2"}, "type": "Opaque"}))
            .expect("secret");
    let tls: Secret =
        serde_json::from_value(json!({"metadata": {"name": "tls3"}, "type": "kubernetes.io/tls"}))
            .expect("secret");
    ns_a.create(&PostParams::default(), &opaque)
        .await
        .expect("op2");
    ns_a.create(&PostParams::default(), &tls)
        .await
        .expect("tls3");
    ns_a.delete("op", &DeleteParams::default())
        .await
        .expect("delete op");
    ns_a.delete("tls1", &DeleteParams::default())
        .await
        .expect("delete tls1");
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("ADDED".into(), "tls3".into())
    );
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("DELETED".into(), "tls1".into())
    );
}

#[tokio::test]
async fn create_get_replace_and_delete_follow_the_conventions() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");

    let (code, created) = raw(&client, "POST", "/api/v1/namespaces/default/services", Some("application/json"),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"generateName": "web-"}, "spec": {"ports": [{"port": 80}]}})).await;
    assert_eq!(code, 201);
    let gen_name = created["metadata"]["name"]
        .as_str()
        .expect("generated name")
        .to_string();
    assert!(
        gen_name.starts_with("web-") && gen_name.len() == 9,
        "{gen_name}"
    );
    assert_eq!(created["metadata"]["namespace"], "default");

    let a = api
        .create(&PostParams::default(), &svc("a", json!({})))
        .await
        .expect("a");
    let err = api
        .create(&PostParams::default(), &svc("a", json!({})))
        .await
        .expect_err("duplicate");
    assert_eq!(api_err(err), (409, "AlreadyExists".into()));
    let err = api.get("missing").await.expect_err("missing");
    assert_eq!(api_err(err), (404, "NotFound".into()));
    let (code, st) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/default/services/missing",
        None,
        Value::Null,
    )
    .await;
    assert_eq!(code, 404);
    assert_eq!(st["message"], "services \"missing\" not found");
    assert_eq!(
        (st["status"].as_str(), st["details"]["name"].as_str()),
        (Some("Failure"), Some("missing"))
    );

    // Replace with the current RV succeeds; a stale RV is 409 Conflict; no RV is unconditional.
    let mut fresh = a.clone();
    fresh.labels_mut().insert("v".into(), "1".into());
    let v1 = api
        .replace("a", &PostParams::default(), &fresh)
        .await
        .expect("replace");
    assert_ne!(v1.resource_version(), a.resource_version());
    let mut stale = a.clone();
    stale.labels_mut().insert("v".into(), "stale".into());
    let err = api
        .replace("a", &PostParams::default(), &stale)
        .await
        .expect_err("stale");
    assert_eq!(api_err(err), (409, "Conflict".into()));
    stale.metadata.resource_version = None;
    let v2 = api
        .replace("a", &PostParams::default(), &stale)
        .await
        .expect("unconditional");
    assert_eq!(v2.labels().get("v").map(String::as_str), Some("stale"));
    assert_eq!(v2.uid(), a.uid(), "server-owned metadata is kept");
    assert_eq!(v2.creation_timestamp(), a.creation_timestamp());
    let err = api
        .replace(
            "missing",
            &PostParams::default(),
            &svc("missing", json!({})),
        )
        .await
        .expect_err("replace missing");
    assert_eq!(api_err(err), (404, "NotFound".into()));

    // Merge patch: keys merge, null deletes.
    let p = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"v": null, "w": "2"}}})),
        )
        .await
        .expect("merge patch");
    assert_eq!(
        p.labels().clone(),
        BTreeMap::from([("w".to_string(), "2".to_string())])
    );
    // JSON patch (RFC 6902) with `test` guards, as kube-runtime's finalizer helper sends.
    let ops = json_patch::Patch(
        serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/labels/w", "value": "2"},
            {"op": "add", "path": "/metadata/labels/j", "value": "p"},
        ]))
        .expect("ops"),
    );
    let p = api
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .expect("json patch");
    assert_eq!(p.labels().get("j").map(String::as_str), Some("p"));
    let failing = json!([{"op": "test", "path": "/metadata/labels/w", "value": "nope"},
        {"op": "remove", "path": "/metadata/labels"}]);
    let path = "/api/v1/namespaces/default/services/a";
    let (code, st) = raw(
        &client,
        "PATCH",
        path,
        Some("application/json-patch+json"),
        failing,
    )
    .await;
    assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")));
    let (code, st) = raw(&client, "PATCH", path, Some("application/xml"), json!({})).await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"j": null}}})),
    )
    .await
    .expect("drop j");

    // Delete: DELETED carries the last state at a new RV.
    let rv = fake.resource_version().to_string();
    let mut w = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .expect("watch")
        .boxed();
    let gone = api
        .delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(gone.is_left(), "the deleted object is returned");
    match next(&mut w).await {
        WatchEvent::Deleted(s) => {
            assert_eq!(s.name_any(), "a");
            assert_eq!(s.labels().get("w").map(String::as_str), Some("2"));
            assert_eq!(
                s.resource_version(),
                Some(fake.resource_version().to_string())
            );
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
    let err = api
        .delete("a", &DeleteParams::default())
        .await
        .expect_err("already gone");
    assert_eq!(api_err(err), (404, "NotFound".into()));
}

#[tokio::test]
async fn status_subresource_ssa_and_generation() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    let api: Api<Ingress> = Api::namespaced(client.clone(), "default");
    let mut with_status = ingress("web", "a.example");
    with_status.status =
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}))
            .expect("status");
    let created = api
        .create(&PostParams::default(), &with_status)
        .await
        .expect("create");
    assert!(
        created.status.is_none(),
        "create drops status for status-subresource kinds"
    );
    assert_eq!(created.metadata.generation, Some(1));

    // Apply on /status needs a fieldManager: 400 from the server (kube does not check).
    let status_apply = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web"},
        "spec": {"rules": [{"host": "evil.example"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}});
    let err = api
        .patch_status("web", &PatchParams::default(), &Patch::Apply(&status_apply))
        .await
        .expect_err("no manager");
    assert_eq!(api_err(err), (400, "BadRequest".into()));

    let applied = api
        .patch_status(
            "web",
            &PatchParams::apply("portico").force(),
            &Patch::Apply(&status_apply),
        )
        .await
        .expect("status apply");
    let ip = applied
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i[0].ip.clone());
    assert_eq!(ip.as_deref(), Some("10.0.0.1"));
    let host = applied
        .spec
        .as_ref()
        .and_then(|s| s.rules.as_ref())
        .and_then(|r| r[0].host.clone());
    assert_eq!(
        host.as_deref(),
        Some("a.example"),
        "/status apply changes only status"
    );
    assert_eq!(
        applied.metadata.generation,
        Some(1),
        "status does not bump generation"
    );
    let mf = applied.metadata.managed_fields.clone().unwrap_or_default();
    assert!(
        mf.iter().any(|m| m.manager.as_deref() == Some("portico")
            && m.subresource.as_deref() == Some("status"))
    );

    // The same apply again is a no-op: same RV, no event.
    let again = api
        .patch_status(
            "web",
            &PatchParams::apply("portico").force(),
            &Patch::Apply(&status_apply),
        )
        .await
        .expect("status apply again");
    assert_eq!(again.resource_version(), applied.resource_version());

    // Labels: RV moves, generation stays. Spec: generation bumps. Main writes ignore status.
    let labelled = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .expect("label");
    assert_eq!(labelled.metadata.generation, Some(1));
    assert_ne!(labelled.resource_version(), again.resource_version());
    let specced = api.patch("web", &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rules": [{"host": "b.example"}]}, "status": {"loadBalancer": null}})))
        .await
        .expect("spec");
    assert_eq!(specced.metadata.generation, Some(2));
    assert!(
        specced.status.is_some(),
        "main-resource patch leaves status alone"
    );

    // Main-resource apply: creates, ignores status; conflicts between managers need force.
    let main = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "other"},
        "spec": {"rules": [{"host": "o.example"}]}, "status": {"loadBalancer": {"ingress": [{"ip": "9.9.9.9"}]}}});
    let (code, obj) = raw(
        &client,
        "PATCH",
        "/apis/networking.k8s.io/v1/namespaces/default/ingresses/other?fieldManager=helm",
        Some("application/apply-patch+yaml"),
        main,
    )
    .await;
    assert_eq!(code, 201, "apply creates: {obj}");
    assert!(obj.get("status").is_none());
    let rival = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "other"},
        "spec": {"rules": [{"host": "x.example"}]}});
    let err = api
        .patch(
            "other",
            &PatchParams::apply("kubectl"),
            &Patch::Apply(&rival),
        )
        .await
        .expect_err("conflict");
    assert_eq!(api_err(err), (409, "Conflict".into()));
    let forced = api
        .patch(
            "other",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&rival),
        )
        .await
        .expect("force");
    assert_eq!(forced.metadata.generation, Some(2));

    // PUT on /status changes only status.
    let mut put = forced.clone();
    put.spec = Some(
        serde_json::from_value(json!({"rules": [{"host": "ignored.example"}]})).expect("spec"),
    );
    put.status =
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"hostname": "lb.example"}]}}))
            .expect("status");
    let st = api
        .replace_status("other", &PostParams::default(), &put)
        .await
        .expect("put status");
    let host = st
        .spec
        .as_ref()
        .and_then(|s| s.rules.as_ref())
        .and_then(|r| r[0].host.clone());
    assert_eq!(host.as_deref(), Some("x.example"));
    assert!(st.status.is_some());
    assert_eq!(fake.count("patch", "ingresses/status"), 3);
    assert_eq!(fake.count("update", "ingresses/status"), 1);
}

#[tokio::test]
async fn no_op_writes_emit_no_event_and_keep_the_resource_version() {
    let fake = FakeApi::start().await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    let a = api
        .create(&PostParams::default(), &svc("a", json!({"k": "v"})))
        .await
        .expect("a");
    let rv = fake.resource_version();
    let mut w = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv.to_string())
        .await
        .expect("watch")
        .boxed();
    let same = api
        .replace("a", &PostParams::default(), &a)
        .await
        .expect("same replace");
    assert_eq!(same.resource_version(), a.resource_version());
    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"k": "v"}}})),
        )
        .await
        .expect("same patch");
    assert_eq!(patched.resource_version(), a.resource_version());
    assert_eq!(fake.resource_version(), rv);
    api.create(&PostParams::default(), &svc("marker", json!({})))
        .await
        .expect("marker");
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("ADDED".into(), "marker".into()),
        "no MODIFIED before it"
    );
}

#[tokio::test]
async fn reflector_converges_after_a_mix_of_writes_and_streaming_lists_work() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    let api: Api<Ingress> = Api::all(client.clone());
    for ns in ["a", "b"] {
        let nsapi: Api<Ingress> = Api::namespaced(client.clone(), ns);
        for i in 0..3 {
            nsapi
                .create(
                    &PostParams::default(),
                    &ingress(&format!("i{i}"), "h.example"),
                )
                .await
                .expect("create");
        }
    }
    // Small pages so the initial list is paginated.
    let r = reflect(api.clone(), watcher::Config::default().page_size(2)).await;
    let streaming = reflect(api.clone(), watcher::Config::default().streaming_lists()).await;
    assert!(fake.count("list", "ingresses") >= 3, "paged initial list");

    let a: Api<Ingress> = Api::namespaced(client.clone(), "a");
    a.delete("i0", &DeleteParams::default())
        .await
        .expect("delete");
    a.patch(
        "i1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rules": [{"host": "new.example"}]}})),
    )
    .await
    .expect("patch");
    a.patch_status(
        "i2",
        &PatchParams::apply("portico"),
        &Patch::Apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i2"},
        "status": {"loadBalancer": {"ingress": [{"ip": "1.1.1.1"}]}}})),
    )
    .await
    .expect("status");
    fake.create(json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i9", "namespace": "b"}}))
        .expect("test-side create");
    fake.delete("networking.k8s.io/v1", "Ingress", "b", "i1")
        .expect("test-side delete");
    fake.drop_watches();
    fake.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i8", "namespace": "a"},
        "spec": {"defaultBackend": {"service": {"name": "s", "port": {"number": 80}}}}}), "test")
        .expect("test-side apply");

    converges(&r, &fake, "networking.k8s.io/v1", "Ingress").await;
    converges(&streaming, &fake, "networking.k8s.io/v1", "Ingress").await;
    let i1 = r
        .store
        .state()
        .into_iter()
        .find(|i| i.name_any() == "i1" && i.namespace().as_deref() == Some("a"))
        .expect("a/i1");
    assert_eq!(i1.metadata.generation, Some(2));
    fake.wait_for("six ingresses", DEADLINE, |s| {
        s.find_type("networking.k8s.io", "v1", "ingresses")
            .is_some_and(|t| s.all(t).len() == 6)
    })
    .await
    .expect("six ingresses on the server");
}

#[tokio::test]
async fn events_and_leases_for_the_controller() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "portico");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "portico-leader"},
        "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15}}))
    .expect("lease");
    let l = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("lease");
    let mut taken = l.clone();
    taken.spec.as_mut().expect("spec").holder_identity = Some("pod-b".into());
    leases
        .replace("portico-leader", &PostParams::default(), &taken)
        .await
        .expect("take over");
    let err = leases
        .replace("portico-leader", &PostParams::default(), &l)
        .await
        .expect_err("lost race");
    assert_eq!(api_err(err), (409, "Conflict".into()));

    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, "default");
    let ev: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"generateName": "web."}, "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "portico.dev/controller", "reportingInstance": "pod-a",
        "action": "Sync", "reason": "Invalid", "type": "Warning", "note": "bad backend",
        "regarding": {"kind": "Ingress", "namespace": "default", "name": "web"}}))
    .expect("event");
    events
        .create(&PostParams::default(), &ev)
        .await
        .expect("event");
    let stored = fake.list("events.k8s.io/v1", "Event");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["note"], "bad backend");
    assert_eq!(fake.count("create", "events"), 1);
    assert_eq!(
        fake.requests()
            .iter()
            .filter(|r| r.resource == "leases" && r.verb == "update")
            .count(),
        2
    );
}

#[tokio::test]
async fn finalizers_defer_deletion_until_the_last_one_is_removed() {
    let fake = FakeApi::start().await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    let mut s = svc("f", json!({}));
    s.metadata.finalizers = Some(vec!["portico.dev/cleanup".into()]);
    s.metadata.namespace = Some("default".into());
    let seeded = fake.create_typed(&s).expect("typed test-side create");
    assert_eq!(seeded.metadata.finalizers, s.metadata.finalizers);
    assert!(seeded.metadata.uid.is_some());
    let rv = fake.resource_version().to_string();
    let mut w = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .expect("watch")
        .boxed();
    let marked = api
        .delete("f", &DeleteParams::default())
        .await
        .expect("delete")
        .left()
        .expect("object returned");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(api.get("f").await.expect("still there").name_any(), "f");
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("MODIFIED".into(), "f".into())
    );
    api.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("remove finalizer");
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("DELETED".into(), "f".into())
    );
    let err = api.get("f").await.expect_err("gone");
    assert_eq!(api_err(err), (404, "NotFound".into()));
}

#[tokio::test]
async fn refusal_window_ends_by_itself_on_the_same_port() {
    let fake = FakeApi::start().await;
    let api: Api<Service> = Api::namespaced(fake.client().await, "default");
    api.list(&ListParams::default()).await.expect("list before");
    fake.refuse_connections_for(Duration::from_millis(300));
    let err = api.list(&ListParams::default()).await.expect_err("refused");
    assert!(!matches!(err, kube::Error::Api(_)), "{err:?}");
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut recovered = false;
    while tokio::time::Instant::now() < end {
        if api.list(&ListParams::default()).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(recovered, "serving again after the window");
    assert!(fake.refused_connections() >= 1);
}

#[tokio::test]
async fn request_validation_and_write_accounting() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    let body = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "other"}});
    let (code, st) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/services",
        Some("application/json"),
        body,
    )
    .await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (400, Some("BadRequest")),
        "namespace mismatch"
    );
    let body = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}});
    let (code, _) = raw(
        &client,
        "POST",
        "/api/v1/services",
        Some("application/json"),
        body.clone(),
    )
    .await;
    assert_eq!(code, 405, "namespaced kinds are created in a namespace");
    let (code, _) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/services?dryRun=All",
        Some("application/json"),
        body.clone(),
    )
    .await;
    assert_eq!(code, 400, "dry run is refused, not persisted");
    let (code, st) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/services",
        Some("application/json"),
        json!({"kind": "Service"}),
    )
    .await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (422, Some("Invalid")),
        "no name"
    );
    let wrong = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}});
    let (code, _) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/services",
        Some("application/json"),
        wrong,
    )
    .await;
    assert_eq!(code, 400, "kind must match the URL");
    assert!(fake.list("v1", "Service").is_empty());
    fake.create(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "default"}}))
        .expect("x");
    let x = "/api/v1/namespaces/default/services/x";
    let (code, _) = raw(&client, "PUT", x, Some("application/json"), json!([1])).await;
    assert_eq!(code, 400, "a non-object body is a bad request, not a crash");
    let root = json!([{"op": "replace", "path": "", "value": 7}]);
    let (code, _) = raw(
        &client,
        "PATCH",
        x,
        Some("application/json-patch+json"),
        root,
    )
    .await;
    assert_eq!(code, 400);
    let (code, _) = raw(
        &client,
        "PATCH",
        x,
        Some("application/merge-patch+json"),
        json!("s"),
    )
    .await;
    assert_eq!(code, 400);
    let (code, _) = raw(&client, "GET", x, None, Value::Null).await;
    assert_eq!(code, 200, "still serving");

    // Apply with a stale resourceVersion is a precondition failure.
    let api: Api<Ingress> = Api::namespaced(client.clone(), "default");
    let created = api
        .create(&PostParams::default(), &ingress("web", "a.example"))
        .await
        .expect("create");
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
    )
    .await
    .expect("bump");
    let stale = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "web", "resourceVersion": created.resource_version()}});
    let err = api
        .patch("web", &PatchParams::apply("x"), &Patch::Apply(&stale))
        .await
        .expect_err("stale");
    assert_eq!(api_err(err), (409, "Conflict".into()));

    // One status writer, counted by verb and field manager.
    for ip in ["1.1.1.1", "2.2.2.2"] {
        let st = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web"},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
        api.patch_status(
            "web",
            &PatchParams::apply("portico-controller").force(),
            &Patch::Apply(&st),
        )
        .await
        .expect("status");
    }
    assert_eq!(
        fake.status_writers("ingresses"),
        ["portico-controller".to_string()].into()
    );
    assert_eq!(fake.count("patch", "ingresses/status"), 2);
    assert_eq!(fake.count("patch", "ingresses"), 2);
    assert_eq!(fake.count("create", "ingresses"), 1);
}

#[tokio::test]
async fn version_delete_collection_and_streaming_list_parameters() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    let v = client.apiserver_version().await.expect("/version");
    assert_eq!(v.major, "1");

    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    for (n, app) in [("a", "x"), ("b", "x"), ("c", "y")] {
        api.create(&PostParams::default(), &svc(n, json!({"app": app})))
            .await
            .expect("create");
    }
    let rv = fake.resource_version().to_string();
    let mut w = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .expect("watch")
        .boxed();
    let gone = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app=x"),
        )
        .await
        .expect("delete collection")
        .left()
        .expect("the deleted objects");
    let names: Vec<String> = gone.items.iter().map(|s| s.name_any()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("DELETED".into(), "a".into())
    );
    assert_eq!(
        name_and_type(&next(&mut w).await),
        ("DELETED".into(), "b".into())
    );
    let left: Vec<String> = fake
        .list("v1", "Service")
        .iter()
        .map(|o| o["metadata"]["name"].to_string())
        .collect();
    assert_eq!(left, ["\"c\""]);

    // Streaming lists need resourceVersionMatch=NotOlderThan and bookmarks (422 otherwise).
    let base = "/api/v1/namespaces/default/services?watch=true&timeoutSeconds=1";
    for q in [
        "&sendInitialEvents=true&allowWatchBookmarks=true",
        "&sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
        "&resourceVersionMatch=NotOlderThan",
    ] {
        let (code, st) = raw(&client, "GET", &format!("{base}{q}"), None, Value::Null).await;
        assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")), "{q}");
    }
}

#[tokio::test]
async fn kube_event_recorder_creates_then_patches_a_series() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let fake = FakeApi::start().await;
    let recorder = Recorder::new(
        fake.client().await,
        Reporter {
            controller: "portico.dev/controller".into(),
            instance: Some("pod-a".into()),
        },
    );
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some("Ingress".into()),
        namespace: Some("shop".into()),
        name: Some("web".into()),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Warning,
        reason: "BackendNotFound".into(),
        note: Some("service shop/api not found".into()),
        action: "Translate".into(),
        secondary: None,
    };
    recorder
        .publish(&ev, &regarding)
        .await
        .expect("first publish creates");
    recorder
        .publish(&ev, &regarding)
        .await
        .expect("second publish patches the series");
    let events = fake.list("events.k8s.io/v1", "Event");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["metadata"]["namespace"], "shop");
    assert_eq!(events[0]["regarding"]["name"], "web");
    assert_eq!(events[0]["series"]["count"], 2);
    assert_eq!(fake.count("create", "events"), 1);
    assert_eq!(fake.count("patch", "events"), 1);
}

mod selector_units {
    use super::fake_api::selector::*;
    use serde_json::{Value, json};

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns1", "labels": labels}, "type": "kubernetes.io/tls"})
    }

    #[test]
    fn label_operators() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app in (web, db)", true),
            ("app in (db)", false),
            ("app notin (db)", true),
            ("app notin (web,db)", false),
            ("missing notin (x)", true),
            ("app", true),
            ("missing", false),
            ("!missing", true),
            ("!app", false),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("app in (web,db),!missing", true),
        ];
        for (sel, want) in cases {
            let s = LabelSelector::parse(sel).expect(sel);
            assert_eq!(s.matches(&o), want, "selector {sel:?}");
        }
    }

    #[test]
    fn label_parse_errors() {
        for bad in ["app in web", "=x", "app in (a", "a b c", "!"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn field_operators() {
        let o = obj(json!({}));
        let cases = [
            ("metadata.name=a", true),
            ("metadata.name==b", false),
            ("metadata.name!=b", true),
            ("metadata.namespace=ns1,metadata.name=a", true),
            ("type=kubernetes.io/tls", true),
            ("spec.missing!=x", true),
            ("spec.missing=", true),
        ];
        for (sel, want) in cases {
            let s = FieldSelector::parse(sel).expect(sel);
            assert_eq!(s.matches(&o), want, "selector {sel:?}");
        }
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}

mod patch_units {
    use super::fake_api::patch::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386_examples() {
        // RFC 7386 appendix A, a selection.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut t, p, want) in cases {
            merge_patch(&mut t, &p);
            assert_eq!(t, want, "patch {p}");
        }
    }

    #[test]
    fn fields_v1_round_trip() {
        let obj = json!({"spec": {"a": 1, "b": {"c": [1]}}, "metadata": {"labels": {"x": "y"}, "name": "n"}});
        let set = applied_fields(&obj, false, false);
        assert_eq!(from_fields_v1(&to_fields_v1(&set)), set);
        assert!(!set.contains(&vec!["metadata".to_string(), "name".to_string()]));
    }

    fn ap<'a>(manager: &'a str, force: bool) -> Apply<'a> {
        Apply {
            manager,
            force,
            status_only: false,
            drop_status: false,
            api_version: "v1",
            now: "2026-01-01T00:00:00Z",
        }
    }

    #[test]
    fn apply_conflicts_force_and_prune() {
        let live = json!({"metadata": {"name": "n"}});
        let a1 =
            apply(&live, &json!({"spec": {"x": 1, "y": 2}}), &ap("one", false)).expect("first");
        let err = apply(&a1, &json!({"spec": {"x": 5}}), &ap("two", false)).expect_err("conflict");
        assert_eq!(
            err,
            PatchError::Conflicts(vec!["conflict with \"one\": .spec.x".into()])
        );
        // Same value is shared ownership, not a conflict.
        let shared = apply(&a1, &json!({"spec": {"x": 1}}), &ap("two", false)).expect("shared");
        // Manager one drops x: still owned by two, so it stays; y is pruned.
        let pruned = apply(&shared, &json!({"spec": {}}), &ap("one", false)).expect("prune");
        assert_eq!(pruned["spec"], json!({"x": 1}));
        let forced = apply(&a1, &json!({"spec": {"x": 5}}), &ap("two", true)).expect("force");
        assert_eq!(forced["spec"], json!({"x": 5, "y": 2}));
    }
}
