//! Deterministic lookup indexes over [`Inputs`]: Services, Secrets and IngressClasses by name,
//! and Ingresses in precedence order (oldest `creationTimestamp`, then namespace/name).
//!
//! Owns: input ordering and duplicate handling. Must not import tokio, hyper or the filesystem.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, hash_map};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use super::service::Svc;
use super::{Diags, Inputs, ObjRef};

/// Hash map for translate's lookup-only indexes: foldhash (several times faster than the std
/// SipHash on short names) with a per-process random seed, so input names chosen by a user
/// still cannot force collisions. Such a map is never iterated into the output (translate is
/// deterministic; iteration order of a seeded hash map is not).
pub(super) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// Set counterpart of [`FastMap`], same rule.
pub(super) type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// Namespace assumed for a namespaced object that carries none (same rule as the file
/// provider; kept here so translate does not import `file_source`).
const DEFAULT_NAMESPACE: &str = "default";

/// Namespace of an object; the file provider and the API always set one, but an object built
/// by hand may not, and the file provider's rule is "no namespace means `default`".
pub(super) fn namespace(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => DEFAULT_NAMESPACE,
    }
}

pub(super) fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

pub(super) fn obj_ref(meta: &ObjectMeta) -> ObjRef<'_> {
    ObjRef {
        namespace: namespace(meta),
        name: name(meta),
        uid: meta.uid.as_deref().unwrap_or_default(),
    }
}

/// A content fingerprint used only to break ties between two objects with the same identity
/// (which a real API server never produces, but two manifest files can), so that the choice does
/// not depend on input order.
fn fingerprint<T: Serialize>(obj: &T) -> String {
    serde_json::to_string(obj).unwrap_or_default()
}

/// Insert keeping the object with the smaller fingerprint on a duplicate key.
fn insert_dedup<'a, K: Ord, T: Serialize>(
    map: &mut BTreeMap<K, &'a T>,
    key: K,
    obj: &'a T,
    kind: &str,
    meta: &ObjectMeta,
    diags: &mut Diags,
) {
    match map.entry(key) {
        Entry::Vacant(v) => {
            v.insert(obj);
        }
        Entry::Occupied(mut o) => {
            let (a, b) = (fingerprint(*o.get()), fingerprint(obj));
            if a != b {
                diags.warn(
                    kind,
                    &obj_ref(meta),
                    "DuplicateObject",
                    format!("several different {kind} objects share this name; one is used"),
                );
            }
            if b < a {
                o.insert(obj);
            }
        }
    }
}

/// Lookups translate needs, built once per translation.
pub(super) struct Index<'a> {
    /// Looked up once per path (50 000 times at issue 6's scale), never iterated: hashed.
    pub services: FastMap<(&'a str, &'a str), &'a Svc>,
    pub secrets: BTreeMap<(&'a str, &'a str), &'a Secret>,
    pub classes: BTreeMap<&'a str, &'a IngressClass>,
    /// All Ingresses (not only ours), deduplicated by namespace/name, in precedence order.
    pub ingresses: Vec<&'a Ingress>,
}

impl<'a> Index<'a> {
    pub fn new(inputs: &'a Inputs, diags: &mut Diags) -> Self {
        let mut services =
            FastMap::with_capacity_and_hasher(inputs.services.len(), Default::default());
        for s in &inputs.services {
            match services.entry((s.namespace(), s.name())) {
                hash_map::Entry::Vacant(v) => {
                    v.insert(&**s);
                }
                hash_map::Entry::Occupied(mut o) => {
                    // Same rule as `insert_dedup` (keep one of two different objects,
                    // whatever the input order), by the compact form's own order: it holds
                    // exactly what portico reads, so copies that differ only elsewhere are
                    // the same Service.
                    let (a, b) = (*o.get(), &**s);
                    if a != b {
                        diags.warn(
                            "Service",
                            &ObjRef {
                                namespace: s.namespace(),
                                name: s.name(),
                                uid: "",
                            },
                            "DuplicateObject",
                            "several different Service objects share this name; one is used",
                        );
                    }
                    if b < a {
                        o.insert(b);
                    }
                }
            }
        }
        let mut secrets = BTreeMap::new();
        for s in &inputs.secrets {
            let m = &s.metadata;
            insert_dedup(
                &mut secrets,
                (namespace(m), name(m)),
                &**s,
                "Secret",
                m,
                diags,
            );
        }
        let mut classes = BTreeMap::new();
        for c in &inputs.ingress_classes {
            let m = &c.metadata;
            // IngressClass is cluster-scoped: diagnostics about it carry an empty namespace.
            let r = ObjRef {
                namespace: "",
                ..obj_ref(m)
            };
            match classes.entry(name(m)) {
                Entry::Vacant(v) => {
                    v.insert(&**c);
                }
                Entry::Occupied(mut o) => {
                    let (a, b) = (fingerprint(*o.get()), fingerprint(&**c));
                    if a != b {
                        diags.warn(
                            "IngressClass",
                            &r,
                            "DuplicateObject",
                            "several different IngressClass objects share this name; one is used",
                        );
                    }
                    if b < a {
                        o.insert(&**c);
                    }
                }
            }
        }

        // Sorted by a key gathered once ([`PrecedenceKey`]), so comparisons do not
        // chase every Ingress's metadata. It only ties for equal namespace/name and timestamp
        // (duplicates); only then is the content fingerprint computed. Objects equal in all
        // of that are identical, so an unstable sort is still deterministic.
        let mut keyed: Vec<(PrecedenceKey<'a>, &Ingress)> = inputs
            .ingresses
            .iter()
            .map(|i| (PrecedenceKey::of(i), &**i))
            .collect();
        keyed.sort_unstable_by(|(ka, a), (kb, b)| {
            ka.cmp(kb)
                .then_with(|| fingerprint(*a).cmp(&fingerprint(*b)))
        });
        let ingresses: Vec<&Ingress> = keyed.into_iter().map(|(_, i)| i).collect();
        // Two Ingresses with one namespace/name cannot come from an API server, but can from
        // two manifest files: the first in precedence order is used.
        let mut seen = FastSet::with_capacity_and_hasher(ingresses.len(), Default::default());
        let mut deduped: Vec<&Ingress> = Vec::with_capacity(ingresses.len());
        for ing in ingresses {
            let m = &ing.metadata;
            if seen.insert((namespace(m), name(m))) {
                deduped.push(ing);
            } else {
                diags.warn(
                    "Ingress",
                    &obj_ref(m),
                    "DuplicateObject",
                    "several Ingress objects share this namespace/name; the oldest is used",
                );
            }
        }

        Index {
            services,
            secrets,
            classes,
            ingresses: deduped,
        }
    }
}

/// Ingress precedence for conflicts (brief §4.3), as a sortable value: oldest
/// `creationTimestamp` first; a missing timestamp sorts after every present one; then
/// namespace, then name (field order is comparison order).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PrecedenceKey<'a> {
    /// `false` before `true`: a present timestamp sorts before a missing one.
    missing_time: bool,
    time: Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    namespace: &'a str,
    name: &'a str,
}

impl<'a> PrecedenceKey<'a> {
    fn of(ing: &'a Ingress) -> Self {
        let m = &ing.metadata;
        PrecedenceKey {
            missing_time: m.creation_timestamp.is_none(),
            time: m.creation_timestamp.as_ref(),
            namespace: namespace(m),
            name: name(m),
        }
    }
}
