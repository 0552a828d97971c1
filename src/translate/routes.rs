//! Route derivation: our Ingresses → [`HostTable`] with routes per host in precedence order,
//! conflicts resolved, backends referenced by [`BackendId`] (brief §4.3). Endpoints are resolved
//! separately ([`super::resolve_endpoints`]).
//!
//! Owns: rule iteration, conflict resolution, precedence sorting, policy assembly. Must not
//! import tokio, hyper or the filesystem.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::IngressBackend;

use crate::model::{
    BackendId, BackendKey, HostRoutes, HostTable, IngressRef, PathKind, Route, RoutePolicy,
    RouteTarget, TlsTable, UpstreamProtocol,
};

use super::annotations::{self, Annotations};
use super::backends::resolve_service;
use super::hosts::{HostKey, parse_host};
use super::index::{self, Index};
use super::paths::parse_path;
use super::policies::{self, Limits};
use super::{BackendSpec, Diags, Inputs, ObjRef, Options, Routes, class, tls};

/// What a route will point at, before backend ids are assigned.
enum Plan {
    Backend(BackendKey),
    Unavailable(String),
}

struct Candidate {
    host: HostKey,
    kind: PathKind,
    path: String,
    ingress: IngressRef,
    plan: Plan,
    protocol: UpstreamProtocol,
    /// Index into the per-Ingress annotations.
    ann: usize,
}

fn kind_name(k: PathKind) -> &'static str {
    match k {
        PathKind::Exact => "Exact",
        PathKind::Prefix => "Prefix",
    }
}

