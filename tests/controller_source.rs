//! The cluster source against the fake API server, over real HTTP with the real kube client:
//! objects become Inputs, edits and deletes follow, namespaces and Secret types are filtered,
//! nothing is served before every kind listed, and faults (dropped watches, 410 after
//! compaction, refused connections) never expose a partial or empty view.

#[path = "support/fake_api/mod.rs"]
mod fake_api;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fake_api::{FakeApi, poll_until};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use kube::runtime::reflector::Lookup;
use portico::controller::client::DEFAULT_API_TIMEOUT;
use portico::controller::rbac::{self, API_NEEDS, Scope};
use portico::controller::source::watched_resources;
use portico::controller::{ClusterSource, SourceConfig, build_client};
use portico::metrics::Metrics;
use portico::model::RouteTarget;
use portico::publish;
use portico::rebuild::{RebuildConfig, Rebuilder, Source, Trigger};
use portico::translate::{self, Inputs, Options};

/// Upper bound for any wait. Generous: kube's default watcher backoff grows 0.8 s, 1.6 s,
/// 3.2 s, … with jitter, and these machines are shared.
const DEADLINE: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------
// Object builders (JSON, as a client would send them)

fn ingress(ns: &str, name: &str, host: &str, service: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "ingressClassName": "portico",
            "rules": [{"host": host, "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": service, "port": {"number": 80}}}
            }]}}]
        }
    })
}

fn service(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    })
}

fn slice(ns: &str, name: &str, service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]
    })
}

fn secret(ns: &str, name: &str, ty: &str, keys: &[&str]) -> Value {
    let data: serde_json::Map<String, Value> = keys
        .iter()
        .map(|k| (k.to_string(), json!("c2VjcmV0")))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns,
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\":\"copy\"}"}},
        "type": ty,
        "data": data
    })
}

fn ingress_class(name: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": name},
        "spec": {"controller": "portico.dev/ingress-controller"}
    })
}

fn policy(ns: &str, name: &str, target: &str) -> Value {
    json!({
        "apiVersion": "portico.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"targetRef": {"kind": "Ingress", "name": target},
                 "limit": {"requests": 10, "period": "1m"}}
    })
}

/// One of every kind in `ns`, named after the namespace, plus the IngressClass.
fn seed(api: &FakeApi, ns: &str) {
    api.apply(
        ingress(
            ns,
            &format!("web-{ns}"),
            &format!("{ns}.example.com"),
            "web",
        ),
        "kubectl",
    )
    .expect("ingress");
    api.apply(service(ns, "web"), "kubectl").expect("service");
    api.apply(slice(ns, "web-abc", "web", "10.1.0.1"), "kubectl")
        .expect("slice");
    api.apply(
        secret(ns, "tls", "kubernetes.io/tls", &["tls.crt", "tls.key"]),
        "kubectl",
    )
    .expect("secret");
    api.apply(policy(ns, "limit", &format!("web-{ns}")), "kubectl")
        .expect("policy");
}

// ------------------------------------------------------------------------------------------
// Views

/// What a view holds, kind → sorted `namespace/name` (resourceVersion included, so an edit is
/// a different view).
type View = BTreeMap<&'static str, BTreeSet<String>>;

// `Lookup` (what a reflector store keys by) rather than `kube::Resource`: EndpointSlices
// reach `Inputs` in translate's compact form, which has no `ObjectMeta`.
fn key<K: Lookup>(o: &K) -> String {
    format!(
        "{}/{}@{}",
        o.namespace().unwrap_or_default(),
        o.name().unwrap_or_default(),
        o.resource_version().unwrap_or_default()
    )
}

fn names<K: Lookup>(objs: &[Arc<K>]) -> BTreeSet<String> {
    objs.iter()
        .map(|o| {
            format!(
                "{}/{}",
                o.namespace().unwrap_or_default(),
                o.name().unwrap_or_default()
            )
        })
        .collect()
}

fn view(i: &Inputs) -> View {
    fn keys<K: Lookup>(objs: &[Arc<K>]) -> BTreeSet<String> {
        objs.iter().map(|o| key(&**o)).collect()
    }
    BTreeMap::from([
        ("Ingress", keys(&i.ingresses)),
        ("IngressClass", keys(&i.ingress_classes)),
        ("Service", keys(&i.services)),
        ("EndpointSlice", keys(&i.endpoint_slices)),
        ("Secret", keys(&i.secrets)),
        ("RateLimitPolicy", keys(&i.rate_limit_policies)),
    ])
}

fn current(source: &ClusterSource) -> View {
    view(&source.inputs().0)
}

/// `sample` is, kind by kind, either the view before a fault or the one after it: never a
/// mix inside one kind, never missing objects.
fn assert_old_or_new(sample: &View, old: &View, new: &View) {
    for (kind, objs) in sample {
        assert!(
            Some(objs) == old.get(kind) || Some(objs) == new.get(kind),
            "{kind}: partial view {objs:?}\n old {:?}\n new {:?}",
            old.get(kind),
            new.get(kind)
        );
    }
}

// ------------------------------------------------------------------------------------------
// Harness

struct Running {
    source: Arc<ClusterSource>,
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    trigger: Trigger,
}

impl Running {
    async fn start(api: &FakeApi, config: SourceConfig) -> Running {
        Self::start_with_client(api.client().await, config)
    }

    fn start_with_client(client: kube::Client, config: SourceConfig) -> Running {
        let trigger = Trigger::new();
        let (stop, rx) = watch::channel(false);
        let (source, task) =
            ClusterSource::start(client, config, trigger.clone(), stopped(rx.clone()));
        Running {
            source,
            task,
            stop,
            trigger,
        }
    }

    async fn synced(&self) {
        tokio::time::timeout(DEADLINE, self.source.synced())
            .await
            .expect("source synced in time");
        assert!(self.source.is_synced());
    }

