//! The cluster as a rebuild [`Source`]: kube-runtime reflectors on Ingress, IngressClass,
//! Service, EndpointSlice, Secret (TLS only) and RateLimitPolicy, whose stores become
//! [`Inputs`].
//!
//! Owns: the watchers, their stores, the "all stores synced" signal and change pokes. May
//! import translate (Inputs), rebuild (Source, Trigger), crd, kube, k8s-openapi, tokio. Must not
//! import the proxy.
//!
//! # Never a partial view
//!
//! kube-runtime's `reflector::store::Writer` (kube-runtime 5.0 `reflector/store.rs`,
//! `apply_watcher_event`) buffers a (re)list: `Init` clears a side buffer, `InitApply` fills
//! the buffer, and only `InitDone` swaps it into the readable store. So from its first
//! `InitDone` on, a store always holds one complete list: the previous one while a relist after
//! a 410 Gone (in-stream `ERROR` or an expired continue token; `watcher.rs` returns to
//! `State::Empty` on code 410) is in flight, and the last one while the API server cannot be
//! reached (a dropped watch resumes from its last resourceVersion, `State::InitListed`, with
//! no relist at all). What [`ClusterSource`] adds is the cross-kind rule: [`Source::inputs`]
//! is empty until *every* store has had its first `InitDone` ([`ClusterSource::is_synced`]),
//! and from then on it reads all stores. The app must await [`ClusterSource::synced`] before
//! the first build, so the first published snapshot (and `/readyz` 200) is a whole cluster.
//!
//! # Watches
//!
//! - Namespaced kinds: one watcher over all namespaces when [`SourceConfig::namespaces`] is
//!   empty, else one watcher per listed namespace per kind (each with its own store: a kube
//!   store must not be shared by two reflectors). IngressClass is cluster-scoped: one watcher.
//! - Secrets: `fieldSelector=type=kubernetes.io/tls` on the list and the watch, so other
//!   Secrets never leave the API server (a Secret's `type` is immutable, so a listed Secret
//!   cannot turn into another type). The reflector keeps *metadata only* (`data` and
//!   `stringData` are stripped); `tls.crt`/`tls.key` are held, in a separate map, only for
//!   Secrets something references (an Ingress `spec.tls[].secretName` in its namespace, or
//!   [`SourceConfig::default_certificate`]), fetched with `GET` by a background task and
//!   dropped as soon as nothing references them ([`super::secret_data`]). [`Source::inputs`]
//!   lists every TLS Secret, with data re-attached for the referenced ones, and a metadata-only
//!   placeholder for each referenced Secret of another type (so translate says "wrong type",
//!   not "not found"). The first sync also waits until every Secret referenced at that point
//!   was fetched or looked up (or failed).
//! - Every kind: `metadata.managedFields` and the `kubectl.kubernetes.io/last-applied-
//!   configuration` annotation are dropped before the store (memory; and for Secrets the
//!   annotation can hold a copy of the whole Secret, keys included).
//! - Services and EndpointSlices are converted to translate's compact [`Svc`] and [`Slice`]
//!   before the store (the `keep` step of each watcher, ahead of `reflector`), so neither the
//!   store nor its Init/InitApply buffer holds the k8s-openapi form; the store keys them by
//!   namespace and name through the [`Lookup`] impls below, which also carry the
//!   resourceVersion. [`Svc`] keeps the addresses the status writer reads from the
//!   `--publish-service` Service (load-balancer ingress, external IPs, cluster IP).
//! - kube's default backoff (`WatchStreamExt::default_backoff`, exponential from 800 ms to
//!   30 s) sits on every watcher: an error is logged and retried, it never ends the stream.
//! - Each applied event (`Apply`, `Delete`, `InitDone`) pokes the rebuild [`Trigger`] and bumps
//!   [`ClusterSource::changes`]; `Init`/`InitApply` change nothing readable and do not.
//! - `--publish-service`: when its namespace is not watched, one extra watcher on exactly that
//!   Service (field selector `metadata.name`) feeds [`ClusterSource::service`]; it is not part
//!   of [`Inputs`] and does not gate [`ClusterSource::is_synced`].
//! - `--default-certificate`: when its namespace is not watched, one extra Secret watcher on
//!   exactly that Secret (field selectors `metadata.name` and the TLS type) joins the Secret
//!   stores, so it is an input and its data is kept like any referenced Secret's. It gates the
//!   first sync like the other stores (the first snapshot serves that certificate) until its
//!   first error: without RBAC for it, portico becomes ready with the generated fallback and
//!   the diagnostic, and picks the certificate up once a grant lets the watcher list.
//! - A kind the API server does not serve (its list answers 404: the RateLimitPolicy CRD not
//!   installed) has no objects, so its empty store counts as listed for the first sync; the
//!   watcher keeps retrying and fills the store once the kind is served. Any other error
//!   (403, 5xx) keeps the first sync waiting: objects of that kind may exist.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use std::borrow::Cow;

