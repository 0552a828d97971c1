//! Incremental translation (brief §2: "Endpoint churn must not require re-deriving routes"):
//! [`Translator`] keeps the endpoint-independent part of its last build and, when nothing but
//! EndpointSlices changed, re-resolves only the backends whose Service's slices changed; every
//! other backend (its `Arc<[Endpoint]>` included) is reused as it was.
//!
//! Owns: the change tests and the caches. Pure like the rest of translate (no I/O, no clock):
//! the result is always equal to [`translate`](super::translate) of the same inputs. Must not
//! import tokio, hyper or the filesystem.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::backends::{resolve_backend, service_of};
use super::{BackendSpec, Diagnostic, Diags, Inputs, Options, Routes, Slice, routes};
use crate::model::{BackendTable, Snapshot};

/// Translates, reusing the derived routes of the previous call when only endpoints changed, and
/// the resolved endpoints of every backend whose slices did not change.
#[derive(Debug, Default)]
pub struct Translator {
    last: Option<Derived>,
    reused: bool,
    /// Backends resolved from slices by the last call (all of them on a full build).
    resolved: usize,
}

/// What route derivation read (the inputs other than EndpointSlices, and the options) and
/// produced. Holding the input `Arc`s keeps their addresses from being reused, so a pointer
/// comparison can never mistake a new object for an old one.
#[derive(Debug)]
struct Derived {
    options: Options,
    inputs: Inputs,
    routes: Routes,
    /// Route derivation's diagnostics, already sorted and deduplicated.
    diagnostics: Vec<Diagnostic>,
    endpoints: Endpoints,
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Same result as [`translate`](super::translate); cheaper when only EndpointSlices changed.
    pub fn translate(&mut self, inputs: &Inputs, opts: &Options) -> (Snapshot, Vec<Diagnostic>) {
        let reuse = self
            .last
            .as_ref()
            .is_some_and(|d| d.options == *opts && same_routing_inputs(&d.inputs, inputs));
        self.reused = reuse;
        let derived = match (&mut self.last, reuse) {
            (Some(derived), true) => {
                self.resolved = derived.endpoints.update(&inputs.endpoint_slices);
                derived
            }
            (last, _) => {
                let mut diags = Diags::default();
                let routes = routes::derive(inputs, opts, &mut diags);
                let endpoints = Endpoints::build(&routes.backends, &inputs.endpoint_slices);
                self.resolved = routes.backends.len();
                last.insert(Derived {
                    options: opts.clone(),
                    inputs: Inputs {
                        endpoint_slices: Vec::new(),
                        ..inputs.clone()
                    },
                    routes,
                    diagnostics: diags.finish(),
                    endpoints,
                })
            }
        };
        let snapshot = Snapshot {
            hosts: Arc::clone(&derived.routes.hosts),
            backends: Arc::clone(&derived.endpoints.table),
            tls: Arc::clone(&derived.routes.tls),
        };
        // Both parts are sorted and deduplicated already; only endpoint diagnostics (invalid
        // addresses, rare) need a merge.
        let mut diagnostics = derived.diagnostics.clone();
        if derived.endpoints.diags.iter().any(|d| !d.is_empty()) {
            let mut diags = Diags(diagnostics);
            for d in &derived.endpoints.diags {
                diags.0.extend_from_slice(d);
            }
            diagnostics = diags.finish();
        }
        (snapshot, diagnostics)
    }

    /// Whether the last [`Translator::translate`] reused the previous routes.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// How many backends the last [`Translator::translate`] resolved from EndpointSlices (the
    /// rest were reused): every backend after a route derivation, only those of Services whose
    /// slices changed otherwise.
    pub fn resolved_backends(&self) -> usize {
        self.resolved
    }
}

/// Slices are grouped by `namespace NUL service-name`: one string, so lookups can borrow a
/// reused buffer instead of allocating. A name holding NUL could make two Services share a
/// group; harmless, because a backend reads only the slices whose Service is exactly its own
/// ([`service_of`]), so a shared group can only cause an extra re-resolve.
fn group_key<'b>(buf: &'b mut String, namespace: &str, service: &str) -> &'b str {
    buf.clear();
    buf.push_str(namespace);
    buf.push('\0');
    buf.push_str(service);
    buf
}

type Groups = HashMap<Box<str>, Vec<Arc<Slice>>>;

/// The resolved backend table and what it was resolved from.
#[derive(Debug)]
struct Endpoints {
    /// The specs of the routes this table belongs to (`BackendId(i)` is `specs[i]`).
    specs: Arc<[BackendSpec]>,
    /// The slices of the last build in input order; held so their addresses stay unique.
    slices: Vec<Arc<Slice>>,
    /// The same slices grouped by Service ([`group_key`]); slices without the service label
    /// are in no group (they feed no backend). The backends of a Service need no map: `specs`
    /// is sorted by key, so they are one range of it ([`backends_of`]).
    groups: Groups,
    /// The resolved backends, as published.
    table: Arc<BackendTable>,
    /// Endpoint diagnostics of each backend (same index as `table`).
    diags: Vec<Vec<Diagnostic>>,
}