    async fn until(&self, what: &str, mut f: impl FnMut(&View) -> bool) {
        let source = self.source.clone();
        assert!(
            poll_until(DEADLINE, || f(&current(&source))).await,
            "timed out waiting for {what}; view: {:?}",
            current(&source)
        );
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("source task ends at shutdown")
            .expect("source task did not panic");
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Dense sampling: calls `f` after every scheduler turn (the tests run on tokio's
/// current-thread runtime, so each `yield_now` lets every other task, the reflectors and the
/// fake's connections included, take at most one step), until it returns true or `deadline`
/// passes. This catches a store that would expose a relist page by page.
async fn sample_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + deadline;
    // Bounded by the deadline.
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    f()
}

fn has(v: &View, kind: &str, name: &str) -> bool {
    v.get(kind)
        .is_some_and(|s| s.iter().any(|k| k.split('@').next() == Some(name)))
}

/// A recording HTTP/1.1 proxy in front of the fake: the fake's request log has no query
/// strings, and "the Secret list and watch carry the field selector" is about the query.
/// Forwards every request unchanged (bodies streamed, so watches work) and keeps the
/// request targets. It can also answer single-Secret `GET`s itself with queued error statuses
/// ([`RecordingProxy::fail_secret_gets`]), which the fake has no fault for.
struct RecordingProxy {
    addr: std::net::SocketAddr,
    targets: Arc<std::sync::Mutex<Vec<String>>>,
    secret_get_faults: Arc<std::sync::Mutex<std::collections::VecDeque<u16>>>,
    task: JoinHandle<()>,
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordingProxy {
    async fn start(upstream: std::net::SocketAddr) -> RecordingProxy {
        use http_body_util::BodyExt;
        use http_body_util::combinators::BoxBody;
        use hyper_util::client::legacy::Client as HttpClient;
        use hyper_util::rt::{TokioExecutor, TokioIo};

        type Body = BoxBody<bytes::Bytes, hyper::Error>;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let targets: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let client: HttpClient<_, hyper::body::Incoming> =
            HttpClient::builder(TokioExecutor::new()).build_http();
        let recorded = targets.clone();
        let secret_get_faults: Arc<std::sync::Mutex<std::collections::VecDeque<u16>>> =
            Arc::default();
        let faults = secret_get_faults.clone();
        let task = tokio::spawn(async move {
            // Ends when the test drops the proxy (abort).
            while let Ok((sock, _)) = listener.accept().await {
                let client = client.clone();
                let recorded = recorded.clone();
                let faults = faults.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |mut req: http::Request<hyper::body::Incoming>| {
                            let client = client.clone();
                            let recorded = recorded.clone();
                            let faults = faults.clone();
                            async move {
                                let target = req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.as_str().to_string())
                                    .unwrap_or_default();
                                recorded.lock().expect("lock").push(target.clone());
                                // `/api/v1/namespaces/{ns}/secrets/{name}`: a single-Secret GET.
                                let segs: Vec<&str> =
                                    target.split('?').next().unwrap_or("").split('/').collect();
                                let secret_get = req.method() == http::Method::GET
                                    && segs.len() == 7
                                    && segs[5] == "secrets";
                                let fault = if secret_get {
                                    faults.lock().expect("lock").pop_front()
                                } else {
                                    None
                                };
                                if let Some(code) = fault {
                                    let reason = if code == 404 {
                                        "NotFound"
                                    } else {
                                        "InternalError"
                                    };
                                    let status = json!({
                                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                                        "status": "Failure", "message": "injected by the test proxy",
                                        "reason": reason, "code": code
                                    });
                                    let mut r = http::Response::new(
                                        http_body_util::Full::new(bytes::Bytes::from(
                                            status.to_string(),
                                        ))
                                        .map_err(|never| match never {})
                                        .boxed(),
                                    );
                                    *r.status_mut() =
                                        http::StatusCode::from_u16(code).expect("status code");
                                    r.headers_mut().insert(
                                        http::header::CONTENT_TYPE,
                                        http::HeaderValue::from_static("application/json"),
                                    );
                                    return Ok::<_, std::convert::Infallible>(r);
                                }
                                *req.uri_mut() =
                                    format!("http://{upstream}{target}").parse().expect("uri");
                                let resp: http::Response<Body> = match client.request(req).await {
                                    Ok(r) => r.map(BodyExt::boxed),
                                    Err(_) => {
                                        let mut r = http::Response::new(
                                            http_body_util::Empty::new()
                                                .map_err(|never| match never {})
                                                .boxed(),
                                        );
                                        *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                                        r
                                    }
                                };
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        RecordingProxy {
            addr,
            targets,
            secret_get_faults,
            task,
        }
    }

    /// A kube client for the fake, through this proxy.
    async fn client(&self, api: &FakeApi) -> kube::Client {
        let yaml = api
            .kubeconfig_yaml()
            .replace(&api.url(), &format!("http://{}", self.addr));
        let kc = kube::config::Kubeconfig::from_yaml(&yaml).expect("kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("config");
        kube::Client::try_from(config).expect("client")
    }

    /// The next single-Secret GETs are answered with these statuses, one each, in order.
    fn fail_secret_gets(&self, codes: &[u16]) {
        self.secret_get_faults
            .lock()
            .expect("lock")
            .extend(codes.iter().copied());
    }

    /// Single-Secret GETs sent so far (answered by the fake or by an injected fault).
    fn secret_gets(&self) -> usize {
        self.targets()
            .iter()
            .filter(|t| {
                let segs: Vec<&str> = t.split('?').next().unwrap_or("").split('/').collect();
                segs.len() == 7 && segs[5] == "secrets"
            })
            .count()
    }

    fn targets(&self) -> Vec<String> {
        self.targets.lock().expect("lock").clone()
    }
}

/// The decoded value of query parameter `name` in a request target.
fn query_param(target: &str, name: &str) -> Option<String> {
    let (_, q) = target.split_once('?')?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

// ------------------------------------------------------------------------------------------
// Reflecting objects

#[tokio::test]
async fn objects_edits_and_deletes_are_reflected() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    let run = Running::start(&api, SourceConfig::default()).await;
    run.synced().await;

    let (inputs, diags) = run.source.inputs();
    assert!(diags.is_empty());
    assert_eq!(
        names(&inputs.ingresses),
        BTreeSet::from(["shop/web-shop".to_string()])
    );
    assert_eq!(
        names(&inputs.ingress_classes),
        BTreeSet::from(["/portico".to_string()])
    );
    assert_eq!(
        names(&inputs.services),
        BTreeSet::from(["shop/web".to_string()])
    );
    assert_eq!(
        names(&inputs.endpoint_slices),
        BTreeSet::from(["shop/web-abc".to_string()])
    );
    assert_eq!(
        names(&inputs.secrets),
        BTreeSet::from(["shop/tls".to_string()])
    );
    assert_eq!(
        names(&inputs.rate_limit_policies),
        BTreeSet::from(["shop/limit".to_string()])
    );

    // Create, edit, delete after the initial list: all arrive through the watch.
    api.apply(ingress("shop", "api", "api.example.com", "web"), "kubectl")
        .expect("create");
    run.until("new Ingress", |v| has(v, "Ingress", "shop/api"))
        .await;

    api.merge_patch(
        "networking.k8s.io/v1",
        "Ingress",
        "shop",
        "api",
        &json!({"spec": {"rules": [{"host": "edited.example.com", "http": {"paths": [{
            "path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}),
    )
    .expect("edit");
    let src = run.source.clone();
    assert!(
        poll_until(DEADLINE, || src.inputs().0.ingresses.iter().any(|i| {
            i.metadata.name.as_deref() == Some("api")
                && i.spec
                    .as_ref()
                    .and_then(|s| s.rules.as_ref())
                    .and_then(|r| r.first())
                    .and_then(|r| r.host.as_deref())
                    == Some("edited.example.com")
        }))
        .await,
        "edit reflected"
    );

    api.delete("discovery.k8s.io/v1", "EndpointSlice", "shop", "web-abc")
        .expect("delete");
    api.delete("networking.k8s.io/v1", "Ingress", "shop", "api")
        .expect("delete");
    run.until("deletes", |v| {
        !has(v, "EndpointSlice", "shop/web-abc") && !has(v, "Ingress", "shop/api")
    })
    .await;
    assert!(has(&current(&run.source), "Ingress", "shop/web-shop"));
    run.stop().await;
}

#[tokio::test]
async fn changes_poke_the_rebuild_and_route_to_endpoint_slice_endpoints() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    let run = Running::start(&api, SourceConfig::default()).await;
    run.synced().await;

    // Translate level: the source's inputs route the Ingress to the slice's pod address.
    let (snapshot, _) = translate::translate(&run.source.inputs().0, &Options::default());
    let endpoints = |snapshot: &portico::model::Snapshot, host: &str| -> Vec<String> {
        let m = snapshot.route(host, "/");
        match m.route.map(|r| &r.target) {
            Some(RouteTarget::Backend(id)) => snapshot
                .backends
                .get(*id)
                .map(|b| b.endpoints.iter().map(|e| e.addr.to_string()).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    };
    assert_eq!(
        endpoints(&snapshot, "shop.example.com"),
        vec!["10.1.0.1:8080"]
    );

    // Through the real rebuild loop: only a poke can make it build again after the first.
    let (publisher, reader) = publish::channel();
    let rebuilder = Rebuilder::new(
        RebuildConfig::default(),
        publisher,
        Metrics::new(),
        run.trigger.clone(),
    );
    let (stop_rb, rb_rx) = watch::channel(false);
    let source = run.source.clone();
    let rb = tokio::spawn(async move { rebuilder.run(&*source, stopped(rb_rx)).await });
    assert!(
        poll_until(DEADLINE, || reader.load().is_some_and(|s| endpoints(
            &s,
            "shop.example.com"
        ) == [
            "10.1.0.1:8080"
        ]))
        .await,
        "first build routes to the slice"
    );

    // An endpoint change: the new pod address is served after the poke-driven rebuild.
    api.apply(slice("shop", "web-abc", "web", "10.1.0.2"), "kubectl")
        .expect("slice edit");
    assert!(
        poll_until(DEADLINE, || reader.load().is_some_and(|s| endpoints(
            &s,
            "shop.example.com"
        ) == [
            "10.1.0.2:8080"
        ]))
        .await,
        "endpoint change reached the snapshot"
    );
    // A new Ingress: a new host.
    api.apply(ingress("shop", "api", "api.example.com", "web"), "kubectl")
        .expect("create");
    assert!(
        poll_until(DEADLINE, || reader.load().is_some_and(|s| endpoints(
            &s,
            "api.example.com"
        ) == [
            "10.1.0.2:8080"
        ]))
        .await,
        "new Ingress reached the snapshot"
    );
    let _ = stop_rb.send(true);
    tokio::time::timeout(DEADLINE, rb)
        .await
        .expect("rebuilder stops")
        .expect("no panic");
    run.stop().await;
}

#[tokio::test]
async fn watch_namespace_sees_only_listed_namespaces() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    for ns in ["a", "b", "c"] {
        seed(&api, ns);
    }
    let config = SourceConfig {
        namespaces: vec!["a".into(), "b".into()],
        ..Default::default()
    };
    let run = Running::start(&api, config).await;
    run.synced().await;
    assert_eq!(
        run.source.namespaces(),
        Some(&["a".to_string(), "b".to_string()][..])
    );
    let (inputs, _) = run.source.inputs();
    let two = |n: &str| BTreeSet::from([format!("a/{n}"), format!("b/{n}")]);
    assert_eq!(
        names(&inputs.ingresses),
        BTreeSet::from(["a/web-a".to_string(), "b/web-b".to_string()])
    );
    assert_eq!(names(&inputs.services), two("web"));
    assert_eq!(names(&inputs.endpoint_slices), two("web-abc"));
    assert_eq!(names(&inputs.secrets), two("tls"));
    assert_eq!(names(&inputs.rate_limit_policies), two("limit"));
    // Cluster-scoped, always watched.
    assert_eq!(inputs.ingress_classes.len(), 1);

    // Changes in an unwatched namespace never arrive; in a watched one they do.
    api.apply(ingress("c", "late", "late.c", "web"), "kubectl")
        .expect("c");
    api.apply(ingress("b", "late", "late.b", "web"), "kubectl")
        .expect("b");
    run.until("b/late", |v| has(v, "Ingress", "b/late")).await;
    assert!(!has(&current(&run.source), "Ingress", "c/late"));

    // The requests themselves were namespaced: nothing asked for c or for all namespaces.
    let requests = api.requests();
    for r in requests
        .iter()
        .filter(|r| r.verb == "list" || r.verb == "watch")
    {
        if r.resource == "ingressclasses" {
            assert_eq!(r.namespace, None);
        } else {
            assert!(
                matches!(r.namespace.as_deref(), Some("a" | "b")),
                "unexpected request {r:?}"
            );
        }
    }
    run.stop().await;
}

#[tokio::test]
async fn secrets_are_tls_only_and_stripped_to_tls_keys_without_managed_fields() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    api.apply(
        secret(
            "shop",
            "tls-extra",
            "kubernetes.io/tls",
            &["tls.crt", "tls.key", "ca.crt", "extra"],
        ),
        "kubectl",
    )
    .expect("tls with extras");
    // Key material is only held for referenced Secrets: reference every TLS Secret here.
    api.apply(
        tls_ingress(
            "shop",
            "refs",
            "refs.example.com",
            &["tls", "tls-extra", "later-tls", "db"],
        ),
        "kubectl",
    )
    .expect("referencing ingress");
    api.apply(secret("shop", "db", "Opaque", &["password"]), "kubectl")
        .expect("opaque");
    api.apply(
        secret(
            "shop",
            "token",
            "kubernetes.io/service-account-token",
            &["token"],
        ),
        "kubectl",
    )
    .expect("token");
    // The fake records server-side apply ownership, so the test is not vacuous.
    for (av, kind, ns, name) in [
        ("v1", "Secret", "shop", "tls"),
        ("networking.k8s.io/v1", "Ingress", "shop", "web-shop"),
        ("networking.k8s.io/v1", "IngressClass", "", "portico"),
    ] {
        let stored = api.get(av, kind, ns, name).expect("stored");
        assert!(
            stored.pointer("/metadata/managedFields").is_some(),
            "fake stores managedFields for {kind}"
        );
    }

    let proxy = RecordingProxy::start(api.addr()).await;
    let run = Running::start_with_client(proxy.client(&api).await, SourceConfig::default());
    run.synced().await;
    let (inputs, _) = run.source.inputs();
    // Only TLS Secrets, filtered by the server: the list and the watch both carried the
    // field selector (and no other kind did).
    let secret_requests = || -> Vec<String> {
        proxy
            .targets()
            .into_iter()
            .filter(|t| t.starts_with("/api/v1/secrets"))
            .collect()
    };
    // The watch starts right after the list completed; wait for it to be sent.
    assert!(
        poll_until(DEADLINE, || secret_requests().iter().any(|t| query_param(
            t, "watch"
        )
        .as_deref()
            == Some("true")))
        .await,
        "the Secret watch was opened"
    );
    let secret_requests = secret_requests();
    assert!(
        secret_requests
            .iter()
            .any(|t| query_param(t, "watch").is_none())
            && secret_requests
                .iter()
                .any(|t| query_param(t, "watch").as_deref() == Some("true")),
        "a list and a watch: {secret_requests:?}"
    );
    for t in &secret_requests {
        assert_eq!(
            query_param(t, "fieldSelector").as_deref(),
            Some("type=kubernetes.io/tls"),
            "{t}"
        );
    }
    for t in proxy.targets() {
        if !t.starts_with("/api/v1/secrets") {
            assert_eq!(query_param(&t, "fieldSelector"), None, "{t}");
        }
    }
    // The TLS Secrets, and a data-less placeholder for the referenced Opaque one (so it is
    // reported as the wrong type, not as missing).
    assert_eq!(
        names(&inputs.secrets),
        BTreeSet::from([
            "shop/tls".to_string(),
            "shop/tls-extra".to_string(),
            "shop/db".to_string()
        ])
    );
    let (placeholders, inputs_secrets): (Vec<_>, Vec<_>) = inputs
        .secrets
        .iter()
        .partition(|s| s.metadata.name.as_deref() == Some("db"));
    assert_eq!(placeholders[0].type_.as_deref(), Some("Opaque"));
    assert_eq!(placeholders[0].data, None);
    assert!(placeholders[0].metadata.annotations.is_none());
    for s in inputs_secrets {
        let keys: Vec<&str> = s
            .data
            .as_ref()
            .map(|d| d.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert_eq!(keys, ["tls.crt", "tls.key"], "{:?}", s.metadata.name);
        assert!(
            s.metadata
                .annotations
                .as_ref()
                .is_none_or(|a| !a.contains_key("kubectl.kubernetes.io/last-applied-configuration"))
        );
    }
    // An Opaque Secret created later is not seen either (the watch is filtered too).
    api.apply(secret("shop", "later", "Opaque", &["x"]), "kubectl")
        .expect("opaque later");
    api.apply(
        secret(
            "shop",
            "later-tls",
            "kubernetes.io/tls",
            &["tls.crt", "tls.key", "x"],
        ),
        "kubectl",
    )
    .expect("tls later");
    run.until("later-tls", |v| has(v, "Secret", "shop/later-tls"))
        .await;
    let source = run.source.clone();
    assert!(
        poll_until(DEADLINE, || held(&source).contains("shop/later-tls")).await,
        "later-tls data fetched"
    );
    let (inputs, _) = run.source.inputs();
    assert!(!names(&inputs.secrets).contains("shop/later"));
    for s in &inputs.secrets {
        let want = (s.metadata.name.as_deref() != Some("db")).then_some(2);
        assert_eq!(s.data.as_ref().map(|d| d.len()), want);
    }

    // managedFields stripped on every kind.
    fn no_mf<K: kube::Resource>(objs: &[Arc<K>]) -> bool {
        !objs.is_empty() && objs.iter().all(|o| o.meta().managed_fields.is_none())
    }
    assert!(no_mf(&inputs.ingresses));
    assert!(no_mf(&inputs.ingress_classes));
    // Services and EndpointSlices are held in translate's compact forms, which have no
    // managedFields (nor any other metadata than namespace, name and resourceVersion) to strip.
    assert!(!inputs.services.is_empty());
    assert!(!inputs.endpoint_slices.is_empty());
    assert!(no_mf(&inputs.secrets));
    assert!(no_mf(&inputs.rate_limit_policies));
    run.stop().await;
}

// ------------------------------------------------------------------------------------------
// Sync gating

#[tokio::test]
async fn not_synced_until_every_kind_listed() {
    // RBAC without the RateLimitPolicy grant: every other kind lists, that one is refused.
    // Policies may exist, so serving without them could serve limited routes unlimited.
    let api = FakeApi::start().await;
    api.forbid("list", "ratelimitpolicies", "");
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    api.apply(ingress("shop", "web", "shop.example.com", "web"), "kubectl")
        .expect("ingress");
    let run = Running::start(&api, SourceConfig::default()).await;

    // Wait until the five other kinds completed their lists (each InitDone bumps `changes`)
    // and the missing kind failed at least once.
    let changes = run.source.changes();
    let src = run.source.clone();
    assert!(
        poll_until(DEADLINE, || *changes.borrow() >= 5
            && src.watch_errors() >= 1)
        .await,
        "other kinds listed, policies failed"
    );
    assert!(api.count("list", "ingresses") >= 1);
    assert!(!run.source.is_synced());
    let (inputs, _) = run.source.inputs();
    assert!(
        inputs.ingresses.is_empty() && inputs.ingress_classes.is_empty(),
        "no partial view before every kind listed"
    );
    // `synced()` is still pending (checked without waiting: one poll).
    let pending = futures_poll_once(run.source.synced());
    assert!(pending, "synced() must not complete");
    run.stop().await;
}

/// A cluster without the RateLimitPolicy CRD (`helm install --skip-crds`, a hand-made
/// manifest): its list is a 404, so no policy can exist, and the first sync completes without
/// any instead of holding every route back for ever.
#[tokio::test]
async fn a_kind_the_api_does_not_serve_does_not_block_the_first_sync() {
    let mut opts = fake_api::Options::default();
    opts.types.retain(|t| t.kind != "RateLimitPolicy");
    let api = FakeApi::start_with(opts).await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    api.apply(ingress("shop", "web", "shop.example.com", "web"), "kubectl")
        .expect("ingress");
    let run = Running::start(&api, SourceConfig::default()).await;
    run.synced().await;
    let (inputs, _) = run.source.inputs();
    assert_eq!(
        names(&inputs.ingresses),
        BTreeSet::from(["shop/web".to_string()])
    );
    assert!(inputs.rate_limit_policies.is_empty());
    assert!(run.source.watch_errors() >= 1, "the 404 was seen");
    run.stop().await;
}

/// A RateLimitPolicy whose counts do not fit the proxy's `u32` (the API server's integers are
/// 64-bit, and an object stored before the schema's bound is still served) lists like any other
/// object: the first sync completes, and translate reports it instead of the whole list failing
/// to deserialise and holding back every route.
#[tokio::test]
async fn an_out_of_range_policy_does_not_block_the_first_sync() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    let mut huge = policy("shop", "huge", "web-shop");
    huge["spec"]["limit"]["requests"] = json!(5_000_000_000_i64);
    huge["spec"]["maxInFlight"] = json!(i64::MAX);
    api.apply(huge, "kubectl").expect("policy");
    let run = Running::start(&api, SourceConfig::default()).await;
    run.synced().await;

    let (inputs, _) = run.source.inputs();
    assert_eq!(
        names(&inputs.rate_limit_policies),
        BTreeSet::from(["shop/huge".to_string(), "shop/limit".to_string()])
    );
    let (_, diagnostics) = translate::translate(&inputs, &Options::default());
    let reported: Vec<_> = diagnostics
        .iter()
        .filter(|d| d.name == "huge")
        .map(|d| d.message.clone())
        .collect();
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert!(
        reported
            .iter()
            .all(|m| m.contains("between 1 and 4294967295"))
    );
    run.stop().await;
}

/// True when `fut` is still pending after one poll.
fn futures_poll_once<F: Future>(fut: F) -> bool {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    fut.as_mut().poll(&mut cx).is_pending()
}

#[tokio::test]
async fn starts_unsynced_while_the_api_refuses_then_syncs() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    api.refuse_connections();
    let run = Running::start(&api, SourceConfig::default()).await;
    assert!(
        poll_until(DEADLINE, || api.refused_connections() >= 6).await,
        "the watchers tried"
    );
    assert!(!run.source.is_synced());
    assert!(current(&run.source).values().all(BTreeSet::is_empty));
    api.accept_connections();
    run.synced().await;
    assert!(has(&current(&run.source), "Ingress", "shop/web-shop"));
    run.stop().await;
}

// ------------------------------------------------------------------------------------------
// Faults: the last complete view is kept the whole time

/// Seeds enough objects that a relist with `page_size: 2` takes several pages (requests), so
/// a store that exposed a relist in progress would be caught.
fn seed_many(api: &FakeApi) {
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    for i in 0..7 {
        let ns = format!("ns{i}");
        seed(api, &ns);
    }
}

fn small_pages() -> SourceConfig {
    SourceConfig {
        page_size: Some(2),
        ..Default::default()
    }
}

/// Changes of every kind, for "changes made during the outage".
fn change_during_fault(s: &mut fake_api::State) {
    let ty = |s: &fake_api::State, kind: &str| {
        s.types()
            .iter()
            .position(|t| t.kind == kind)
            .expect("type registered")
    };
    let ing = ty(s, "Ingress");
    s.create(
        ing,
        "ns0",
        ingress("ns0", "during", "during.example.com", "web"),
    )
    .expect("create during fault");
    s.delete(ing, "ns1", "web-ns1", None, None)
        .expect("delete during fault");
    let svc = ty(s, "Service");
    s.delete(svc, "ns2", "web", None, None).expect("delete svc");
    let sl = ty(s, "EndpointSlice");
    s.create(sl, "ns3", slice("ns3", "web-new", "web", "10.9.9.9"))
        .expect("slice");
}

fn expect_after_fault(v: &View) -> bool {
    has(v, "Ingress", "ns0/during")
        && !has(v, "Ingress", "ns1/web-ns1")
        && !has(v, "Service", "ns2/web")
        && has(v, "EndpointSlice", "ns3/web-new")
}

/// Plural names of the reflected kinds, for the fake's request counters.
const RESOURCES: [&str; 6] = [
    "ingresses",
    "ingressclasses",
    "services",
    "endpointslices",
    "secrets",
    "ratelimitpolicies",
];

/// The server's own view, in the same form as [`view`]: what the source must converge to.
fn server_view(api: &FakeApi) -> View {
    let keys = |av: &str, kind: &str, keep: &dyn Fn(&Value) -> bool| -> BTreeSet<String> {
        api.list(av, kind)
            .iter()
            .filter(|o| keep(o))
            .map(|o| {
                let m = |p: &str| {
                    o.pointer(p)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                };
                format!(
                    "{}/{}@{}",
                    m("/metadata/namespace"),
                    m("/metadata/name"),
                    m("/metadata/resourceVersion")
                )
            })
            .collect()
    };
    let any = |_: &Value| true;
    let tls = |o: &Value| o.get("type").and_then(Value::as_str) == Some("kubernetes.io/tls");
    BTreeMap::from([
        ("Ingress", keys("networking.k8s.io/v1", "Ingress", &any)),
        (
            "IngressClass",
            keys("networking.k8s.io/v1", "IngressClass", &any),
        ),
        ("Service", keys("v1", "Service", &any)),
        (
            "EndpointSlice",
            keys("discovery.k8s.io/v1", "EndpointSlice", &any),
        ),
        ("Secret", keys("v1", "Secret", &tls)),
        (
            "RateLimitPolicy",
            keys("portico.dev/v1alpha1", "RateLimitPolicy", &any),
        ),
    ])
}

/// Objects present before and after a fault must be present in every sample (a watch replay
/// may pass through intermediate states, but never loses what did not change).
fn assert_keeps_stable(sample: &View, old: &View, new: &View) {
    for (kind, objs) in sample {
        for stable in old[kind].intersection(&new[kind]) {
            assert!(objs.contains(stable), "{kind}: lost {stable} in {objs:?}");
        }
    }
}

#[tokio::test]
async fn dropped_watches_keep_the_view_and_resume_with_changes() {
    let api = FakeApi::start().await;
    seed_many(&api);
    let run = Running::start(&api, small_pages()).await;
    run.synced().await;
    let old = current(&run.source);
    assert_eq!(old, server_view(&api));
    let watches_before = api.count("watch", "ingresses");
    let lists_before = api.count("list", "ingresses");

    api.atomically(|s| {
        s.drop_watches();
        change_during_fault(s);
    });
    let new = server_view(&api);
    let src = run.source.clone();
    let mut samples = 0usize;
    let converged = sample_until(DEADLINE, || {
        let v = current(&src);
        samples += 1;
        assert_keeps_stable(&v, &old, &new);
        v == new
    })
    .await;
    assert!(
        converged,
        "converged after re-watch: {:?}",
        current(&run.source)
    );
    assert!(expect_after_fault(&new));
    assert!(samples >= 1);
    // It resumed by re-watching from the last resourceVersion, without a relist.
    assert!(api.count("watch", "ingresses") > watches_before);
    assert_eq!(api.count("list", "ingresses"), lists_before);
    run.stop().await;
}

#[tokio::test]
async fn compaction_410_relists_without_ever_exposing_a_partial_view() {
    let api = FakeApi::start().await;
    seed_many(&api);
    let run = Running::start(&api, small_pages()).await;
    run.synced().await;
    let old = current(&run.source);
    let lists_before: usize = RESOURCES.iter().map(|r| api.count("list", r)).sum();
    let ingress_lists_before = api.count("list", "ingresses");

    // Drop watches, change, compact, all under the store lock: every resuming watcher carries
    // a resourceVersion older than the compaction and gets an in-stream 410 → relist, here in
    // pages of 2 (several requests per kind).
    api.atomically(|s| {
        s.drop_watches();
        change_during_fault(s);
        s.compact();
    });
    let new = server_view(&api);
    let src = run.source.clone();
    let mut samples = 0usize;
    // The watchers back off (about 0.8 s) before relisting: sample lightly until the first
    // relist request reaches the server, then after every scheduler turn.
    let relisting = poll_until(DEADLINE, || {
        assert_old_or_new(&current(&src), &old, &new);
        samples += 1;
        RESOURCES
            .iter()
            .map(|r| api.count("list", r))
            .sum::<usize>()
            > lists_before
    })
    .await;
    assert!(relisting, "a relist started");
    let mut during_relist = 0usize;
    let converged = sample_until(DEADLINE, || {
        let v = current(&src);
        samples += 1;
        if v != new {
            during_relist += 1;
        }
        // Kind by kind the store swaps a whole relist in: exactly old or exactly new.
        assert_old_or_new(&v, &old, &new);
        v == new
    })
    .await;
    // The dense phase really did look at the source while the relist was in flight.
    assert!(
        during_relist >= 1,
        "no sample during the relist ({samples} samples)"
    );
    assert!(
        converged,
        "converged after relist: {:?}",
        current(&run.source)
    );
    assert!(expect_after_fault(&new));
    assert!(samples >= 1);
    // 7 Ingresses + 1 in pages of 2: the relist took several list requests.
    assert!(
        api.count("list", "ingresses") >= ingress_lists_before + 4,
        "relisted in pages"
    );
    run.stop().await;
}

#[tokio::test]
async fn refused_connections_keep_the_last_view_then_converge() {
    let api = FakeApi::start().await;
    seed_many(&api);
    let run = Running::start(&api, small_pages()).await;
    run.synced().await;
    let old = current(&run.source);

    api.refuse_connections();
    let refused_at_start = api.refused_connections();
    let src = run.source.clone();
    let mut samples = 0usize;
    // Workaround for a race in the fake (reported): a connection whose task first runs after
    // the kill may still serve one request (`select!` without `biased`), so the changes are
    // made only once the watchers have been refused, i.e. every old connection is gone.
    let cut = poll_until(DEADLINE, || {
        assert_eq!(
            current(&src),
            old,
            "view changed while the API refused connections"
        );
        samples += 1;
        api.refused_connections() >= refused_at_start + 6
    })
    .await;
    assert!(cut, "watchers were refused");
    api.atomically(change_during_fault);
    let new = server_view(&api);
    // While refused, every sample is exactly the last complete view. Keep sampling until the
    // watchers have retried (and been refused) a number of times more.
    let retried = poll_until(DEADLINE, || {
        assert_eq!(
            current(&src),
            old,
            "view changed while the API refused connections"
        );
        samples += 1;
        api.refused_connections() >= refused_at_start + 12
    })
    .await;
    assert!(retried, "watchers retried during the outage");
    assert!(samples > 1);
    assert!(run.source.watch_errors() > 0, "errors were seen, not fatal");
    assert!(run.source.is_synced(), "still synced: the view is complete");

    api.accept_connections();
    let src = run.source.clone();
    let converged = poll_until(DEADLINE, || {
        let v = current(&src);
        assert_keeps_stable(&v, &old, &new);
        v == new
    })
    .await;
    assert!(
        converged,
        "converged after recovery: {:?}",
        current(&run.source)
    );
    // The source still works normally after recovery.
    api.apply(
        ingress("ns4", "after", "after.example.com", "web"),
        "kubectl",
    )
    .expect("after");
    run.until("post-recovery change", |v| has(v, "Ingress", "ns4/after"))
        .await;
    run.stop().await;
}

// ------------------------------------------------------------------------------------------
// Publish service lookup

#[tokio::test]
async fn publish_service_outside_watched_namespaces_is_looked_up() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "a");
    api.apply(service("portico", "portico"), "kubectl")
        .expect("svc");
    api.apply(service("portico", "other"), "kubectl")
        .expect("svc");
    let config = SourceConfig {
        namespaces: vec!["a".into()],
        publish_service: Some(("portico".into(), "portico".into())),
        ..Default::default()
    };
    let run = Running::start(&api, config).await;
    run.synced().await;
    let src = run.source.clone();
    assert!(
        poll_until(DEADLINE, || src.service("portico", "portico").is_some()).await,
        "publish service seen"
    );
    assert!(run.source.service("a", "web").is_some());
    // Only that one Service in its namespace, and not part of Inputs.
    assert!(run.source.service("portico", "other").is_none());
    assert_eq!(
        names(&run.source.inputs().0.services),
        BTreeSet::from(["a/web".to_string()])
    );
    assert!(!run.source.watches_namespace("portico"));
    assert!(run.source.watches_namespace("a"));
    run.stop().await;
}

// ------------------------------------------------------------------------------------------
// Client

#[tokio::test]
async fn client_from_kubeconfig_path_talks_to_the_server() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = api.write_kubeconfig(dir.path()).expect("kubeconfig");
    let client = build_client(Some(&path), DEFAULT_API_TIMEOUT)
        .await
        .expect("client");
    let classes: kube::Api<k8s_openapi::api::networking::v1::IngressClass> = kube::Api::all(client);
    let list = classes
        .list(&kube::api::ListParams::default())
        .await
        .expect("list through the kubeconfig's server and token");
    assert_eq!(list.items.len(), 1);
}

#[tokio::test]
async fn missing_or_invalid_kubeconfig_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let Err(err) = build_client(Some(&missing), DEFAULT_API_TIMEOUT).await else {
        panic!("a missing kubeconfig must fail");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("cannot load kubeconfig") && msg.contains("nope"),
        "{msg}"
    );

    let bad = dir.path().join("bad");
    std::fs::write(&bad, "this: [is not a kubeconfig").expect("write");
    let Err(err) = build_client(Some(&bad), DEFAULT_API_TIMEOUT).await else {
        panic!("an invalid kubeconfig must fail");
    };
    assert!(err.to_string().contains("bad"), "{err}");
}

// ------------------------------------------------------------------------------------------
// RBAC and module rules

#[test]
fn every_reflected_kind_has_list_and_watch_in_api_needs() {
    for (group, resource) in watched_resources() {
        let need = rbac::find(&group, &resource, Scope::WatchedNamespaces)
            .or_else(|| rbac::find(&group, &resource, Scope::Cluster))
            .unwrap_or_else(|| panic!("{group}/{resource} missing from API_NEEDS"));
        for verb in ["list", "watch"] {
            assert!(
                need.verbs.contains(&verb),
                "{group}/{resource} lacks {verb}"
            );
        }
    }
    // IngressClass is the one cluster-scoped kind.
    assert!(rbac::find("networking.k8s.io", "ingressclasses", Scope::Cluster).is_some());
    assert!(API_NEEDS.iter().any(|n| n.resource == "leases"));
}

#[test]
fn rbac_doc_matches_api_needs() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/rbac.md");
    let want = rbac::markdown();
    // `PORTICO_BLESS=1 cargo test --test controller_source rbac_doc` rewrites the file.
    if std::env::var_os("PORTICO_BLESS").is_some() {
        std::fs::write(&path, &want).expect("write docs/rbac.md");
    }
    let doc = std::fs::read_to_string(&path).expect("docs/rbac.md exists");
    assert!(
        doc == want,
        "docs/rbac.md is out of date with src/controller/rbac.rs; regenerate it with \
         PORTICO_BLESS=1 cargo test --test controller_source rbac_doc"
    );
}

#[test]
fn controller_never_imports_the_proxy() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/controller");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("src/controller") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        for (n, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("//") {
                continue;
            }
            assert!(
                !line.contains("crate::proxy") && !line.contains("portico::proxy"),
                "{}:{}: imports the proxy",
                path.display(),
                n + 1
            );
        }
        checked += 1;
    }
    assert!(checked >= 3);
}

// ------------------------------------------------------------------------------------------
// Secret key material: only for referenced Secrets

/// A TLS Secret with a real certificate for `host` (so translate accepts it); returns the
/// object and the certificate PEM.
fn tls_secret(ns: &str, name: &str, host: &str) -> (Value, String) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec![host.to_string()]).expect("rcgen");
    let crt = cert.pem();
    let key = signing_key.serialize_pem();
    let b64 = |b: &str| serde_json::to_value(k8s_openapi::ByteString(b.as_bytes().to_vec()));
    let obj = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns},
        "data": {
            "tls.crt": b64(&crt).expect("b64"),
            "tls.key": b64(&key).expect("b64"),
            "ca.crt": b64("not kept").expect("b64"),
        }
    });
    (obj, crt)
}