use kube::runtime::reflector::{self, Lookup, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::secret_data::{Keeper, SecretData};
use crate::crd::RateLimitPolicy;
use crate::rebuild::{Source, Trigger};
use crate::translate::{Diagnostic, Inputs, Slice, Svc};

/// The field selector that limits the Secret watch to TLS Secrets (Kubernetes API docs,
/// "Field Selectors": Secrets support `type`).
pub const TLS_SECRET_SELECTOR: &str = "type=kubernetes.io/tls";
/// The only Secret data keys kept in memory (`kubernetes.io/tls` Secrets: "tls.crt", "tls.key").
pub const TLS_SECRET_KEYS: [&str; 2] = ["tls.crt", "tls.key"];
/// Annotation `kubectl apply` writes with the whole last-applied object; dropped on every kind.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What the source watches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceConfig {
    /// `--watch-namespace`: empty means all namespaces. Empty names are ignored, duplicates
    /// collapse.
    pub namespaces: Vec<String>,
    /// `--publish-service ns/name`, so [`ClusterSource::service`] can answer for it even when
    /// its namespace is not watched.
    pub publish_service: Option<(String, String)>,
    /// List page size (kube's default, 500, when `None`). Tests use small pages so a relist
    /// takes several requests.
    pub page_size: Option<u32>,
    /// `--default-certificate ns/name`: its Secret's data is held even when no Ingress names
    /// it.
    pub default_certificate: Option<(String, String)>,
    /// `--ingress-class` and `--controller-name`: Secret data is held only for Ingresses of our
    /// class (translate's rule). `None`: for every Ingress.
    pub class: Option<(String, String)>,
}

impl SourceConfig {
    /// The watched namespaces, sorted and deduplicated; `None` for all namespaces.
    pub fn watched_namespaces(&self) -> Option<Vec<String>> {
        let set: BTreeSet<String> = self
            .namespaces
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        (!set.is_empty()).then(|| set.into_iter().collect())
    }
}

/// `(group, plural)` of every kind the source reflects, from the same types the watchers use
/// (for the RBAC check in tests and docs).
pub fn watched_resources() -> Vec<(String, String)> {
    fn id<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    vec![
        id::<Ingress>(),
        id::<IngressClass>(),
        id::<Service>(),
        id::<EndpointSlice>(),
        id::<Secret>(),
        id::<RateLimitPolicy>(),
    ]
}

/// State the reflector tasks share with the source.
#[derive(Debug)]
struct Shared {
    /// Stores that have not completed their first list yet.
    unsynced: AtomicUsize,
    /// Every store listed once; the Secret-data keeper then does its first round and flips
    /// `synced`.
    stores_synced: watch::Sender<bool>,
    synced: watch::Sender<bool>,
    changes: watch::Sender<u64>,
    /// Bumped only by the kinds that decide which Secret data is held (Ingress, Secret), so
    /// EndpointSlice churn never wakes the Secret-data keeper.
    secret_refs: watch::Sender<u64>,
    watch_errors: AtomicU64,
    trigger: Trigger,
}

impl Shared {
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        self.trigger.poke();
    }

    /// A change of `kind`: [`Self::changed`], and a wake-up for the Secret-data keeper when the
    /// kind can change which Secrets are referenced (an IngressClass decides which Ingresses
    /// are ours) or their versions.
    fn changed_kind(&self, kind: &str) {
        if matches!(kind, "Ingress" | "IngressClass" | "Secret") {
            self.secret_refs.send_modify(|n| *n = n.wrapping_add(1));
        }
        self.changed();
    }

    fn first_sync(&self) {
        // `fetch_sub` returns the previous value: 1 means this was the last store.
        if self.unsynced.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.stores_synced.send_replace(true);
        }
    }
}