impl Endpoints {
    fn build(specs: &Arc<[BackendSpec]>, slices: &[Arc<Slice>]) -> Self {
        let mut buf = String::new();
        let groups = group(slices, &mut buf);
        let mut backends = Vec::with_capacity(specs.len());
        let mut diags = Vec::with_capacity(specs.len());
        for spec in specs.iter() {
            let (b, d) = resolve_one(spec, &groups, &mut buf);
            backends.push(b);
            diags.push(d);
        }
        Endpoints {
            specs: Arc::clone(specs),
            slices: slices.to_vec(),
            groups,
            table: Arc::new(BackendTable { backends }),
            diags,
        }
    }

    /// Bring the table up to date with `slices`; returns how many backends were re-resolved.
    /// When nothing a backend reads changed, `table` stays the same `Arc`.
    fn update(&mut self, slices: &[Arc<Slice>]) -> usize {
        let mut buf = String::new();
        // The Services (namespace, name) whose backends must be resolved again.
        let mut dirty: Vec<(Box<str>, Box<str>)> = Vec::new();
        if slices.len() == self.slices.len() {
            // The common event: one slice (or a few) replaced in place. Compare position by
            // position, by pointer first and by value when a source handed out a fresh copy.
            for (i, new) in slices.iter().enumerate() {
                let old = &self.slices[i];
                if Arc::ptr_eq(old, new) || **old == **new {
                    continue;
                }
                let old = std::mem::replace(&mut self.slices[i], Arc::clone(new));
                if let Some((ns, svc)) = service_of(&old) {
                    let key = group_key(&mut buf, ns, svc);
                    if let Some(group) = self.groups.get_mut(key) {
                        if let Some(pos) = group.iter().position(|s| Arc::ptr_eq(s, &old)) {
                            group.swap_remove(pos);
                        }
                        if group.is_empty() {
                            self.groups.remove(key);
                        }
                    }
                    dirty.push((ns.into(), svc.into()));
                }
                if let Some((ns, svc)) = service_of(new) {
                    let key = group_key(&mut buf, ns, svc);
                    match self.groups.get_mut(key) {
                        Some(group) => group.push(Arc::clone(new)),
                        None => {
                            self.groups.insert(Box::from(key), vec![Arc::clone(new)]);
                        }
                    }
                    dirty.push((ns.into(), svc.into()));
                }
            }
        } else {
            // Slices were added or removed: regroup, and re-resolve the Services whose group
            // is not the same slices as before (order within a group does not matter to
            // resolution, so a reordered group only costs an unneeded re-resolve).
            // A group's Services are those of its slices (one, unless a name holds NUL).
            let services_of = |group: &[Arc<Slice>], dirty: &mut Vec<(Box<str>, Box<str>)>| {
                dirty.extend(
                    group
                        .iter()
                        .filter_map(|s| service_of(s))
                        .map(|(ns, svc)| (ns.into(), svc.into())),
                );
            };
            let groups = group(slices, &mut buf);
            for (key, new) in &groups {
                let old = self.groups.get(key);
                let same = old.is_some_and(|old| {
                    old.len() == new.len()
                        && old
                            .iter()
                            .zip(new)
                            .all(|(a, b)| Arc::ptr_eq(a, b) || **a == **b)
                });
                if !same {
                    services_of(new, &mut dirty);
                    if let Some(old) = old {
                        services_of(old, &mut dirty);
                    }
                }
            }
            for (key, old) in &self.groups {
                if !groups.contains_key(key) {
                    services_of(old, &mut dirty);
                }
            }
            self.groups = groups;
            self.slices = slices.to_vec();
        }
        if dirty.is_empty() {
            return 0;
        }
        dirty.sort_unstable();
        dirty.dedup();
        let mut backends: Option<Vec<_>> = None;
        let mut resolved = 0;
        for (ns, svc) in &dirty {
            for i in backends_of(&self.specs, ns, svc) {
                let Some(spec) = self.specs.get(i) else {
                    continue;
                };
                let (b, d) = resolve_one(spec, &self.groups, &mut buf);
                let table = backends.get_or_insert_with(|| self.table.backends.clone());
                if let Some(slot) = table.get_mut(i) {
                    *slot = b;
                }
                if let Some(slot) = self.diags.get_mut(i) {
                    *slot = d;
                }
                resolved += 1;
            }
        }
        if let Some(backends) = backends {
            self.table = Arc::new(BackendTable { backends });
        }
        resolved
    }
}