/// An Ingress for `host` whose `spec.tls` names `secrets`.
fn tls_ingress(ns: &str, name: &str, host: &str, secrets: &[&str]) -> Value {
    let mut ing = ingress(ns, name, host, "web");
    ing["spec"]["tls"] = secrets
        .iter()
        .map(|s| json!({"hosts": [host], "secretName": s}))
        .collect();
    ing
}

/// `tls.crt` of `ns/name` in the source's inputs; `None` when listed without data; panics
/// when not listed at all (every TLS Secret is listed, metadata only or with data).
fn crt_of(source: &ClusterSource, ns: &str, name: &str) -> Option<String> {
    let (inputs, _) = source.inputs();
    let s = inputs
        .secrets
        .iter()
        .find(|s| {
            s.metadata.namespace.as_deref() == Some(ns) && s.metadata.name.as_deref() == Some(name)
        })
        .unwrap_or_else(|| panic!("{ns}/{name} listed"));
    let data = s.data.as_ref()?;
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, ["tls.crt", "tls.key"], "only the TLS keys are held");
    data.get("tls.crt")
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

fn held(source: &ClusterSource) -> BTreeSet<String> {
    source
        .secrets_with_data()
        .into_iter()
        .map(|(ns, n)| format!("{ns}/{n}"))
        .collect()
}