/// The cluster source; see the module doc. Cheap to share (`Arc`), all reads are lock-light
/// store reads.
#[derive(Debug)]
pub struct ClusterSource {
    namespaces: Option<Vec<String>>,
    ingresses: Vec<Store<Ingress>>,
    ingress_classes: Store<IngressClass>,
    /// In translate's compact form ([`Svc`]): converted before the store.
    services: Vec<Store<Svc>>,
    /// In translate's compact form ([`Slice`]): converted before the store.
    endpoint_slices: Vec<Store<Slice>>,
    secrets: Vec<Store<Secret>>,
    /// Key material of referenced Secrets (the `secrets` stores hold metadata only).
    secret_data: Arc<SecretData>,
    policies: Vec<Store<RateLimitPolicy>>,
    /// The extra watcher on `--publish-service` when its namespace is not watched.
    publish_service: Option<Store<Svc>>,
    shared: Arc<Shared>,
    synced: watch::Receiver<bool>,
}

impl Source for ClusterSource {
    fn inputs(&self) -> (Inputs, Vec<Diagnostic>) {
        // Before every store listed once there is no complete view to give; after that each
        // store always holds a complete list (module doc), so reading them all is one.
        if !self.is_synced() {
            return (Inputs::default(), Vec::new());
        }
        let inputs = Inputs {
            ingresses: all(&self.ingresses),
            ingress_classes: self.ingress_classes.state(),
            services: all(&self.services),
            endpoint_slices: all(&self.endpoint_slices),
            secrets: self.secret_data.attach(all(&self.secrets)),
            rate_limit_policies: all(&self.policies),
        };
        (inputs, Vec::new())
    }
}

fn all<K>(stores: &[Store<K>]) -> Vec<Arc<K>>
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let mut out = Vec::new();
    for s in stores {
        out.extend(s.state());
    }
    out
}

/// Per-watcher settings handed to [`spawn_reflector`]: objects of kind `K` are watched and
/// stored as `S` (`K` itself, stripped, for every kind but Service and EndpointSlice).
struct Watch<K, S> {
    api: Api<K>,
    config: watcher::Config,
    /// Runs on every object before the store (and its Init/InitApply buffer) sees it.
    keep: fn(K) -> S,
    kind: &'static str,
    namespace: Option<String>,
    /// Counts towards [`ClusterSource::is_synced`].
    gates_sync: bool,
    /// Stops holding the first sync back at its first error (e.g. 403: no RBAC grant), so
    /// an optional object cannot keep every route unserved; it joins when it lists.
    gate_until_error: bool,
}