/// Derive the endpoint-independent part of the snapshot.
pub(super) fn derive(inputs: &Inputs, opts: &Options, diags: &mut Diags) -> Routes {
    let index = Index::new(inputs, diags);
    let ours: Vec<_> = index
        .ingresses
        .iter()
        .copied()
        .filter(|i| class::is_ours(i, &index, opts))
        .collect();
    let tls = tls::build(&ours, &index, opts, diags);
    let limits = policies::build(inputs, diags);

    let mut specs: BTreeMap<BackendKey, BackendSpec> = BTreeMap::new();
    let mut resolve = |ns: &str,
                       backend: &IngressBackend,
                       ann: &Annotations,
                       obj: &ObjRef<'_>,
                       what: fmt::Arguments<'_>,
                       diags: &mut Diags| {
        match resolve_service(ns, backend, &index, &ann.backend_protocol) {
            Ok((spec, protocol)) => {
                let key = spec.key.clone();
                let entry = specs.entry(key.clone()).or_insert(spec);
                merge_health_check(entry, ann, protocol, obj, diags);
                (Plan::Backend(key), protocol)
            }
            Err(e) => {
                diags.error("Ingress", obj, e.reason(), format!("{what}: {e}"));
                (Plan::Unavailable(e.to_string()), UpstreamProtocol::Http1)
            }
        }
    };

    let mut anns: Vec<Annotations> = Vec::with_capacity(ours.len());
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut default: Option<Candidate> = None;
    // (host, kind, path) → the Ingress that holds it. Ingresses are visited oldest first, so
    // the first claim is the winner (brief §4.3 conflicts).
    // Only looked up, never iterated, so a hash map (no ordered string comparisons); the winner
    // is remembered by reference and named only when a conflict is reported.
    let mut claims: HashMap<(HostKey, PathKind, String), IngressRef> =
        HashMap::with_capacity(inputs.ingresses.len() * 4);

    for ing in &ours {
        let meta = &ing.metadata;
        let obj = index::obj_ref(meta);
        let ingress = IngressRef {
            namespace: Arc::from(obj.namespace),
            name: Arc::from(obj.name),
        };
        let ann_idx = anns.len();
        anns.push(annotations::parse(
            meta.annotations.as_ref(),
            &opts.defaults,
            obj,
            diags,
        ));
        let ann = &anns[ann_idx];
        let Some(spec) = ing.spec.as_ref() else {
            continue;
        };

        if let Some(backend) = &spec.default_backend {
            match &default {
                None => {
                    let (plan, protocol) = resolve(
                        obj.namespace,
                        backend,
                        ann,
                        &obj,
                        format_args!("defaultBackend"),
                        diags,
                    );
                    default = Some(Candidate {
                        host: HostKey::CatchAll,
                        kind: PathKind::Prefix,
                        path: "/".to_string(),
                        ingress: ingress.clone(),
                        plan,
                        protocol,
                        ann: ann_idx,
                    });
                }
                Some(winner) => diags.error(
                    "Ingress",
                    &obj,
                    "DefaultBackendConflict",
                    format!(
                        "spec.defaultBackend is not used: the default backend comes from Ingress \
                         {}/{} (older, or first in namespace/name order)",
                        winner.ingress.namespace, winner.ingress.name
                    ),
                ),
            }
        }

        for rule in spec.rules.as_deref().unwrap_or_default() {
            let host = match parse_host(rule.host.as_deref()) {
                Ok(h) => h,
                Err(e) => {
                    diags.error("Ingress", &obj, "InvalidHost", format!("rule skipped: {e}"));
                    continue;
                }
            };
            let Some(http) = &rule.http else {
                continue;
            };
            for p in &http.paths {
                let shown = p.path.as_deref().unwrap_or_default();
                let rule_path = match parse_path(p.path.as_deref(), &p.path_type) {
                    Ok(r) => r,
                    Err(e) => {
                        diags.error(
                            "Ingress",
                            &obj,
                            e.reason(),
                            format!("host {host}: path skipped: {e}"),
                        );
                        continue;
                    }
                };
                if rule_path.defaulted_type {
                    diags.warn(
                        "Ingress",
                        &obj,
                        "MissingPathType",
                        format!(
                            "host {host} path {shown:?}: pathType missing, treated as \
                             ImplementationSpecific (Prefix)"
                        ),
                    );
                }
                if rule_path.defaulted_path {
                    diags.warn(
                        "Ingress",
                        &obj,
                        "MissingPath",
                        format!("host {host}: path missing, treated as `/`"),
                    );
                }
                let claim = (host.clone(), rule_path.kind, rule_path.path.clone());
                match claims.entry(claim) {
                    Entry::Occupied(o) => {
                        diags.error(
                            "Ingress",
                            &obj,
                            "PathConflict",
                            format!(
                                "host {host} {} {} is already served by Ingress {} (older, or \
                                 first in namespace/name order); this path is not used",
                                kind_name(rule_path.kind),
                                rule_path.path,
                                format_args!("{}/{}", o.get().namespace, o.get().name)
                            ),
                        );
                        continue;
                    }
                    Entry::Vacant(v) => {
                        v.insert(ingress.clone());
                    }
                }
                // Only formatted when a diagnostic is emitted.
                let what = format_args!("host {host} path {}", rule_path.path);
                let (plan, protocol) = resolve(obj.namespace, &p.backend, ann, &obj, what, diags);
                candidates.push(Candidate {
                    host: host.clone(),
                    kind: rule_path.kind,
                    path: rule_path.path,
                    ingress: ingress.clone(),
                    plan,
                    protocol,
                    ann: ann_idx,
                });
            }
        }
    }

    // Backend ids in key order, so the table does not depend on input order.
    let specs: Vec<BackendSpec> = specs.into_values().collect();
    let ids: HashMap<&BackendKey, BackendId> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (&s.key, BackendId(u32::try_from(i).unwrap_or(u32::MAX))))
        .collect();

    let mut builder = RouteBuilder {
        anns: &anns,
        ids: &ids,
        tls: &tls,
        limits: &limits,
        policies: HashMap::new(),
    };
    let mut per_host: BTreeMap<HostKey, Vec<Arc<Route>>> = BTreeMap::new();
    for c in candidates {
        let route = builder.route(&c);
        per_host.entry(c.host).or_default().push(route);
    }
    let mut hosts = HostTable {
        default_route: default.as_ref().map(|c| builder.route(c)),
        ..HostTable::default()
    };
    for (host, mut routes) in per_host {
        // Precedence (brief §4.3): longest path first, Exact before Prefix at equal length;
        // the path itself breaks remaining ties so the order is total.
        routes.sort_by(|a, b| {
            (Reverse(a.path.len()), a.kind, &a.path).cmp(&(Reverse(b.path.len()), b.kind, &b.path))
        });
        let entry = HostRoutes::new(routes);
        match host {
            HostKey::Exact(h) => {
                hosts.exact.insert(h, entry);
            }
            HostKey::Wildcard(s) => {
                hosts.wildcard.insert(s, entry);
            }
            HostKey::CatchAll => hosts.catch_all = Some(entry),
        }
    }

    Routes {
        hosts: Arc::new(hosts),
        tls: Arc::new(tls),
        backends: Arc::from(specs),
    }
}