/// Key material is held for our Ingresses only: another controller's Ingress naming a Secret
/// (ingress-nginx during a migration) does not pull its private key into portico's memory,
/// until an IngressClass change makes that Ingress ours.
#[tokio::test]
async fn secret_data_is_held_for_our_ingresses_only() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    for name in ["ours-tls", "theirs-tls"] {
        let (s, _) = tls_secret("shop", name, "x.example.com");
        api.create(s).expect("secret");
    }
    api.apply(
        tls_ingress("shop", "ours", "ours.example.com", &["ours-tls"]),
        "kubectl",
    )
    .expect("our ingress");
    let mut theirs = tls_ingress("shop", "theirs", "theirs.example.com", &["theirs-tls"]);
    theirs["spec"]["ingressClassName"] = json!("nginx");
    api.apply(theirs, "kubectl").expect("their ingress");
    let config = SourceConfig {
        class: Some((
            "portico".to_string(),
            "portico.dev/ingress-controller".to_string(),
        )),
        ..SourceConfig::default()
    };
    let run = Running::start(&api, config).await;
    run.synced().await;
    assert_eq!(
        held(&run.source),
        BTreeSet::from(["shop/ours-tls".to_string()])
    );

    // The nginx class is handed to portico's controller: that Ingress is ours now.
    let mut nginx = ingress_class("nginx");
    nginx["metadata"]["name"] = json!("nginx");
    api.apply(nginx, "kubectl").expect("class");
    let source = run.source.clone();
    assert!(
        poll_until(DEADLINE, || held(&source).contains("shop/theirs-tls")).await,
        "held after the class change: {:?}",
        held(&source)
    );
    run.stop().await;
}