impl ClusterSource {
    /// Start every watcher and return the source plus a task that runs them until `shutdown`
    /// completes (then the watchers are aborted). Must be called inside a tokio runtime. Never
    /// fails: an unreachable or refusing API server shows up as logged watch errors, retried
    /// with backoff, and as [`Self::is_synced`] staying false.
    pub fn start<F>(
        client: Client,
        config: SourceConfig,
        trigger: Trigger,
        shutdown: F,
    ) -> (Arc<ClusterSource>, JoinHandle<()>)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let namespaces = config.watched_namespaces();
        let (synced_tx, synced_rx) = watch::channel(false);
        let (changes, _) = watch::channel(0u64);
        let (secret_refs, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            // One guard count, released below once every watcher is registered, so a store
            // that lists before the others are even spawned cannot flip `synced` early.
            unsynced: AtomicUsize::new(1),
            stores_synced: watch::channel(false).0,
            synced: synced_tx,
            changes,
            secret_refs,
            watch_errors: AtomicU64::new(0),
            trigger,
        });
        let base = || {
            let c = watcher::Config::default();
            match config.page_size {
                Some(n) => c.page_size(n),
                None => c,
            }
        };
        let mut set = JoinSet::new();
        let scopes: Vec<Option<String>> = match &namespaces {
            None => vec![None],
            Some(list) => list.iter().cloned().map(Some).collect(),
        };
        let mut ingresses = Vec::new();
        let mut services = Vec::new();
        let mut endpoint_slices = Vec::new();
        let mut secrets = Vec::new();
        let mut policies = Vec::new();
        for ns in &scopes {
            ingresses.push(spawn_reflector(
                &mut set,
                &shared,
                Watch {
                    api: scoped_api(&client, ns.as_deref()),
                    config: base(),
                    keep: stripped::<Ingress>,
                    kind: "Ingress",
                    namespace: ns.clone(),
                    gates_sync: true,
                    gate_until_error: false,
                },
            ));
            services.push(spawn_reflector(
                &mut set,
                &shared,
                Watch {
                    api: scoped_api(&client, ns.as_deref()),
                    config: base(),
                    keep: <Svc as From<Service>>::from,
                    kind: "Service",
                    namespace: ns.clone(),
                    gates_sync: true,
                    gate_until_error: false,
                },
            ));
            endpoint_slices.push(spawn_reflector(
                &mut set,
                &shared,
                Watch {
                    api: scoped_api(&client, ns.as_deref()),
                    config: base(),
                    keep: <Slice as From<EndpointSlice>>::from,
                    kind: "EndpointSlice",
                    namespace: ns.clone(),
                    gates_sync: true,
                    gate_until_error: false,
                },
            ));
            secrets.push(spawn_reflector(
                &mut set,
                &shared,
                Watch {
                    api: scoped_api(&client, ns.as_deref()),
                    config: base().fields(TLS_SECRET_SELECTOR),
                    keep: |mut s| {
                        strip_secret_data(&mut s);
                        s
                    },
                    kind: "Secret",
                    namespace: ns.clone(),
                    gates_sync: true,
                    gate_until_error: false,
                },
            ));
            policies.push(spawn_reflector(
                &mut set,
                &shared,
                Watch {
                    api: scoped_api(&client, ns.as_deref()),
                    config: base(),
                    keep: stripped::<RateLimitPolicy>,
                    kind: "RateLimitPolicy",
                    namespace: ns.clone(),
                    gates_sync: true,
                    gate_until_error: false,
                },
            ));
        }
        let ingress_classes = spawn_reflector(
            &mut set,
            &shared,
            Watch {
                api: Api::all(client.clone()),
                config: base(),
                keep: stripped::<IngressClass>,
                kind: "IngressClass",
                namespace: None,
                gates_sync: true,
                gate_until_error: false,
            },
        );
        // `--default-certificate` in a namespace that is not watched: a watcher on exactly that
        // Secret (metadata only, like the others), whose store joins the Secret stores, so
        // translate and the Secret-data keeper find it as any other. It gates the first sync
        // like them, so the first snapshot serves the configured default certificate and not
        // the generated fallback, but only until its first error (module doc). (RBAC: a Role
        // on that one Secret, docs/rbac.md.)
        if let (Some((ns, name)), Some(list)) = (&config.default_certificate, &namespaces)
            && !list.contains(ns)
        {
            secrets.push(spawn_reflector(
                &mut set,
                &shared,
                Watch {
                    api: Api::namespaced(client.clone(), ns),
                    config: base().fields(&format!("metadata.name={name},{TLS_SECRET_SELECTOR}")),
                    keep: |mut s| {
                        strip_secret_data(&mut s);
                        s
                    },
                    kind: "Secret",
                    namespace: Some(ns.clone()),
                    gates_sync: true,
                    // Without a grant there (a hand-made RBAC), serve with the generated
                    // fallback and the diagnostic rather than never become ready.
                    gate_until_error: true,
                },
            ));
        }
        let publish_service = match (&config.publish_service, &namespaces) {
            (Some((ns, name)), Some(list)) if !list.contains(ns) => Some(spawn_reflector(
                &mut set,
                &shared,
                Watch {
                    api: Api::namespaced(client.clone(), ns),
                    config: base().fields(&format!("metadata.name={name}")),
                    keep: <Svc as From<Service>>::from,
                    kind: "Service",
                    namespace: Some(ns.clone()),
                    gates_sync: false,
                    gate_until_error: false,
                },
            )),
            _ => None,
        };
        let secret_data = Arc::new(SecretData::default());
        // The keeper gates the first sync too: once every store listed it fetches the data of
        // every Secret referenced then, and only then flips `synced`, so the inputs at sync
        // time already carry it.
        let keeper = Keeper {
            client: client.clone(),
            ingresses: ingresses.clone(),
            ingress_classes: ingress_classes.clone(),
            class: config.class.clone(),
            secrets: secrets.clone(),
            default_certificate: config.default_certificate.clone(),
            data: secret_data.clone(),
            on_change: Box::new({
                let shared = shared.clone();
                move || shared.changed()
            }),
        };
        let keeper_changes = shared.secret_refs.subscribe();
        let keeper_stores = shared.stores_synced.subscribe();
        let keeper_shared = shared.clone();
        set.spawn(async move {
            keeper
                .run(keeper_changes, keeper_stores, move || {
                    keeper_shared.synced.send_replace(true);
                })
                .await;
        });
        shared.first_sync();
        let source = Arc::new(ClusterSource {
            namespaces,
            ingresses,
            ingress_classes,
            services,
            endpoint_slices,
            secrets,
            secret_data,
            policies,
            publish_service,
            shared,
            synced: synced_rx,
        });
        let task = tokio::spawn(supervise(set, shutdown));
        (source, task)
    }

    /// True once every store (each kind, each watched namespace) completed its first list (or
    /// found its kind not served) and
    /// the Secrets referenced then had their data fetched (or failed). Stays true: later relists keep the previous list readable until they complete.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Completes once [`Self::is_synced`] is true (at once if it already is).
    pub async fn synced(&self) {
        let mut rx = self.synced.clone();
        // `wait_for` only fails when the sender is dropped, and `self.shared` owns it.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The watched namespaces; `None` when all are.
    pub fn namespaces(&self) -> Option<&[String]> {
        self.namespaces.as_deref()
    }

    /// Whether objects in `namespace` are watched.
    pub fn watches_namespace(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|l| l.iter().any(|n| n == namespace))
    }

    /// A Service from the stores (watched namespaces, plus the `--publish-service` watcher),
    /// for the status writer. `None` when not (yet) seen.
    pub fn service(&self, namespace: &str, name: &str) -> Option<Arc<Svc>> {
        let key = ObjectRef::<Svc>::new(name).within(namespace);
        self.publish_service
            .iter()
            .chain(self.services.iter())
            .find_map(|s| s.get(&key))
    }

    /// A counter bumped on every applied change in any store (the publish-service watcher
    /// included) and whenever held Secret data changes: subscribe to learn that something changed without rebuilding.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Watch errors seen so far (each was logged and retried).
    pub fn watch_errors(&self) -> u64 {
        self.shared.watch_errors.load(Ordering::Relaxed)
    }

    /// `(namespace, name)` of the Secrets whose key material is held in memory right now.
    pub fn secrets_with_data(&self) -> BTreeSet<(String, String)> {
        self.secret_data.held()
    }
}

fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs until `shutdown`, then aborts the watchers. A watcher task never ends by itself
/// (errors are retried); if one does anyway (a panic), that is logged and the rest go on.
async fn supervise<F: Future<Output = ()>>(mut set: JoinSet<()>, shutdown: F) {
    let mut shutdown = std::pin::pin!(shutdown);
    // Bounded: each `join_next` that returns `Some` removes one of a fixed number of tasks;
    // when none are left only shutdown remains.
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            next = set.join_next(), if !set.is_empty() => {
                if let Some(Err(e)) = next {
                    tracing::error!(error = %e, "a Kubernetes watcher task ended unexpectedly");
                }
            }
        }
    }
    set.shutdown().await;
}

fn spawn_reflector<K, S>(set: &mut JoinSet<()>, shared: &Arc<Shared>, w: Watch<K, S>) -> Store<S>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    S: Lookup + Clone + Send + Sync + 'static,
    S::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store::<S>();
    if w.gates_sync {
        shared.unsynced.fetch_add(1, Ordering::AcqRel);
    }
    let shared = shared.clone();
    set.spawn(async move {
        let Watch {
            api,
            config,
            keep,
            kind,
            namespace,
            gates_sync,
            gate_until_error,
        } = w;
        // Whether this watcher still holds the first sync back.
        let mut gating = gates_sync;
        let namespace = namespace.unwrap_or_default();
        // `keep` runs before `reflector`, so the store (and its Init/InitApply buffer) only
        // ever holds stripped or converted objects; the watcher's own list pages are
        // transient.
        let stream = watcher(api, config)
            .default_backoff()
            .map_ok(move |event| keep_event(event, keep));
        let stream = reflector::reflector(writer, stream);
        let mut stream = std::pin::pin!(stream);
        let mut listed = false;
        // The watcher stream is endless by design (backoff, never a terminal error); this task
        // ends when `supervise` aborts it at shutdown.
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    shared.changed_kind(kind)
                }
                Ok(watcher::Event::InitDone) => {
                    if !listed {
                        listed = true;
                        tracing::debug!(kind, namespace = %namespace, "initial list complete");
                        if gating {
                            gating = false;
                            shared.first_sync();
                        }
                    }
                    shared.changed_kind(kind);
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(e) => {
                    // 404 on the list: the API server does not serve this kind at all (the
                    // RateLimitPolicy CRD not installed, `helm install --skip-crds`), so no
                    // such object can exist and the empty store is the complete view. Once the
                    // kind is served, the retried list fills it.
                    let not_served = is_not_served(&e);
                    if gating && (gate_until_error || not_served) {
                        gating = false;
                        shared.first_sync();
                        if not_served {
                            tracing::warn!(
                                kind,
                                namespace = %namespace,
                                "the API server does not serve this kind (is its CRD installed?); \
                                 serving without any until it does"
                            );
                        }
                    }
                    shared.watch_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        kind,
                        namespace = %namespace,
                        error = %e,
                        "Kubernetes watch failed; retrying with backoff (serving the last complete list)"
                    );
                }
            }
        }
        tracing::error!(kind, namespace = %namespace, "Kubernetes watch stream ended");
    });
    reader
}

