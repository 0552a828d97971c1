//! Secret key material for *referenced* Secrets only (issue 3: "Secret data of Secrets no
//! Ingress references is not kept in memory longer than needed").
//!
//! Owns: the map `namespace/name → (resourceVersion, tls.crt/tls.key)` and the background task
//! (`Keeper::run`) that fills it with `GET`s and empties it. May import kube, k8s-openapi,
//! tokio, futures-util, and translate's class rule and Secret type; must not import the proxy
//! (brief §3).
//!
//! The Secret reflector keeps metadata only (no `data`); this module decides which Secrets are
//! referenced, that is named by `spec.tls[].secretName` of any Ingress of our class in the
//! Ingress stores (in that Ingress's namespace, as translate reads them) or the `--default-certificate`
//! Secret. For each referenced Secret present in the Secret stores it holds the data fetched
//! for the store's current resourceVersion:
//!
//! - the referenced set or a referenced Secret's resourceVersion changes → `GET` it (at most
//!   [`CONCURRENT_GETS`] at a time), keep `tls.crt`/`tls.key`, poke the change callback;
//! - a Secret stops being referenced, or leaves the store (deleted) → its data is dropped in
//!   the same round, before any fetch;
//! - `404` → the Secret is gone: no data, no retry until its resourceVersion changes;
//! - any other error → logged, previous data (if any) kept, retried with exponential backoff
//!   ([`RETRY_BASE`] doubling up to [`RETRY_MAX`]).
//!
//! A referenced Secret that is *not* in the stores is either missing or of another type (the
//! stores only list `kubernetes.io/tls`). To tell the user which, the keeper probes it with a
//! `GET` when it is first referenced and every [`PROBE_INTERVAL`] after (a type other than TLS
//! is never watched, so nothing else would say it appeared), keeps only its `type` (the data
//! in the answer is dropped at once), and [`SecretData::attach`] lists such a Secret as a
//! metadata-only placeholder, which translate reports as `SecretWrongType` instead of
//! `SecretNotFound`. An Opaque Secret with `tls.crt`/`tls.key` is what ingress-nginx accepted,
//! so this is what a migration meets first.
//!
//! Reads ([`SecretData::attach`]) only lock the map briefly; they never wait for a fetch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

/// `(namespace, name)` of a Secret.
pub type SecretKey = (String, String);

/// At most this many Secret `GET`s in flight at once (a first sync with many referenced
/// Secrets should not open hundreds of requests).
pub const CONCURRENT_GETS: usize = 8;
/// First retry delay after a failed `GET` (kube's watcher backoff starts at the same 800 ms).
pub const RETRY_BASE: Duration = Duration::from_millis(800);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a referenced Secret that is not in the stores is looked up again.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(60);

/// What is known about one referenced Secret.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// The store's resourceVersion this entry was fetched (or attempted) for.
    for_rv: Option<String>,
    /// `tls.crt`/`tls.key`; `None` after a 404, or a failure with nothing fetched before.
    data: Option<BTreeMap<String, ByteString>>,
    /// The store's object last handed to [`SecretData::attach`] and what it gave for it: the
    /// same object with the same data gets the same `Arc` back, so an unchanged Secret stays
    /// pointer-equal from build to build (compared without reading its key material, which
    /// is neither copied again).
    attached: Option<(Arc<Secret>, Arc<Secret>)>,
    /// Consecutive failed `GET`s.
    failures: u32,
    /// Set after a failure: when to try again.
    retry_at: Option<Instant>,
}

/// What a `GET` found of a referenced Secret that is not in the stores.
#[derive(Debug, Clone, Default)]
struct Probe {
    /// Its type, when it exists with a type other than `kubernetes.io/tls`.
    other_type: Option<String>,
    /// Consecutive failed `GET`s.
    failures: u32,
    /// When to look again.
    next_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<SecretKey, Entry>,
    probes: HashMap<SecretKey, Probe>,
}

/// The data map shared between the keeper task and readers.
#[derive(Debug, Default)]
pub struct SecretData {
    state: Mutex<State>,
}