#[tokio::test]
async fn secret_data_follows_what_ingresses_reference() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    let (secure, crt) = tls_secret("shop", "secure-tls", "secure.example.com");
    api.create(secure).expect("secret");
    // Same name, other namespace: a reference from shop must not pull it in.
    let (elsewhere, _) = tls_secret("other", "secure-tls", "secure.example.com");
    api.create(elsewhere).expect("secret elsewhere");
    let run = Running::start(&api, SourceConfig::default()).await;
    run.synced().await;
    // Nothing references a Secret yet: all are listed, none with data, none fetched.
    assert_eq!(crt_of(&run.source, "shop", "secure-tls"), None);
    assert_eq!(crt_of(&run.source, "shop", "tls"), None);
    assert_eq!(crt_of(&run.source, "other", "secure-tls"), None);
    assert!(held(&run.source).is_empty());
    assert_eq!(api.count("get", "secrets"), 0);

    // Through the real rebuild loop: only a poke makes it build again, so the certificate
    // reaching the snapshot proves the fetched data poked the trigger.
    let (publisher, reader) = publish::channel();
    let rebuilder = Rebuilder::new(
        RebuildConfig::default(),
        publisher,
        Metrics::new(),
        run.trigger.clone(),
    );
    let (stop_rb, rb_rx) = watch::channel(false);
    let source = run.source.clone();
    let rb = tokio::spawn(async move { rebuilder.run(&*source, stopped(rb_rx)).await });
    assert!(
        poll_until(DEADLINE, || reader.load().is_some()).await,
        "first build"
    );
    assert!(
        reader
            .load()
            .is_some_and(|s| !s.tls.has_tls_for("secure.example.com"))
    );

    // An Ingress starts referencing it: data appears (only the TLS keys), and the snapshot
    // gets the certificate.
    api.apply(
        tls_ingress("shop", "secure", "secure.example.com", &["secure-tls"]),
        "kubectl",
    )
    .expect("tls ingress");
    let source = run.source.clone();
    assert!(
        poll_until(DEADLINE, || crt_of(&source, "shop", "secure-tls").is_some()).await,
        "referenced Secret's data fetched"
    );
    assert_eq!(crt_of(&run.source, "shop", "secure-tls"), Some(crt.clone()));
    assert_eq!(
        held(&run.source),
        BTreeSet::from(["shop/secure-tls".to_string()])
    );
    assert!(
        poll_until(DEADLINE, || reader
            .load()
            .is_some_and(|s| s.tls.has_tls_for("secure.example.com")))
        .await,
        "the fetched certificate reached the snapshot"
    );
    assert!(api.count("get", "secrets") >= 1);

    // The Ingress stops referencing it: the data is dropped.
    api.apply(
        ingress("shop", "secure", "secure.example.com", "web"),
        "kubectl",
    )
    .expect("tls removed");
    assert!(
        poll_until(DEADLINE, || held(&source).is_empty()).await,
        "unreferenced data dropped; held {:?}",
        held(&run.source)
    );
    assert_eq!(crt_of(&run.source, "shop", "secure-tls"), None);
    assert!(
        poll_until(DEADLINE, || reader
            .load()
            .is_some_and(|s| !s.tls.has_tls_for("secure.example.com")))
        .await,
        "the certificate left the snapshot"
    );

    // Referenced again, then the Secret is deleted: the data goes with it.
    api.apply(
        tls_ingress("shop", "secure", "secure.example.com", &["secure-tls"]),
        "kubectl",
    )
    .expect("tls again");
    assert!(
        poll_until(DEADLINE, || crt_of(&source, "shop", "secure-tls").is_some()).await,
        "fetched again"
    );
    api.delete("v1", "Secret", "shop", "secure-tls")
        .expect("delete secret");
    assert!(
        poll_until(DEADLINE, || held(&source).is_empty()).await,
        "deleted Secret's data dropped"
    );
    assert_eq!(crt_of(&run.source, "other", "secure-tls"), None);

    let _ = stop_rb.send(true);
    tokio::time::timeout(DEADLINE, rb)
        .await
        .expect("rebuilder stops")
        .expect("no panic");
    run.stop().await;
}