/// The list of a kind failed with 404: the kind is not served (a namespace that does not
/// exist lists as empty, it is no 404).
fn is_not_served(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 404
    )
}

/// `keep` applied to the object of a watcher event (markers pass through).
fn keep_event<K, S>(event: watcher::Event<K>, keep: fn(K) -> S) -> watcher::Event<S> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(keep(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(keep(o)),
        watcher::Event::InitApply(o) => watcher::Event::InitApply(keep(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// [`strip_common`] as a `keep` conversion.
fn stripped<K: Resource>(mut obj: K) -> K {
    strip_common(&mut obj);
    obj
}

/// The reflector stores of Services and EndpointSlices hold translate's compact [`Svc`] and
/// [`Slice`]; a store keys them by namespace and name like the k8s-openapi object (and carries
/// its resourceVersion). `$compact` has `name`, `namespace` and `resource_version` accessors;
/// `$kind` is the k8s-openapi type whose kind, group, version and plural it takes.
macro_rules! lookup_as {
    ($compact:ty, $kind:ty) => {
        impl Lookup for $compact {
            type DynamicType = ();

            fn kind(_: &()) -> Cow<'_, str> {
                <$kind as Resource>::kind(&())
            }

            fn group(_: &()) -> Cow<'_, str> {
                <$kind as Resource>::group(&())
            }

            fn version(_: &()) -> Cow<'_, str> {
                <$kind as Resource>::version(&())
            }

            fn plural(_: &()) -> Cow<'_, str> {
                <$kind as Resource>::plural(&())
            }

            fn name(&self) -> Option<Cow<'_, str>> {
                Some(Cow::Borrowed(<$compact>::name(self)))
            }

            fn namespace(&self) -> Option<Cow<'_, str>> {
                Some(Cow::Borrowed(<$compact>::namespace(self)))
            }

            fn resource_version(&self) -> Option<Cow<'_, str>> {
                <$compact>::resource_version(self).map(Cow::Borrowed)
            }

            fn uid(&self) -> Option<Cow<'_, str>> {
                // Not kept: the store compares keys by namespace and name only.
                None
            }
        }
    };
}

lookup_as!(Slice, EndpointSlice);
lookup_as!(Svc, Service);

/// Drop what no consumer reads: managedFields (often the largest part of an object) and the
/// last-applied annotation.
pub fn strip_common<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED_ANNOTATION);
    }
}

/// [`strip_common`], and drop all key material: what the Secret reflector stores (metadata
/// only; data of referenced Secrets is fetched separately).
pub fn strip_secret_data(secret: &mut Secret) {
    strip_common(secret);
    secret.data = None;
    secret.string_data = None;
}

