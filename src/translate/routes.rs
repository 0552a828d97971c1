//! Route derivation: our Ingresses → [`HostTable`] with routes per host in precedence order,
//! conflicts resolved, backends referenced by [`BackendId`] (brief §4.3). Endpoints are resolved
//! separately ([`super::resolve_endpoints`]).
//!
//! Owns: rule iteration, conflict resolution, precedence sorting, policy assembly. Must not
//! import tokio, hyper or the filesystem.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::IngressBackend;

use crate::model::{
    BackendId, HostRoutes, HostTable, IngressRef, PathKind, Route, RoutePolicy, RouteTarget,
    SslRedirect, UpstreamProtocol,
};

use super::annotations::{self, Annotations};
use super::backends::{BackendError, BorrowedKey, resolve_service};
use super::hosts::{HostKey, parse_host};
use super::index::{self, FastMap, Index};
use super::paths::parse_path;
use super::policies::{self, Limits};
use super::{BackendSpec, Diags, Inputs, ObjRef, Options, Routes, class, tls};

/// What a route will point at, before backend ids are assigned.
enum Plan {
    /// Index into the backend specs in first-seen order (renumbered in key order at the end).
    Backend(u32),
    Unavailable(String),
}

struct Candidate {
    kind: PathKind,
    /// Empty until the claim map hands the path back (see `derive`).
    path: String,
    /// Index into the per-Ingress references.
    ingress: u32,
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

/// Position as a `u32` id; translate's tables are far below 2^32 entries (the API's object
/// count is), and saturating keeps this total without a panic path.
fn id(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Derive the endpoint-independent part of the snapshot.
///
/// Issue 6 (10 000 Ingresses, 50 000 paths): everything met once per path is interned or
/// borrowed from the inputs, so a path costs its normalised `String` and its `Arc<Route>`, and
/// every map it touches is a foldhash map keyed by small ids or borrowed `&str`s. Hosts are
/// interned per rule ([`HostKey`] → id), backends per Service port ([`BorrowedKey`] → id, the
/// owned [`crate::model::BackendKey`] built once), and the claim map owns each path until the
/// routes are built. No hash map is iterated into the output: ids are positions in visit
/// order, and the host table and backend list are sorted or placed by id.
pub(super) fn derive<'a>(inputs: &'a Inputs, opts: &Options, diags: &mut Diags) -> Routes {
    let index = Index::new(inputs, diags);
    class::check_defaults(&index, opts, diags);
    let ours: Vec<_> = index
        .ingresses
        .iter()
        .copied()
        .filter(|i| class::is_ours(i, &index, opts))
        .collect();
    // A canary is not served (annotations::NGINX_CANARY): its TLS and policies apply to
    // nothing either.
    let served: Vec<_> = ours
        .iter()
        .copied()
        .filter(|i| !annotations::is_canary(i.metadata.annotations.as_ref()))
        .collect();
    let tls = tls::build(&served, &index, opts, diags);
    let limits = policies::build(inputs, &served, opts, diags);

    let mut backends = Backends {
        specs: Vec::with_capacity(inputs.services.len()),
        ids: FastMap::with_capacity_and_hasher(inputs.services.len(), Default::default()),
    };
    let mut resolve = |ns: &'a str,
                       backend: &'a IngressBackend,
                       ann: &Annotations,
                       obj: &ObjRef<'_>,
                       what: fmt::Arguments<'_>,
                       diags: &mut Diags| {
        backends.resolve(&index, ns, backend, ann, obj, what, diags)
    };

    let mut anns: Vec<Annotations> = Vec::with_capacity(ours.len());
    let mut refs: Vec<IngressRef> = Vec::with_capacity(ours.len());
    // Hosts by id (first-seen order) and the candidates of each.
    let mut hosts: Vec<HostKey> = Vec::with_capacity(ours.len());
    let mut host_ids: FastMap<HostKey, u32> =
        FastMap::with_capacity_and_hasher(ours.len(), Default::default());
    let mut per_host: Vec<Vec<Candidate>> = Vec::with_capacity(ours.len());
    let mut default: Option<Candidate> = None;
    // (host, kind, path) → the candidate that holds it, as (host id, position). Ingresses are
    // visited oldest first, so the first claim is the winner (brief §4.3 conflicts). The map
    // owns the path (no second copy per path) and gives it back to its candidate at the end;
    // only looked up, never iterated into the output.
    let mut claims: FastMap<(u32, PathKind, String), (u32, u32)> =
        FastMap::with_capacity_and_hasher(inputs.ingresses.len() * 4, Default::default());

    for ing in &ours {
        let meta = &ing.metadata;
        let obj = index::obj_ref(meta);
        let ingress = id(refs.len());
        refs.push(IngressRef {
            namespace: Arc::from(obj.namespace),
            name: Arc::from(obj.name),
        });
        let ann_idx = anns.len();
        anns.push(annotations::parse(
            meta.annotations.as_ref(),
            &opts.defaults,
            obj,
            diags,
        ));
        let ann = &anns[ann_idx];
        let Some(spec) = ing.spec.as_ref().filter(|_| !ann.canary) else {
            continue;
        };
        // The last backend a path of this Ingress resolved to (see below).
        let mut last: Option<(&IngressBackend, u32, UpstreamProtocol)> = None;

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
                        kind: PathKind::Prefix,
                        path: "/".to_string(),
                        ingress,
                        plan,
                        protocol,
                        ann: ann_idx,
                    });
                }
                Some(winner) => {
                    let held = &refs[winner.ingress as usize];
                    diags.error(
                        "Ingress",
                        &obj,
                        "DefaultBackendConflict",
                        format!(
                            "spec.defaultBackend is not used: the default backend comes from \
                             Ingress {}/{} (older, or first in namespace/name order)",
                            held.namespace, held.name
                        ),
                    )
                }
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
            let host_id = match host_ids.get(&host) {
                Some(h) => *h,
                None => {
                    let h = id(hosts.len());
                    host_ids.insert(host.clone(), h);
                    hosts.push(host.clone());
                    per_host.push(Vec::with_capacity(http.paths.len()));
                    h
                }
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
                let list = &mut per_host[host_id as usize];
                let at = (host_id, id(list.len()));
                let slot;
                let path = match claims.entry((host_id, rule_path.kind, rule_path.path)) {
                    Entry::Occupied(o) => {
                        let (h, i) = *o.get();
                        let holder = per_host
                            .get(h as usize)
                            .and_then(|l| l.get(i as usize))
                            .and_then(|c| refs.get(c.ingress as usize));
                        let (ns, name) = holder
                            .map(|r| (&*r.namespace, &*r.name))
                            .unwrap_or_default();
                        diags.error(
                            "Ingress",
                            &obj,
                            "PathConflict",
                            format!(
                                "host {host} {} {} is already served by Ingress {ns}/{name} \
                                 (older, or first in namespace/name order); this path is not \
                                 used",
                                kind_name(rule_path.kind),
                                o.key().2,
                            ),
                        );
                        continue;
                    }
                    Entry::Vacant(v) => {
                        slot = v.insert_entry(at);
                        slot.key().2.as_str()
                    }
                };
                // Consecutive paths of one Ingress usually name one backend: the result of
                // the last successful resolution is reused (same namespace, backend and
                // annotations give the same spec, and its health-check merge already ran:
                // repeating it could only repeat a diagnostic, which `Diags` deduplicates).
                // A failure is not reused: its diagnostic names the path.
                let (plan, protocol) = match last {
                    Some((b, at, protocol)) if *b == p.backend => (Plan::Backend(at), protocol),
                    _ => {
                        // Only formatted when a diagnostic is emitted.
                        let what = format_args!("host {host} path {path}");
                        let resolved = resolve(obj.namespace, &p.backend, ann, &obj, what, diags);
                        last = match resolved.0 {
                            Plan::Backend(at) => Some((&p.backend, at, resolved.1)),
                            Plan::Unavailable(_) => None,
                        };
                        resolved
                    }
                };
                per_host[host_id as usize].push(Candidate {
                    kind: rule_path.kind,
                    path: String::new(),
                    ingress,
                    plan,
                    protocol,
                    ann: ann_idx,
                });
            }
        }
    }
    // Every claim is a candidate's path: hand each back (placed by position, so the map's
    // order does not matter).
    for ((_, _, path), (h, i)) in claims.drain() {
        if let Some(c) = per_host
            .get_mut(h as usize)
            .and_then(|l| l.get_mut(i as usize))
        {
            c.path = path;
        }
    }

    // Backend ids in key order, so the table does not depend on input order. Keys are unique,
    // so an unstable sort is still deterministic.
    let mut tagged: Vec<(u32, BackendSpec)> = backends
        .specs
        .into_iter()
        .enumerate()
        .map(|(i, s)| (id(i), s))
        .collect();
    tagged.sort_unstable_by(|a, b| a.1.key.cmp(&b.1.key));
    let mut backend_ids = vec![BackendId(u32::MAX); tagged.len()];
    for (new, (old, _)) in tagged.iter().enumerate() {
        backend_ids[*old as usize] = BackendId(id(new));
    }
    let specs: Vec<BackendSpec> = tagged.into_iter().map(|(_, s)| s).collect();

    let mut builder = RouteBuilder {
        anns: &anns,
        refs: &refs,
        backend_ids: &backend_ids,
        limits: &limits,
        policies: FastMap::default(),
    };
    let mut table = HostTable {
        // The default backend serves hosts it does not name: each request's own host decides.
        default_route: default.map(|c| builder.route(c, SslRedirect::IfHostHasTls)),
        ..HostTable::default()
    };
    // The candidates are drained, not consumed: their buffers are freed together after the
    // loop, so the route allocations below come from fresh heap instead of from the holes
    // of buffers freed one host at a time (callgrind: that cost the allocator 1.7 % of a
    // full translate).
    for (host, candidates) in hosts.into_iter().zip(per_host.iter_mut()) {
        // A host whose every path was skipped (invalid, or `paths: []`) routes nothing of its
        // own: an empty entry would still be the host's match and hide the catch-all rule,
        // the wildcard and the default backend from it (brief §2: a bad object never takes
        // other routes down).
        if candidates.is_empty() {
            continue;
        }
        // A redirect to HTTPS only makes sense where a valid certificate of the host's own
        // serves (brief §4.4: a rejected TLS entry means "no redirect"). An exact host's answer
        // is known now; a wildcard rule without a wildcard certificate and the catch-all rule
        // also serve hosts with certificates of their own, so there the request's host decides.
        let host_tls = match &host {
            HostKey::Exact(h) if tls.has_tls_for(h) => SslRedirect::Yes,
            HostKey::Exact(_) => SslRedirect::No,
            HostKey::Wildcard(s)
                if tls.wildcard.contains_key(s) || tls.default_wildcard.contains(s) =>
            {
                SslRedirect::Yes
            }
            HostKey::Wildcard(_) | HostKey::CatchAll => SslRedirect::IfHostHasTls,
        };
        // Exactly sized, and not `collect`ed from `candidates`: that would reuse the
        // candidates' allocation in place (8 times the size of the `Arc`s it ends up
        // holding), and the host table keeps this `Vec` for as long as the snapshot lives
        // (issue 6: 2.8 MB at 10 000 Ingresses).
        let mut routes: Vec<Arc<Route>> = Vec::with_capacity(candidates.len());
        routes.extend(candidates.drain(..).map(|c| builder.route(c, host_tls)));
        // Precedence (brief §4.3): longest path first, Exact before Prefix at equal length;
        // the path itself breaks remaining ties so the order is total.
        routes.sort_by(|a, b| {
            (Reverse(a.path.len()), a.kind, &a.path).cmp(&(Reverse(b.path.len()), b.kind, &b.path))
        });
        let entry = HostRoutes::new(routes);
        match host {
            HostKey::Exact(h) => {
                table.exact.insert(h, entry);
            }
            HostKey::Wildcard(s) => {
                table.wildcard.insert(s, entry);
            }
            HostKey::CatchAll => table.catch_all = Some(entry),
        }
    }

    Routes {
        hosts: Arc::new(table),
        tls: Arc::new(tls),
        backends: Arc::from(specs),
    }
}