impl SecretData {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps that are still consistent (every write
        // is one insert or remove), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `secrets` (metadata-only, from the store) with data re-attached where it is held, then
    /// a metadata-only placeholder for each referenced Secret found to be of another type.
    pub fn attach(&self, secrets: Vec<Arc<Secret>>) -> Vec<Arc<Secret>> {
        let mut state = self.lock();
        let mut out: Vec<Arc<Secret>> = secrets
            .into_iter()
            .map(|s| {
                let Some(entry) = key_of(&s).and_then(|k| state.entries.get_mut(&k)) else {
                    return s;
                };
                let Some(data) = &entry.data else {
                    return s;
                };
                if let Some((seen, given)) = &entry.attached
                    && Arc::ptr_eq(seen, &s)
                {
                    return Arc::clone(given);
                }
                let mut with = (*s).clone();
                with.data = Some(data.clone());
                let with = Arc::new(with);
                entry.attached = Some((s, Arc::clone(&with)));
                with
            })
            .collect();
        let mut others: Vec<(&SecretKey, &String)> = state
            .probes
            .iter()
            .filter_map(|(k, p)| Some((k, p.other_type.as_ref()?)))
            .collect();
        // Stable order, so an unchanged cluster gives unchanged inputs.
        others.sort_unstable();
        out.extend(others.into_iter().map(|((namespace, name), ty)| {
            Arc::new(Secret {
                metadata: ObjectMeta {
                    namespace: Some(namespace.clone()),
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                type_: Some(ty.clone()),
                ..Secret::default()
            })
        }));
        out
    }

    /// The Secrets whose data is held right now, sorted.
    pub fn held(&self) -> BTreeSet<SecretKey> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| e.data.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }
}

fn key_of(s: &Secret) -> Option<SecretKey> {
    Some((s.metadata.namespace.clone()?, s.metadata.name.clone()?))
}

/// The Secrets the Ingresses (and the default certificate) name, each in its namespace.
pub fn referenced<'a>(
    ingresses: impl IntoIterator<Item = &'a Ingress>,
    default_certificate: Option<&SecretKey>,
) -> BTreeSet<SecretKey> {
    let mut out: BTreeSet<SecretKey> = default_certificate.into_iter().cloned().collect();
    for ing in ingresses {
        let Some(ns) = ing.metadata.namespace.as_deref() else {
            continue;
        };
        let tls = ing
            .spec
            .as_ref()
            .and_then(|s| s.tls.as_deref())
            .unwrap_or_default();
        for entry in tls {
            if let Some(name) = entry.secret_name.as_deref().filter(|n| !n.is_empty()) {
                out.insert((ns.to_string(), name.to_string()));
            }
        }
    }
    out
}

/// Delay before retry number `failures` (1-based): `RETRY_BASE * 2^(failures-1)`, capped.
pub fn retry_delay(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    RETRY_BASE.saturating_mul(1u32 << shift).min(RETRY_MAX)
}

/// The background task's state; see the module doc.
pub(crate) struct Keeper {
    pub client: Client,
    pub ingresses: Vec<Store<Ingress>>,
    pub ingress_classes: Store<IngressClass>,
    /// `(--ingress-class, --controller-name)`: only our Ingresses' Secrets are held.
    pub class: Option<(String, String)>,
    pub secrets: Vec<Store<Secret>>,
    pub default_certificate: Option<SecretKey>,
    pub data: Arc<SecretData>,
    /// Called when held data changed (the source bumps its change counter and pokes the
    /// rebuild trigger).
    pub on_change: Box<dyn Fn() + Send + Sync>,
}

/// Result of one `GET`.
enum Fetched {
    Found {
        type_: Option<String>,
        data: Option<BTreeMap<String, ByteString>>,
    },
    Gone,
    Failed(kube::Error),
}

/// Why a Secret is fetched in a round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    /// In the stores and referenced: its data is wanted.
    Data,
    /// Referenced but not in the stores: only its type is wanted.
    Probe,
}