/// Positions in `specs` (sorted by key: namespace, then service, then port) of the backends of
/// Service `namespace/service`: one contiguous range, found by binary search.
fn backends_of(specs: &[BackendSpec], namespace: &str, service: &str) -> std::ops::Range<usize> {
    fn key(s: &BackendSpec) -> (&str, &str) {
        (&s.key.namespace, &s.key.service)
    }
    let start = specs.partition_point(|s| key(s) < (namespace, service));
    let len = specs
        .get(start..)
        .unwrap_or_default()
        .partition_point(|s| key(s) == (namespace, service));
    start..start + len
}

fn group(slices: &[Arc<Slice>], buf: &mut String) -> Groups {
    let mut groups: Groups = HashMap::with_capacity(slices.len());
    for slice in slices {
        let Some((ns, svc)) = service_of(slice) else {
            continue;
        };
        let key = group_key(buf, ns, svc);
        match groups.get_mut(key) {
            Some(g) => g.push(Arc::clone(slice)),
            None => {
                groups.insert(Box::from(key), vec![Arc::clone(slice)]);
            }
        }
    }
    groups
}

fn resolve_one(
    spec: &BackendSpec,
    groups: &Groups,
    buf: &mut String,
) -> (crate::model::Backend, Vec<Diagnostic>) {
    let (ns, svc) = (&*spec.key.namespace, &*spec.key.service);
    let group = groups
        .get(group_key(buf, ns, svc))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut diags = Diags::default();
    let slices = group
        .iter()
        .filter(|s| service_of(s) == Some((ns, svc)))
        .map(|s| &**s);
    let backend = resolve_backend(spec, slices, &mut diags);
    (backend, diags.0)
}

/// Ingresses, IngressClasses, Services, Secrets and RateLimitPolicies hold the same objects (as
/// sets: sources need not keep an order). Objects are compared by pointer first, by value when
/// a source handed out a fresh copy.
fn same_routing_inputs(a: &Inputs, b: &Inputs) -> bool {
    same_set(&a.ingresses, &b.ingresses, |o| meta_key(&o.metadata))
        && same_set(&a.ingress_classes, &b.ingress_classes, |o| {
            meta_key(&o.metadata)
        })
        && same_set(&a.services, &b.services, |o| (o.namespace(), o.name()))
        && same_set(&a.secrets, &b.secrets, |o| meta_key(&o.metadata))
        && same_set(&a.rate_limit_policies, &b.rate_limit_policies, |o| {
            meta_key(&o.metadata)
        })
}

/// Sort key of a k8s-openapi object for [`same_set`] (absent is empty: only the order of
/// the comparison depends on it).
fn meta_key(meta: &ObjectMeta) -> (&str, &str) {
    (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

fn same_set<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>], key: fn(&T) -> (&str, &str)) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y)) {
        return true;
    }
    fn sorted<T>(v: &[Arc<T>], key: fn(&T) -> (&str, &str)) -> Vec<&Arc<T>> {
        let mut v: Vec<&Arc<T>> = v.iter().collect();
        v.sort_by(|x, y| (key(x), Arc::as_ptr(x)).cmp(&(key(y), Arc::as_ptr(y))));
        v
    }
    sorted(a, key)
        .into_iter()
        .zip(sorted(b, key))
        .all(|(x, y)| Arc::ptr_eq(x, y) || **x == **y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendKey, ServicePortRef};

    fn spec(ns: &str, svc: &str, port: i32) -> BackendSpec {
        BackendSpec {
            key: BackendKey {
                namespace: ns.into(),
                service: svc.into(),
                port: ServicePortRef::Number(port),
            },
            port_name: None,
            health_check: None,
        }
    }

    #[test]
    fn backends_of_is_the_key_range_of_one_service() {
        // Sorted by key, as `Routes::backends` is; "a\0b"/"c" and "a"/"b\0c" share a group
        // key but are different Services.
        let mut specs = vec![
            spec("a", "b\0c", 80),
            spec("a\0b", "c", 80),
            spec("shop", "api", 80),
            spec("shop", "web", 80),
            spec("shop", "web", 8080),
            spec("shop", "web-2", 80),
            spec("zoo", "web", 80),
        ];
        specs.sort();
        let found = |ns, svc| -> Vec<(String, String, i32)> {
            backends_of(&specs, ns, svc)
                .map(|i| {
                    let k = &specs[i].key;
                    let ServicePortRef::Number(p) = k.port else {
                        panic!("numbers only")
                    };
                    (k.namespace.to_string(), k.service.to_string(), p)
                })
                .collect()
        };
        let web = |p| ("shop".to_string(), "web".to_string(), p);
        assert_eq!(found("shop", "web"), [web(80), web(8080)]);
        assert_eq!(found("zoo", "web").len(), 1);
        assert_eq!(found("a", "b\0c"), [("a".into(), "b\0c".into(), 80)]);
        assert_eq!(found("a\0b", "c"), [("a\0b".into(), "c".into(), 80)]);
        assert!(found("shop", "we").is_empty());
        assert!(found("zzz", "web").is_empty());
        assert!(backends_of(&[], "shop", "web").is_empty());
    }
}
