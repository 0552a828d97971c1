//! Secret key material for *referenced* Secrets only (issue 3: "Secret data of Secrets no
//! Ingress references is not kept in memory longer than needed").
//!
//! Owns: the map `namespace/name → (resourceVersion, tls.crt/tls.key)` and the background task
//! (`Keeper::run`) that fills it with `GET`s and empties it. May import kube, k8s-openapi,
//! tokio, futures-util, and translate's class rule; must not import the proxy (brief §3).
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
//! Reads ([`SecretData::attach`]) only lock the map briefly; they never wait for a fetch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
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

/// What is known about one referenced Secret.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// The store's resourceVersion this entry was fetched (or attempted) for.
    for_rv: Option<String>,
    /// `tls.crt`/`tls.key`; `None` after a 404, or a failure with nothing fetched before.
    data: Option<BTreeMap<String, ByteString>>,
    /// Consecutive failed `GET`s.
    failures: u32,
    /// Set after a failure: when to try again.
    retry_at: Option<Instant>,
}

/// The data map shared between the keeper task and readers.
#[derive(Debug, Default)]
pub struct SecretData {
    entries: Mutex<HashMap<SecretKey, Entry>>,
}

impl SecretData {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SecretKey, Entry>> {
        // A panic while holding the lock leaves a map that is still consistent (every write
        // is one insert or remove), so a poisoned lock is used as is.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `secrets` (metadata-only, from the store) with data re-attached where it is held.
    pub fn attach(&self, secrets: Vec<Arc<Secret>>) -> Vec<Arc<Secret>> {
        let entries = self.lock();
        secrets
            .into_iter()
            .map(|s| {
                let data = key_of(&s)
                    .and_then(|k| entries.get(&k))
                    .and_then(|e| e.data.clone());
                match data {
                    Some(data) => {
                        let mut with = (*s).clone();
                        with.data = Some(data);
                        Arc::new(with)
                    }
                    None => s,
                }
            })
            .collect()
    }

    /// The Secrets whose data is held right now, sorted.
    pub fn held(&self) -> BTreeSet<SecretKey> {
        self.lock()
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
    Data(Option<BTreeMap<String, ByteString>>),
    Gone,
    Failed(kube::Error),
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

    /// Drop entries that are no longer referenced or whose Secret left the store; true when
    /// data was dropped.
    fn prune(&self, refs: &BTreeSet<SecretKey>) -> bool {
        let mut entries = self.data.lock();
        let mut dropped = false;
        entries.retain(|k, e| {
            let keep = refs.contains(k) && self.secret(k).is_some();
            dropped |= !keep && e.data.is_some();
            keep
        });
        dropped
    }

    fn next_retry(&self) -> Option<Instant> {
        self.data.lock().values().filter_map(|e| e.retry_at).min()
    }

    /// One reconciliation of the map against the stores.
    async fn round(&self) {
        let now = Instant::now();
        let refs = self.referenced();
        let mut changed = self.prune(&refs);
        let todo: Vec<(SecretKey, Option<String>)> = {
            let entries = self.data.lock();
            refs.iter()
                .filter_map(|k| {
                    let rv = self.secret(k)?.metadata.resource_version.clone();
                    let fresh = entries
                        .get(k)
                        .is_some_and(|e| e.for_rv == rv && e.retry_at.is_none_or(|t| t > now));
                    (!fresh).then(|| (k.clone(), rv))
                })
                .collect()
        };
        let client = &self.client;
        let results: Vec<(SecretKey, Option<String>, Fetched)> = futures_util::stream::iter(todo)
            .map(|(k, rv)| async move {
                let api: Api<Secret> = Api::namespaced(client.clone(), &k.0);
                let fetched = match api.get_opt(&k.1).await {
                    Ok(Some(mut s)) => {
                        super::source::strip_secret(&mut s);
                        Fetched::Data(s.data)
                    }
                    Ok(None) => Fetched::Gone,
                    Err(e) => Fetched::Failed(e),
                };
                (k, rv, fetched)
            })
            .buffer_unordered(CONCURRENT_GETS)
            .collect()
            .await;
        // The stores may have moved on while the GETs ran: only keep what is still wanted.
        let refs = self.referenced();
        {
            let mut entries = self.data.lock();
            for (k, rv, fetched) in results {
                if !refs.contains(&k) || self.secret(&k).is_none() {
                    continue;
                }
                let prev = entries.remove(&k).unwrap_or_default();
                let entry = match fetched {
                    Fetched::Data(data) => {
                        changed = true;
                        Entry {
                            for_rv: rv,
                            data,
                            failures: 0,
                            retry_at: None,
                        }
                    }
                    Fetched::Gone => {
                        changed |= prev.data.is_some();
                        Entry {
                            for_rv: rv,
                            data: None,
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
                            failures,
                            retry_at: Some(now + delay),
                        }
                    }
                };
                entries.insert(k, entry);
            }
        }
        changed |= self.prune(&refs);
        if changed {
            (self.on_change)();
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
        data.lock().insert(
            ("ns".into(), "held".into()),
            Entry {
                data: Some(held.clone()),
                ..Default::default()
            },
        );
        data.lock()
            .insert(("ns".into(), "gone".into()), Entry::default());
        let out = data.attach(vec![mk("held"), mk("gone"), mk("other")]);
        assert_eq!(out[0].data.as_ref(), Some(&held));
        assert_eq!(out[1].data, None);
        assert_eq!(out[2].data, None);
        assert_eq!(
            data.held(),
            BTreeSet::from([("ns".to_string(), "held".to_string())])
        );
    }
}