impl Keeper {
    /// Waits until `stores_synced` is true (every store of the source listed once), does one
    /// full round (every referenced Secret fetched or failed), calls `first_round`, then does a round on every
    /// `changes` bump and whenever a failed fetch is due again. Ends when `changes`' sender is
    /// dropped (in practice the source aborts it at shutdown).
    pub async fn run(
        self,
        mut changes: watch::Receiver<u64>,
        mut stores_synced: watch::Receiver<bool>,
        first_round: impl FnOnce(),
    ) {
        // Err only when the sender is dropped, i.e. the source is gone.
        if stores_synced.wait_for(|s| *s).await.is_err() {
            return;
        }
        changes.borrow_and_update();
        self.round().await;
        first_round();
        // Bounded by the source's lifetime: `changed()` errors once the sender is gone.
        loop {
            let retry = self.next_retry();
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
                () = sleep_until_opt(retry), if retry.is_some() => {}
            }
            self.round().await;
        }
    }

    fn secret(&self, key: &SecretKey) -> Option<Arc<Secret>> {
        let r = ObjectRef::<Secret>::new(&key.1).within(&key.0);
        self.secrets.iter().find_map(|s| s.get(&r))
    }

    fn referenced(&self) -> BTreeSet<SecretKey> {
        let ingresses: Vec<Arc<Ingress>> = self.ingresses.iter().flat_map(|s| s.state()).collect();
        let classes = self.ingress_classes.state();
        referenced(
            ingresses
                .iter()
                .map(|i| &**i)
                .filter(|i| match &self.class {
                    // Another controller's Ingresses: their private keys are none of ours to hold.
                    Some((class, controller)) => {
                        crate::translate::serves_ingress(i, &classes, class, controller)
                    }
                    None => true,
                }),
            self.default_certificate.as_ref(),
        )
    }

    /// Drop entries that are no longer referenced or whose Secret left the store, and probes
    /// of Secrets no longer referenced or now in the store; true when what the inputs show
    /// changed (data dropped, a placeholder gone).
    fn prune(&self, refs: &BTreeSet<SecretKey>) -> bool {
        let mut state = self.data.lock();
        let mut dropped = false;
        state.entries.retain(|k, e| {
            let keep = refs.contains(k) && self.secret(k).is_some();
            dropped |= !keep && e.data.is_some();
            keep
        });
        state.probes.retain(|k, p| {
            let keep = refs.contains(k) && self.secret(k).is_none();
            dropped |= !keep && p.other_type.is_some();
            keep
        });
        dropped
    }

    fn next_retry(&self) -> Option<Instant> {
        let state = self.data.lock();
        let entries = state.entries.values().filter_map(|e| e.retry_at);
        let probes = state.probes.values().filter_map(|p| p.next_at);
        entries.chain(probes).min()
    }

    /// One reconciliation of the map against the stores.
    async fn round(&self) {
        let now = Instant::now();
        let refs = self.referenced();
        let mut changed = self.prune(&refs);
        let todo: Vec<(SecretKey, Option<String>, Why)> = {
            let state = self.data.lock();
            refs.iter()
                .filter_map(|k| match self.secret(k) {
                    Some(secret) => {
                        let rv = secret.metadata.resource_version.clone();
                        let fresh = state
                            .entries
                            .get(k)
                            .is_some_and(|e| e.for_rv == rv && e.retry_at.is_none_or(|t| t > now));
                        (!fresh).then(|| (k.clone(), rv, Why::Data))
                    }
                    None => {
                        let due = state
                            .probes
                            .get(k)
                            .is_none_or(|p| p.next_at.is_none_or(|t| t <= now));
                        due.then(|| (k.clone(), None, Why::Probe))
                    }
                })
                .collect()
        };
        let client = &self.client;
        let results: Vec<(SecretKey, Option<String>, Why, Fetched)> =
            futures_util::stream::iter(todo)
                .map(|(k, rv, why)| async move {
                    let api: Api<Secret> = Api::namespaced(client.clone(), &k.0);
                    let fetched = match api.get_opt(&k.1).await {
                        Ok(Some(mut s)) => {
                            super::source::strip_secret(&mut s);
                            Fetched::Found {
                                type_: s.type_,
                                // A probed Secret's data is never kept.
                                data: s.data.filter(|_| why == Why::Data),
                            }
                        }
                        Ok(None) => Fetched::Gone,
                        Err(e) => Fetched::Failed(e),
                    };
                    (k, rv, why, fetched)
                })
                .buffer_unordered(CONCURRENT_GETS)
                .collect()
                .await;
        // The stores may have moved on while the GETs ran: only keep what is still wanted.
        let refs = self.referenced();
        {
            let mut state = self.data.lock();
            for (k, rv, why, fetched) in results {
                if !refs.contains(&k) || self.secret(&k).is_some() != (why == Why::Data) {
                    continue;
                }
                if why == Why::Probe {
                    let prev = state.probes.remove(&k).unwrap_or_default();
                    let before = prev.other_type.clone();
                    let probe = probed(&k, prev, fetched, now);
                    changed |= probe.other_type != before;
                    state.probes.insert(k, probe);
                    continue;
                }
                let prev = state.entries.remove(&k).unwrap_or_default();
                let entry = match fetched {
                    Fetched::Found { data, .. } => {
                        changed = true;
                        Entry {
                            for_rv: rv,
                            data,
                            attached: None,
                            failures: 0,
                            retry_at: None,
                        }
                    }
                    Fetched::Gone => {
                        changed |= prev.data.is_some();
                        Entry {
                            for_rv: rv,
                            data: None,
                            attached: None,
                            failures: 0,
                            retry_at: None,
                        }
                    }
                    Fetched::Failed(e) => {
                        let failures = prev.failures.saturating_add(1);
                        let delay = retry_delay(failures);
                        tracing::warn!(
                            namespace = %k.0, name = %k.1, error = %e, retry_in = ?delay,
                            "cannot fetch a referenced TLS Secret; retrying with backoff"
                        );
                        Entry {
                            for_rv: rv,
                            // Keep serving what was fetched before (an older rotation) rather
                            // than nothing.
                            data: prev.data,
                            attached: prev.attached,
                            failures,
                            retry_at: Some(now + delay),
                        }
                    }
                };
                state.entries.insert(k, entry);
            }
        }
        changed |= self.prune(&refs);
        if changed {
            (self.on_change)();
        }
    }
}

