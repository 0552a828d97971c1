//! A fake Kubernetes API server for controller tests: real HTTP on 127.0.0.1:0 speaking the
//! documented list/watch protocol (https://kubernetes.io/docs/reference/using-api/api-concepts/),
//! a kubeconfig for the real kube client, an in-process test API, and fault injection.
//! Test support only: must not import portico (`src/`) code, so it stays a faithful stand-in
//! for the apiserver rather than a mirror of our own assumptions.
//!
//! Include it with `#[path = "support/fake_api/mod.rs"] mod fake_api;`.
//!
//! Transport: plain `http://`. kube 5 with `rustls-tls` builds its connector with
//! `hyper_rustls::HttpsConnectorBuilder::https_or_http()` and `enforce_http(false)`, so an
//! `http://` server URL works and a token user is sent as `Authorization: Bearer`. The client
//! speaks HTTP/1.1 only (it calls `enable_http1()`), so watch streams are chunked bodies.
//!
//! Retries: kube's default client (`RetryPolicy::server_retry`) retries 429, 503 and 504
//! responses up to 15 times with exponential backoff from 5 ms, honouring `Retry-After`;
//! transport errors are not retried. So a fault test that wants the client to *see* an error
//! must use something else (the fake's refused connections, 410, 409, …), and the 504 this fake
//! answers for a list at a resourceVersion it has not reached is retried for a long time.
//!
//! Watcher defaults this fake serves (kube-runtime 5 `watcher::Config::default()`): the
//! `ListWatch` initial strategy (paged list with `limit=500`, then
//! `watch=true&resourceVersion=<list RV>&allowWatchBookmarks=true&timeoutSeconds=290`).
//! `sendInitialEvents=true` (streaming lists) is also served: synthetic ADDED events, then a
//! BOOKMARK annotated `k8s.io/initial-events-end: "true"`.

//!
//! Time: the watch timeout and bookmark period run on tokio time. Use the fake with real time
//! (it serves real sockets); under `start_paused = true` auto-advance would fire watch
//! timeouts at once and make clients re-watch in a loop.
//!
//! Encoding, as the real server does it: lists are `kind: <Kind>List` with `apiVersion` and
//! `metadata.resourceVersion` = the server's global resourceVersion; items of built-in types
//! omit apiVersion/kind (typed JSON encoder), items of custom types (`ResourceType::custom`)
//! keep them (unstructured); get, write responses and watch event objects always carry them.
//!
//! Known differences from a real apiserver (deliberate, small):
//! - strategic merge patch is served as JSON merge patch (only list merge keys differ);
//! - server-side apply is a field-set model (see `patch.rs`): maps merge, lists are atomic,
//!   conflicts only against other *Apply* managers; updates record no managedFields;
//! - no admission: namespaces need not exist, no defaulting or validation of specs;
//! - field selectors accept any dotted path (the real server allows a per-type set);
//! - a watch from a resourceVersion newer than the server's just waits for it; a list at such
//!   a version is 504 (which kube retries);
//! - JSON only (no protobuf/CBOR, no `Table`), no discovery documents (only `/version` and
//!   the health checks), `dryRun` is refused with 400 rather than silently persisted.

#![allow(dead_code)] // Each test binary that includes this module uses a different part of it.

pub mod patch;
pub mod selector;
pub mod server;
pub mod store;

pub use server::StallMode;
pub use store::{ApiError, RequestRecord, ResourceType, State};

use serde_json::{Value, json};
use server::Shared;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// The bearer token the generated kubeconfig carries and the server requires.
pub const TOKEN: &str = "fake-api-token";

#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("(de)serialising a typed object: {0}")]
    Serde(#[from] serde_json::Error),
}

/// The types portico's controller reads and writes.
pub fn portico_types() -> Vec<ResourceType> {
    vec![
        ResourceType::new("", "v1", "Service", "services", true)
            .with_status()
            .without_generation(),
        ResourceType::new("", "v1", "Secret", "secrets", true).without_generation(),
        ResourceType::new("", "v1", "Namespace", "namespaces", false)
            .with_status()
            .without_generation(),
        ResourceType::new("networking.k8s.io", "v1", "Ingress", "ingresses", true).with_status(),
        ResourceType::new(
            "networking.k8s.io",
            "v1",
            "IngressClass",
            "ingressclasses",
            false,
        ),
        ResourceType::new(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
        ),
        ResourceType::new(
            "portico.dev",
            "v1alpha1",
            "RateLimitPolicy",
            "ratelimitpolicies",
            true,
        )
        .with_status()
        .custom(),
        ResourceType::new("coordination.k8s.io", "v1", "Lease", "leases", true)
            .without_generation(),
        ResourceType::new("events.k8s.io", "v1", "Event", "events", true).without_generation(),
    ]
}