#[tokio::test]
async fn first_sync_waits_for_referenced_data_and_keeps_the_default_certificate() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    let (secure, crt) = tls_secret("shop", "secure-tls", "secure.example.com");
    api.create(secure).expect("secret");
    let (default, default_crt) = tls_secret("infra", "default-cert", "fallback.example.com");
    api.create(default).expect("default secret");
    api.apply(
        tls_ingress("shop", "secure", "secure.example.com", &["secure-tls"]),
        "kubectl",
    )
    .expect("tls ingress");
    let run = Running::start(
        &api,
        SourceConfig {
            default_certificate: Some(("infra".into(), "default-cert".into())),
            ..Default::default()
        },
    )
    .await;
    run.synced().await;
    // No polling: the inputs at sync time already carry the referenced data.
    assert_eq!(crt_of(&run.source, "shop", "secure-tls"), Some(crt));
    assert_eq!(
        crt_of(&run.source, "infra", "default-cert"),
        Some(default_crt.clone())
    );
    assert_eq!(crt_of(&run.source, "shop", "tls"), None);
    assert_eq!(
        held(&run.source),
        BTreeSet::from([
            "infra/default-cert".to_string(),
            "shop/secure-tls".to_string()
        ])
    );
    // And translate turns them into certificates.
    let (snapshot, _) = translate::translate(
        &run.source.inputs().0,
        &Options {
            default_certificate: Some(("infra".into(), "default-cert".into())),
            ..Options::default()
        },
    );
    assert!(snapshot.tls.has_tls_for("secure.example.com"));
    assert!(snapshot.tls.default.is_some());

    // No Ingress references the default certificate; deleting the only Ingress keeps it.
    api.delete("networking.k8s.io/v1", "Ingress", "shop", "secure")
        .expect("delete ingress");
    let source = run.source.clone();
    assert!(
        poll_until(DEADLINE, || crt_of(&source, "shop", "secure-tls").is_none()).await,
        "secure-tls dropped"
    );
    assert_eq!(
        crt_of(&run.source, "infra", "default-cert"),
        Some(default_crt)
    );
    run.stop().await;
}