/// The next state of a probe after its `GET`.
fn probed(key: &SecretKey, prev: Probe, fetched: Fetched, now: Instant) -> Probe {
    match fetched {
        Fetched::Found { type_, .. } => Probe {
            // The API server defaults an unset type to Opaque. A TLS Secret here is one the
            // watch has not delivered yet: it joins the store, and this probe is pruned.
            other_type: Some(type_.unwrap_or_else(|| "Opaque".to_string()))
                .filter(|t| t != crate::translate::SECRET_TYPE_TLS),
            failures: 0,
            next_at: Some(now + PROBE_INTERVAL),
        },
        Fetched::Gone => Probe {
            other_type: None,
            failures: 0,
            next_at: Some(now + PROBE_INTERVAL),
        },
        Fetched::Failed(e) => {
            let failures = prev.failures.saturating_add(1);
            let delay = retry_delay(failures);
            // Only refines a diagnostic (wrong type rather than not found), so no warning: a
            // Secret the replica may not read (a hand-made RBAC) would log one every 30 s.
            tracing::debug!(
                namespace = %key.0, name = %key.1, error = %e, retry_in = ?delay,
                "cannot look up a referenced Secret that is not a listed TLS Secret; retrying with backoff"
            );
            Probe {
                other_type: prev.other_type,
                failures,
                next_at: Some(now + delay),
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::{IngressSpec, IngressTLS};

    fn ing(ns: &str, secrets: &[&str]) -> Ingress {
        let mut i = Ingress::default();
        i.metadata.namespace = Some(ns.into());
        i.spec = Some(IngressSpec {
            tls: Some(
                secrets
                    .iter()
                    .map(|s| IngressTLS {
                        secret_name: Some(s.to_string()),
                        hosts: None,
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        i
    }

    #[test]
    fn referenced_is_per_namespace_plus_default_and_skips_empty_names() {
        let a = ing("a", &["x", ""]);
        let b = ing("b", &["x", "y"]);
        let no_ns = Ingress::default();
        let d = ("sys".to_string(), "default".to_string());
        let got = referenced([&a, &b, &no_ns], Some(&d));
        let want: BTreeSet<SecretKey> = [("a", "x"), ("b", "x"), ("b", "y"), ("sys", "default")]
            .into_iter()
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn retry_delay_doubles_and_caps() {
        assert_eq!(retry_delay(1), RETRY_BASE);
        assert_eq!(retry_delay(2), RETRY_BASE * 2);
        assert_eq!(retry_delay(3), RETRY_BASE * 4);
        assert_eq!(retry_delay(10), RETRY_MAX);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn attach_adds_data_only_where_held() {
        let data = SecretData::default();
        let mk = |name: &str| {
            let mut s = Secret::default();
            s.metadata.namespace = Some("ns".into());
            s.metadata.name = Some(name.into());
            Arc::new(s)
        };
        let held: BTreeMap<String, ByteString> =
            [("tls.crt".to_string(), ByteString(b"c".to_vec()))].into();
        data.lock().entries.insert(
            ("ns".into(), "held".into()),
            Entry {
                data: Some(held.clone()),
                ..Default::default()
            },
        );
        data.lock()
            .entries
            .insert(("ns".into(), "gone".into()), Entry::default());
        let (held_obj, gone_obj) = (mk("held"), mk("gone"));
        let out = data.attach(vec![held_obj.clone(), gone_obj.clone(), mk("other")]);
        assert_eq!(out[0].data.as_ref(), Some(&held));
        assert_eq!(out[1].data, None);
        assert_eq!(out[2].data, None);
        // The next build's inputs: the same store objects give the same objects back, so
        // an unchanged Secret compares by pointer; a new version of it is attached afresh.
        let again = data.attach(vec![held_obj.clone(), gone_obj.clone()]);
        assert!(Arc::ptr_eq(&again[0], &out[0]));
        assert!(Arc::ptr_eq(&again[1], &gone_obj));
        let updated = mk("held");
        let third = data.attach(vec![updated]);
        assert!(!Arc::ptr_eq(&third[0], &out[0]));
        assert_eq!(third[0].data.as_ref(), Some(&held));
        assert_eq!(
            data.held(),
            BTreeSet::from([("ns".to_string(), "held".to_string())])
        );
        assert_eq!(out.len(), 3, "no probe, no placeholder");
    }

    #[test]
    fn attach_lists_a_placeholder_per_secret_of_another_type() {
        let data = SecretData::default();
        for (name, ty) in [("b", Some("Opaque")), ("a", Some("x/y")), ("gone", None)] {
            data.lock().probes.insert(
                ("ns".into(), name.into()),
                Probe {
                    other_type: ty.map(str::to_string),
                    ..Probe::default()
                },
            );
        }
        let out = data.attach(Vec::new());
        let got: Vec<_> = out
            .iter()
            .map(|s| {
                (
                    s.metadata.name.as_deref(),
                    s.type_.as_deref(),
                    s.data.is_none(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some("a"), Some("x/y"), true),
                (Some("b"), Some("Opaque"), true)
            ]
        );
        assert!(data.held().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_keeps_other_types_only_and_backs_off_on_errors() {
        let key: SecretKey = ("ns".into(), "s".into());
        let now = Instant::now();
        let found = |ty: Option<&str>| Fetched::Found {
            type_: ty.map(str::to_string),
            data: None,
        };
        let p = probed(&key, Probe::default(), found(Some("Opaque")), now);
        assert_eq!(p.other_type.as_deref(), Some("Opaque"));
        assert_eq!(p.next_at, Some(now + PROBE_INTERVAL));
        // The API server's default type.
        let p = probed(&key, Probe::default(), found(None), now);
        assert_eq!(p.other_type.as_deref(), Some("Opaque"));
        // A TLS Secret the watch has not delivered yet is no placeholder.
        let p = probed(
            &key,
            Probe::default(),
            found(Some("kubernetes.io/tls")),
            now,
        );
        assert_eq!(p.other_type, None);
        let p = probed(&key, p, Fetched::Gone, now);
        assert_eq!((p.other_type, p.failures), (None, 0));
        // An error keeps what was known and retries sooner than the probe interval.
        let known = Probe {
            other_type: Some("Opaque".into()),
            ..Probe::default()
        };
        let failed = || Fetched::Failed(kube::Error::LinesCodecMaxLineLengthExceeded);
        let p = probed(&key, known, failed(), now);
        assert_eq!(p.other_type.as_deref(), Some("Opaque"));
        assert_eq!((p.failures, p.next_at), (1, Some(now + RETRY_BASE)));
        let p = probed(&key, p, failed(), now);
        assert_eq!((p.failures, p.next_at), (2, Some(now + RETRY_BASE * 2)));
    }
}