/// Active health checks are per Service port (brief §4.6): the first Ingress to ask for one on
/// a backend wins (Ingresses are visited oldest first, brief §4.3 precedence); a later Ingress
/// asking for a different check gets a Warning. An Ingress without the annotation expresses no
/// opinion and never turns another Ingress's check off.
fn merge_health_check(
    spec: &mut BackendSpec,
    ann: &Annotations,
    protocol: UpstreamProtocol,
    obj: &ObjRef<'_>,
    diags: &mut Diags,
) {
    let Some(wanted) = &ann.health_check else {
        return;
    };
    // Probes are HTTP/1.1 GETs; an h2c (gRPC) server with prior knowledge refuses them, so
    // every endpoint would be marked down. gRPC has its own health protocol; not spoken here.
    if protocol == UpstreamProtocol::H2c {
        diags.warn(
            "Ingress",
            obj,
            "HealthCheckUnsupported",
            format!(
                "the health check for Service {} is ignored: active checks speak HTTP/1.1 and                  this backend is HTTP/2 cleartext (h2c/gRPC)",
                spec.key
            ),
        );
        return;
    }
    match &spec.health_check {
        None => spec.health_check = Some(wanted.clone()),
        Some(held) if held == wanted => {}
        Some(_) => diags.warn(
            "Ingress",
            obj,
            "HealthCheckConflict",
            format!(
                "the health check for Service {} is ignored: an older Ingress routing to it \
                 (or first in namespace/name order) sets a different one",
                spec.key
            ),
        ),
    }
}

struct RouteBuilder<'a> {
    anns: &'a [Annotations],
    ids: &'a HashMap<&'a BackendKey, BackendId>,
    tls: &'a TlsTable,
    /// Valid RateLimitPolicies by target Ingress (brief §4.5).
    limits: &'a Limits,
    /// Routes with the same parameters share one policy allocation.
    policies: HashMap<(usize, bool, UpstreamProtocol), Arc<RoutePolicy>>,
}

impl RouteBuilder<'_> {
    fn route(&mut self, c: &Candidate) -> Arc<Route> {
        // A redirect to HTTPS only makes sense where a valid certificate of the host's own
        // serves (brief §4.4: a rejected TLS entry means "no redirect").
        let has_tls = match &c.host {
            HostKey::Exact(h) => self.tls.has_cert_for(h),
            HostKey::Wildcard(s) => self.tls.wildcard.contains_key(s),
            HostKey::CatchAll => false,
        };
        let anns = self.anns;
        // The cache key holds the Ingress (through `c.ann`), so its limits are the same for
        // every route sharing the entry.
        let rate_limits = self.limits.get(&c.ingress).cloned().unwrap_or_default();
        let policy = self
            .policies
            .entry((c.ann, has_tls, c.protocol))
            .or_insert_with(|| {
                let a = anns.get(c.ann);
                Arc::new(match a {
                    Some(a) => RoutePolicy {
                        rate_limits,
                        connect_timeout: a.connect_timeout,
                        read_timeout: a.read_timeout,
                        body_limit: a.body_limit,
                        ssl_redirect: a.ssl_redirect && has_tls,
                        hsts: a.hsts.clone(),
                        upstream_protocol: c.protocol,
                        max_concurrent_requests: a.max_concurrent_requests,
                        load_balance: a.load_balance.clone(),
                    },
                    None => RoutePolicy {
                        rate_limits,
                        ..RoutePolicy::default()
                    },
                })
            })
            .clone();
        let target = match &c.plan {
            Plan::Backend(key) => match self.ids.get(key) {
                Some(id) => RouteTarget::Backend(*id),
                None => RouteTarget::Unavailable {
                    reason: format!("backend {key} missing from the table"),
                },
            },
            Plan::Unavailable(reason) => RouteTarget::Unavailable {
                reason: reason.clone(),
            },
        };
        Arc::new(Route {
            kind: c.kind,
            path: c.path.clone(),
            ingress: c.ingress.clone(),
            target,
            policy,
        })
    }
}