/// [`strip_common`], and keep only the TLS data keys: other keys (a CA bundle, anything a user
/// put there) are never held by the proxy process.
pub fn strip_secret(secret: &mut Secret) {
    strip_common(secret);
    if let Some(data) = secret.data.as_mut() {
        data.retain(|k, _| TLS_SECRET_KEYS.contains(&k.as_str()));
    }
    // Write-only on the API; never returned by reads, but make sure nothing rides along.
    secret.string_data = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    #[test]
    fn namespaces_are_trimmed_sorted_and_deduplicated() {
        let c = SourceConfig {
            namespaces: vec!["b".into(), " a ".into(), "".into(), "b".into()],
            ..Default::default()
        };
        assert_eq!(c.watched_namespaces(), Some(vec!["a".into(), "b".into()]));
        let all = SourceConfig {
            namespaces: vec!["".into()],
            ..Default::default()
        };
        assert_eq!(all.watched_namespaces(), None);
    }

    #[test]
    fn secret_keeps_only_tls_keys_and_no_managed_fields() {
        let mut s = Secret::default();
        s.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        s.metadata.annotations = Some(
            [
                (LAST_APPLIED_ANNOTATION.to_string(), "{}".to_string()),
                ("keep".to_string(), "me".to_string()),
            ]
            .into(),
        );
        s.data = Some(
            ["tls.crt", "tls.key", "ca.crt", "password"]
                .into_iter()
                .map(|k| (k.to_string(), ByteString(k.as_bytes().to_vec())))
                .collect(),
        );
        strip_secret(&mut s);
        assert_eq!(s.metadata.managed_fields, None);
        let keys: Vec<_> = s
            .data
            .as_ref()
            .map_or(Vec::new(), |d| d.keys().cloned().collect());
        assert_eq!(keys, vec!["tls.crt".to_string(), "tls.key".to_string()]);
        let ann = s.metadata.annotations.unwrap_or_default();
        assert_eq!(ann.len(), 1);
        assert_eq!(ann.get("keep").map(String::as_str), Some("me"));
    }

    #[test]
    fn compact_slice_keys_the_store_like_the_endpoint_slice() {
        let mut raw = EndpointSlice::default();
        raw.metadata.name = Some("web-1".into());
        raw.metadata.namespace = Some("shop".into());
        raw.metadata.resource_version = Some("42".into());
        raw.metadata.uid = Some("u".into());
        raw.address_type = "IPv4".into();
        let want = ObjectRef::from_obj(&raw);
        let event = keep_event(
            watcher::Event::Apply(raw),
            <Slice as From<EndpointSlice>>::from,
        );
        let watcher::Event::Apply(slice) = event else {
            panic!("an Apply stays an Apply")
        };
        let got = slice.to_object_ref(());
        // Same store key (kind, namespace, name); the resourceVersion rides along.
        assert_eq!(got.extra.resource_version.as_deref(), Some("42"));
        assert_eq!(got.erase(), want.erase());
        assert!(matches!(
            keep_event::<EndpointSlice, Slice>(watcher::Event::InitDone, Slice::from),
            watcher::Event::InitDone
        ));
    }

    #[test]
    fn compact_service_keys_the_store_like_the_service() {
        let mut raw = Service::default();
        raw.metadata.name = Some("edge".into());
        raw.metadata.namespace = Some("portico".into());
        raw.metadata.resource_version = Some("7".into());
        raw.metadata.uid = Some("u".into());
        raw.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        let want = ObjectRef::from_obj(&raw);
        let event = keep_event(watcher::Event::InitApply(raw), <Svc as From<Service>>::from);
        let watcher::Event::InitApply(svc) = event else {
            panic!("an InitApply stays an InitApply")
        };
        let got = svc.to_object_ref(());
        assert_eq!(got.extra.resource_version.as_deref(), Some("7"));
        assert_eq!(got.erase(), want.erase());
        // What `ClusterSource::service` looks up finds it in a store written through `keep`.
        let (reader, mut writer) = reflector::store::<Svc>();
        writer.apply_watcher_event(&watcher::Event::Apply(svc));
        let key = ObjectRef::<Svc>::new("edge").within("portico");
        assert_eq!(
            reader
                .get(&key)
                .map(|s| s.resource_version().map(str::to_string)),
            Some(Some("7".to_string()))
        );
        assert!(
            reader
                .get(&ObjectRef::<Svc>::new("edge").within("other"))
                .is_none()
        );
    }

    #[test]
    fn reflected_secret_keeps_metadata_only() {
        let mut s = Secret::default();
        s.metadata.name = Some("tls".into());
        s.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        s.data = Some([("tls.key".to_string(), ByteString(b"k".to_vec()))].into());
        s.string_data = Some([("tls.key".to_string(), "k".to_string())].into());
        strip_secret_data(&mut s);
        assert_eq!(s.data, None);
        assert_eq!(s.string_data, None);
        assert_eq!(s.metadata.managed_fields, None);
        assert_eq!(s.metadata.name.as_deref(), Some("tls"));
    }
}