/// Server options; `Options::default()` registers [`portico_types`].
#[derive(Debug, Clone)]
pub struct Options {
    pub types: Vec<ResourceType>,
    /// Period of the BOOKMARK events sent to watches with `allowWatchBookmarks=true`.
    pub bookmark_interval: Duration,
    /// Used when a watch request has no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            types: portico_types(),
            bookmark_interval: Duration::from_secs(1),
            default_watch_timeout: Duration::from_secs(1800),
        }
    }
}

/// A running fake API server; stops serving when dropped.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
    resume: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The failing test's view of the API: what arrived, when, and what was refused.
            let state = self.shared.lock();
            eprintln!(
                "---- fake API: {} requests, {} connections refused ----",
                state.requests.len(),
                self.shared.refused.load(Ordering::SeqCst)
            );
            for r in &state.requests {
                eprintln!(
                    "{:>9.3}s {} {}{} ns={} name={}{}",
                    r.at.as_secs_f64(),
                    r.verb,
                    r.resource,
                    r.subresource
                        .as_deref()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                    r.namespace.as_deref().unwrap_or("-"),
                    r.name.as_deref().unwrap_or("-"),
                    r.stalled
                        .map(|m| format!(" (stalled: {m:?})"))
                        .unwrap_or_default(),
                );
            }
        }
        self.accept.abort();
        if let Ok(mut r) = self.resume.lock()
            && let Some(h) = r.take()
        {
            h.abort();
        }
        self.shared.kill.send_modify(|g| *g += 1);
    }
}

fn object_ref(api_version: &str, kind: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind})
}