#[tokio::test]
async fn rotated_referenced_secret_is_fetched_again() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    let (secure, crt1) = tls_secret("shop", "secure-tls", "secure.example.com");
    api.create(secure).expect("secret");
    api.apply(
        tls_ingress("shop", "secure", "secure.example.com", &["secure-tls"]),
        "kubectl",
    )
    .expect("tls ingress");
    let run = Running::start(&api, SourceConfig::default()).await;
    run.synced().await;
    assert_eq!(
        crt_of(&run.source, "shop", "secure-tls"),
        Some(crt1.clone())
    );
    let gets = api.count("get", "secrets");

    let (rotated, crt2) = tls_secret("shop", "secure-tls", "secure.example.com");
    assert_ne!(crt1, crt2);
    let mut live = api.get("v1", "Secret", "shop", "secure-tls").expect("get");
    live["data"] = rotated["data"].clone();
    api.update(live).expect("rotate");
    let source = run.source.clone();
    assert!(
        poll_until(DEADLINE, || crt_of(&source, "shop", "secure-tls")
            == Some(crt2.clone()))
        .await,
        "rotated data fetched"
    );
    assert!(api.count("get", "secrets") > gets);
    // Unrelated changes (a new Service) do not fetch the unchanged Secret again: after them,
    // a newly referenced Secret is the only GET (the keeper's rounds run in order, so once
    // "second" is held every earlier change was reconciled).
    let gets = api.count("get", "secrets");
    api.apply(service("shop", "another"), "kubectl")
        .expect("service");
    run.until("another", |v| has(v, "Service", "shop/another"))
        .await;
    let (second, _) = tls_secret("shop", "second", "second.example.com");
    api.create(second).expect("second secret");
    api.apply(
        tls_ingress("shop", "second", "second.example.com", &["second"]),
        "kubectl",
    )
    .expect("second ingress");
    assert!(
        poll_until(DEADLINE, || held(&source).contains("shop/second")).await,
        "second fetched"
    );
    assert_eq!(api.count("get", "secrets"), gets + 1);
    assert_eq!(crt_of(&run.source, "shop", "secure-tls"), Some(crt2));
    run.stop().await;
}