/// The backends routes refer to, in first-seen order; the map finds a Service port's spec by
/// borrowed key, so the owned key is built once per backend, not once per path.
struct Backends<'a> {
    specs: Vec<BackendSpec>,
    ids: FastMap<BorrowedKey<'a>, u32>,
}

impl<'a> Backends<'a> {
    #[allow(clippy::too_many_arguments)] // why: one call site, each argument a different input
    fn resolve(
        &mut self,
        index: &Index<'a>,
        ns: &'a str,
        backend: &'a IngressBackend,
        ann: &Annotations,
        obj: &ObjRef<'_>,
        what: fmt::Arguments<'_>,
        diags: &mut Diags,
    ) -> (Plan, UpstreamProtocol) {
        if let Some(name) = &ann.access_control {
            let e = BackendError::UnsupportedAccessControl(name.clone());
            diags.error("Ingress", obj, e.reason(), format!("{what}: {e}"));
            return (Plan::Unavailable(e.to_string()), UpstreamProtocol::Http1);
        }
        match resolve_service(ns, backend, index, &ann.backend_protocol) {
            Ok(found) => {
                let specs = &mut self.specs;
                let at = *self.ids.entry(found.key).or_insert_with(|| {
                    specs.push(found.spec());
                    id(specs.len() - 1)
                });
                if let Some(spec) = specs.get_mut(at as usize) {
                    merge_health_check(spec, ann, found.protocol, obj, diags);
                }
                (Plan::Backend(at), found.protocol)
            }
            Err(e) => {
                diags.error("Ingress", obj, e.reason(), format!("{what}: {e}"));
                (Plan::Unavailable(e.to_string()), UpstreamProtocol::Http1)
            }
        }
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
                "the health check for Service {} is ignored: active checks speak HTTP/1.1 and \
                 this backend is HTTP/2 cleartext (h2c/gRPC)",
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
    refs: &'a [IngressRef],
    /// First-seen backend position → id in the key-ordered table.
    backend_ids: &'a [BackendId],
    /// Valid RateLimitPolicies by target Ingress (brief §4.5).
    limits: &'a Limits,
    /// Routes with the same parameters share one policy allocation.
    policies: FastMap<(usize, SslRedirect, UpstreamProtocol), Arc<RoutePolicy>>,
}

impl RouteBuilder<'_> {
    /// `host_tls`: what the redirect is where the Ingress does not opt out of it.
    fn route(&mut self, c: Candidate, host_tls: SslRedirect) -> Arc<Route> {
        let (anns, limits) = (self.anns, self.limits);
        let ingress = self
            .refs
            .get(c.ingress as usize)
            .cloned()
            .unwrap_or_else(|| IngressRef {
                namespace: Arc::from(""),
                name: Arc::from(""),
            });
        // The cache key holds the Ingress (through `c.ann`), so its limits are the same for
        // every route sharing the entry.
        let policy = self
            .policies
            .entry((c.ann, host_tls, c.protocol))
            .or_insert_with(|| {
                let rate_limits = limits.get(&ingress).cloned().unwrap_or_default();
                let a = anns.get(c.ann);
                Arc::new(match a {
                    Some(a) => RoutePolicy {
                        rate_limits,
                        connect_timeout: a.connect_timeout,
                        read_timeout: a.read_timeout,
                        body_limit: a.body_limit,
                        ssl_redirect: if a.ssl_redirect {
                            host_tls
                        } else {
                            SslRedirect::No
                        },
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
        let target = match c.plan {
            Plan::Backend(at) => match self.backend_ids.get(at as usize) {
                Some(id) => RouteTarget::Backend(*id),
                None => RouteTarget::Unavailable {
                    reason: format!("backend #{at} missing from the table"),
                },
            },
            Plan::Unavailable(reason) => RouteTarget::Unavailable { reason },
        };
        Arc::new(Route {
            kind: c.kind,
            path: c.path,
            ingress,
            target,
            policy,
        })
    }
}