impl FakeApi {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (kill, _) = tokio::sync::watch::channel(0u64);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(opts.types)),
            token: TOKEN.to_string(),
            refusing: Default::default(),
            refused: Default::default(),
            kill,
            bookmark_interval: opts.bookmark_interval,
            default_watch_timeout: opts.default_watch_timeout,
            stalls: Default::default(),
            forbidden: Default::default(),
            started: tokio::time::Instant::now(),
        });
        let accept = tokio::spawn(server::accept_loop(listener, shared.clone()));
        FakeApi {
            shared,
            addr,
            accept,
            resume: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig with one cluster (this server), one token user and `namespace: default`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
contexts:
- name: fake
  context:
    cluster: fake
    user: tester
    namespace: default
current-context: fake
users:
- name: tester
  user:
    token: {TOKEN}
",
            url = self.url()
        )
    }

    pub fn write_kubeconfig(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_yaml())?;
        Ok(path)
    }

    /// A real `kube::Client` built from [`Self::kubeconfig_yaml`], as the controller builds one.
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml())
            .expect("kubeconfig parses");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("kubeconfig loads");
        kube::Client::try_from(config).expect("client builds")
    }

    /// Runs `f` under the store's single lock: several writes and faults land atomically with
    /// respect to every list and watch (e.g. drop watches, write, compact — so resuming
    /// watchers deterministically carry a stale resourceVersion).
    pub fn atomically<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.shared.lock())
    }

    fn with_type<R>(
        &self,
        obj: &Value,
        f: impl FnOnce(&mut State, usize) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        let mut s = self.shared.lock();
        let ty = s.type_of_object(obj)?;
        f(&mut s, ty)
    }

    /// Creates `obj` (namespace from its metadata), as a POST would: for kinds with a status
    /// subresource the status is dropped, so seed it with [`Self::update_status`] after.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        self.with_type(&obj.clone(), |s, ty| {
            let ns = store::namespace_of(&obj).to_string();
            s.create(ty, &ns, obj)
        })
    }

    /// [`Self::create`] for k8s-openapi (or kube `CustomResource`) values, which serialise
    /// with apiVersion and kind.
    pub fn create_typed<K: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        obj: &K,
    ) -> Result<K, FakeApiError> {
        let created = self.create(serde_json::to_value(obj)?)?;
        Ok(serde_json::from_value(created)?)
    }

    /// Replaces `obj` (PUT semantics, including the resourceVersion precondition).
    pub fn update(&self, obj: Value) -> Result<Value, ApiError> {
        self.with_type(&obj.clone(), |s, ty| {
            let (ns, name) = (
                store::namespace_of(&obj).to_string(),
                store::name_of(&obj).to_string(),
            );
            s.update(ty, &ns, &name, obj, false)
        })
    }

    /// PUT on `/status`.
    pub fn update_status(&self, obj: Value) -> Result<Value, ApiError> {
        self.with_type(&obj.clone(), |s, ty| {
            let (ns, name) = (
                store::namespace_of(&obj).to_string(),
                store::name_of(&obj).to_string(),
            );
            s.update(ty, &ns, &name, obj, true)
        })
    }

    /// Server-side apply on the main resource with `force=true`.
    pub fn apply(&self, obj: Value, manager: &str) -> Result<Value, ApiError> {
        self.with_type(&obj.clone(), |s, ty| {
            let (ns, name) = (
                store::namespace_of(&obj).to_string(),
                store::name_of(&obj).to_string(),
            );
            s.apply(
                ty,
                &ns,
                &name,
                &obj,
                store::ApplyOptions {
                    field_manager: Some(manager),
                    force: true,
                    status: false,
                },
            )
        })
    }

    /// Server-side apply on `/status` with `force=true`.
    pub fn apply_status(&self, obj: Value, manager: &str) -> Result<Value, ApiError> {
        self.with_type(&obj.clone(), |s, ty| {
            let (ns, name) = (
                store::namespace_of(&obj).to_string(),
                store::name_of(&obj).to_string(),
            );
            s.apply(
                ty,
                &ns,
                &name,
                &obj,
                store::ApplyOptions {
                    field_manager: Some(manager),
                    force: true,
                    status: true,
                },
            )
        })
    }

    pub fn merge_patch(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        self.with_type(&object_ref(api_version, kind), |s, ty| {
            s.merge_patch(ty, ns, name, patch, false)
        })
    }

    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.with_type(&object_ref(api_version, kind), |s, ty| {
            s.delete(ty, ns, name, None, None)
        })
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.with_type(&object_ref(api_version, kind), |s, ty| s.get(ty, ns, name))
    }

    /// Every stored object of a type (all namespaces), in key order, with apiVersion/kind.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        self.with_type(&object_ref(api_version, kind), |s, ty| Ok(s.all(ty)))
            .unwrap_or_default()
    }

    /// The server's current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    /// Bounded polling (every 10 ms) until `pred` holds on the store, or `deadline` passes.
    pub async fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        mut pred: impl FnMut(&State) -> bool,
    ) -> Result<(), FakeApiError> {
        let what = what.to_string();
        poll_until(deadline, || pred(&self.shared.lock()))
            .await
            .then_some(())
            .ok_or(FakeApiError::Timeout(deadline, what))
    }

    /// Fault: end every open watch stream now (clients see EOF and re-watch).
    pub fn drop_watches(&self) {
        self.shared.lock().drop_watches();
    }

    /// Fault: compact history up to the current resourceVersion; resuming watches from
    /// older versions get an in-stream ERROR 410 Expired, continue tokens a 410 response.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Test hook: one BOOKMARK now on every watch that allowed bookmarks.
    pub fn send_bookmarks(&self) {
        self.shared.lock().bookmark_all();
    }

    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches()
    }

    /// Fault: cut every open connection (watch streams included) and close new ones at once,
    /// until [`Self::accept_connections`]. The port stays bound, so clients resume on it.
    pub fn refuse_connections(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
        self.shared.lock().drop_watches();
        self.shared.kill.send_modify(|g| *g += 1);
    }

    /// Connections closed by the refuse fault so far.
    pub fn refused_connections(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    pub fn accept_connections(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
    }

    /// [`Self::refuse_connections`] now, [`Self::accept_connections`] after `d`.
    pub fn refuse_connections_for(&self, d: Duration) {
        self.refuse_connections();
        let shared = self.shared.clone();
        let h = tokio::spawn(async move {
            tokio::time::sleep(d).await;
            shared.refusing.store(false, Ordering::SeqCst);
        });
        if let Ok(mut r) = self.resume.lock()
            && let Some(old) = r.replace(h)
        {
            old.abort();
        }
    }

    /// Fault: from now on, requests with this verb (`create`, `get`, …) on this resource
    /// (`events`) in `namespace` are refused with 403 Forbidden, as RBAC refuses them.
    pub fn forbid(&self, verb: &str, resource: &str, namespace: &str) {
        self.shared
            .forbidden
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((
                verb.to_string(),
                resource.to_string(),
                namespace.to_string(),
            ));
    }

    /// Undoes [`Self::forbid`] for these three (a grant added later).
    pub fn allow(&self, verb: &str, resource: &str, namespace: &str) {
        self.shared
            .forbidden
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(v, r, n)| {
                (v.as_str(), r.as_str(), n.as_str()) != (verb, resource, namespace)
            });
    }

    /// Fault: leave the next `count` requests with this verb (`list`, `get`, `watch`, …) and
    /// resource (`ingresses`) unanswered, as `mode` says. The client sees no error: only its
    /// own deadline ends such a request.
    pub fn stall(&self, verb: &str, resource: &str, mode: StallMode, count: usize) {
        let mut stalls = self.shared.stalls.lock().unwrap_or_else(|p| p.into_inner());
        stalls.push(server::Stall {
            verb: verb.to_string(),
            resource: resource.to_string(),
            mode,
            remaining: count,
        });
    }

    /// Every request served so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests().to_vec()
    }

    /// Distinct field managers that wrote `<resource>/status` ("" for writes without one):
    /// "exactly one status writer" assertions.
    pub fn status_writers(&self, resource: &str) -> std::collections::BTreeSet<String> {
        self.shared.lock().status_writers(resource)
    }

    /// Requests by Kubernetes verb and resource (`"ingresses"`, or `"ingresses/status"`).
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.shared
            .lock()
            .request_counts()
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

/// Bounded polling: true once `f` holds, false when `deadline` passes first.
pub async fn poll_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