#[tokio::test]
async fn failed_secret_fetches_are_retried_and_404_waits_for_a_new_version() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    let (secure, crt) = tls_secret("shop", "secure-tls", "secure.example.com");
    api.create(secure).expect("secret");
    api.apply(
        tls_ingress("shop", "secure", "secure.example.com", &["secure-tls"]),
        "kubectl",
    )
    .expect("tls ingress");
    let proxy = RecordingProxy::start(api.addr()).await;
    // Two server errors (not retried by kube's client: only 429/503/504 are): the keeper
    // retries with its own backoff (0.8 s, then 1.6 s).
    proxy.fail_secret_gets(&[500, 500]);
    let run = Running::start_with_client(proxy.client(&api).await, SourceConfig::default());
    // A failed fetch does not hold the first sync back (the rest of the cluster is served).
    run.synced().await;
    let source = run.source.clone();
    assert!(
        poll_until(DEADLINE, || crt_of(&source, "shop", "secure-tls").is_some()).await,
        "fetched after the retries"
    );
    assert_eq!(crt_of(&run.source, "shop", "secure-tls"), Some(crt));
    assert_eq!(proxy.secret_gets(), 3, "two failures, one success");

    // A 404 (the Secret is gone as far as the server knows) is not retried for the same
    // resourceVersion; a new version is fetched.
    let (rotated, crt2) = tls_secret("shop", "secure-tls", "secure.example.com");
    proxy.fail_secret_gets(&[404]);
    let mut live = api.get("v1", "Secret", "shop", "secure-tls").expect("get");
    live["data"] = rotated["data"].clone();
    api.update(live.clone()).expect("rotate");
    assert!(
        poll_until(DEADLINE, || proxy.secret_gets() == 4).await,
        "the rotation was fetched (and answered 404)"
    );
    assert!(
        poll_until(DEADLINE, || crt_of(&source, "shop", "secure-tls").is_none()).await,
        "a 404 drops the data"
    );
    // Retries would come after 0.8 s; give them well over that to show there are none.
    assert!(
        !poll_until(Duration::from_secs(2), || proxy.secret_gets() > 4).await,
        "no retry after a 404"
    );
    let mut live = api.get("v1", "Secret", "shop", "secure-tls").expect("get");
    live["metadata"]["labels"] = json!({"touched": "yes"});
    api.update(live).expect("touch");
    assert!(
        poll_until(DEADLINE, || crt_of(&source, "shop", "secure-tls")
            == Some(crt2.clone()))
        .await,
        "a new resourceVersion is fetched again"
    );
    run.stop().await;
}

/// The `SecretNotFound` / `SecretWrongType` reasons translate gives for `shop`'s TLS entries.
fn secret_reasons(source: &ClusterSource) -> BTreeSet<String> {
    let (_, diagnostics) = translate::translate(&source.inputs().0, &Options::default());
    diagnostics
        .iter()
        .filter(|d| d.reason.starts_with("Secret"))
        .map(|d| format!("{}: {}", d.reason, d.message))
        .collect()
}

/// A referenced Secret of another type (an Opaque Secret holding `tls.crt`/`tls.key`, which
/// ingress-nginx accepted) is never listed by the TLS-only watch; it is reported as the wrong
/// type, not as missing, and its data is never held.
#[tokio::test]
async fn a_referenced_secret_of_another_type_is_reported_as_such() {
    let api = FakeApi::start().await;
    api.apply(ingress_class("portico"), "kubectl")
        .expect("class");
    seed(&api, "shop");
    api.apply(
        secret("shop", "migrated", "Opaque", &["tls.crt", "tls.key"]),
        "kubectl",
    )
    .expect("opaque");
    api.apply(
        tls_ingress(
            "shop",
            "secure",
            "secure.example.com",
            &["migrated", "absent"],
        ),
        "kubectl",
    )
    .expect("ingress");
    let run = Running::start(&api, SourceConfig::default()).await;
    run.synced().await;

    // Known at the first sync already: a placeholder with the type and no data.
    let (inputs, _) = run.source.inputs();
    let listed: Vec<_> = inputs
        .secrets
        .iter()
        .filter(|s| s.metadata.name.as_deref() == Some("migrated"))
        .collect();
    assert_eq!(listed.len(), 1, "{:?}", names(&inputs.secrets));
    assert_eq!(listed[0].type_.as_deref(), Some("Opaque"));
    assert_eq!(listed[0].data, None);
    assert!(!names(&inputs.secrets).contains("shop/absent"));
    assert!(held(&run.source).is_empty());
    let reasons = secret_reasons(&run.source);
    assert!(
        reasons.contains(
            "SecretWrongType: tls: Secret shop/migrated has type \"Opaque\", expected kubernetes.io/tls"
        ) && reasons.contains("SecretNotFound: tls: Secret shop/absent not found"),
        "{reasons:?}"
    );

    // No longer referenced: the placeholder goes.
    api.apply(
        tls_ingress("shop", "secure", "secure.example.com", &["absent"]),
        "kubectl",
    )
    .expect("unreferenced");
    let source = run.source.clone();
    assert!(
        poll_until(DEADLINE, || !names(&source.inputs().0.secrets)
            .contains("shop/migrated"))
        .await,
        "placeholder dropped"
    );

    // Referenced again: looked up at once, not at the next periodic probe.
    api.apply(
        tls_ingress("shop", "secure", "secure.example.com", &["migrated"]),
        "kubectl",
    )
    .expect("referenced again");
    assert!(
        poll_until(DEADLINE, || secret_reasons(&source)
            .iter()
            .any(|r| r.starts_with("SecretWrongType")))
        .await,
        "wrong type reported again: {:?}",
        secret_reasons(&run.source)
    );

    // Recreated as a TLS Secret (a type is immutable): served, the placeholder gone.
    api.delete("v1", "Secret", "shop", "migrated")
        .expect("delete");
    let (tls, crt) = tls_secret("shop", "migrated", "secure.example.com");
    api.create(tls).expect("recreate");
    assert!(
        poll_until(DEADLINE, || crt_of(&source, "shop", "migrated").as_ref()
            == Some(&crt))
        .await,
        "the TLS Secret's data is held"
    );
    let (inputs, _) = run.source.inputs();
    assert_eq!(
        inputs
            .secrets
            .iter()
            .filter(|s| s.metadata.name.as_deref() == Some("migrated"))
            .count(),
        1
    );
    assert!(
        secret_reasons(&run.source).is_empty(),
        "{:?}",
        secret_reasons(&run.source)
    );
    run.stop().await;
}
