//! Per-route metric handles for the request path: `portico_requests_total`,
//! `portico_request_duration_seconds` and `portico_upstream_duration_seconds` children of one
//! (Ingress, Service) pair, resolved once and reused.
//!
//! prometheus' `with_label_values` hashes every label value and takes the vector's lock on
//! each call; three such calls per request were about 4 % of a keep-alive request's
//! instructions (callgrind). Here a request does one lookup keyed by the route's shared names
//! (foldhash over two or three short strings) and then updates the handles directly.
//!
//! The key set is the (Ingress, Service) pairs of routes that served, bounded by the
//! configuration, not by clients. When an Ingress leaves the configuration its entries go, and
//! so do its series in every per-route vector ([`RouteMetricsCache::prune`], run by the task
//! that follows snapshots), so preview environments that come and go do not grow the exported
//! series for ever. Must not import kube or k8s-openapi.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};

use http::{Method, StatusCode};
use prometheus::{Histogram, IntCounter};

use crate::metrics::{Metrics, label, remove_series};
use crate::model::{IngressRef, RouteTarget, Snapshot};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The route a request's metrics are labelled with: its Ingress and Service, either absent
/// (label `""`) when the request never got that far.
pub(super) type RouteKey = (Option<IngressRef>, Option<Arc<str>>);

/// The handles of one route.
pub(super) struct RouteMetrics {
    key: RouteKey,
    pub(super) request_duration: Histogram,
    pub(super) upstream_duration: Histogram,
    /// `portico_requests_total` children by (status, method), resolved on first use. Status
    /// codes are three digits (hyper refuses others) and methods map to ten labels, so this
    /// holds at most a few thousand entries, usually one or two.
    requests: RwLock<FastMap<(u16, &'static str), IntCounter>>,
    metrics: Arc<Metrics>,
}

/// namespace, ingress, service labels of a route.
fn labels((ingress, service): &RouteKey) -> [&str; 3] {
    [
        ingress.as_ref().map_or("", |i| &i.namespace),
        ingress.as_ref().map_or("", |i| &i.name),
        service.as_deref().unwrap_or_default(),
    ]
}

impl RouteMetrics {
    /// Count one finished request.
    pub(super) fn count(&self, status: StatusCode, method: &Method) {
        // Upstream codes pass through unchanged and hyper takes any from 100 to 999: beyond the
        // five classes RFC 9110 defines, a backend could mint series at will, so they share one.
        let standard = (100..600).contains(&status.as_u16());
        let key = (
            if standard { status.as_u16() } else { 0 },
            method_label(method),
        );
        if let Some(c) = self
            .requests
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            c.inc();
            return;
        }
        let [namespace, ingress, service] = labels(&self.key);
        let counter = self
            .requests
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert_with(|| {
                self.metrics.requests.with_label_values(&[
                    namespace,
                    ingress,
                    service,
                    if standard { status.as_str() } else { "other" },
                    key.1,
                ])
            })
            .clone();
        counter.inc();
    }
}

/// The cache of [`RouteMetrics`], shared by every request of one handler.
pub(super) struct RouteMetricsCache {
    metrics: Arc<Metrics>,
    routes: RwLock<FastMap<RouteKey, Arc<RouteMetrics>>>,
}

impl RouteMetricsCache {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        RouteMetricsCache {
            metrics,
            routes: RwLock::new(FastMap::default()),
        }
    }

    /// The handles for `ingress` and `service` (either may be absent).
    pub(super) fn get(
        &self,
        ingress: Option<&IngressRef>,
        service: Option<&Arc<str>>,
    ) -> Arc<RouteMetrics> {
        let key: RouteKey = (ingress.cloned(), service.cloned());
        if let Some(m) = self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return m.clone();
        }
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert_with_key(|key| {
                let l = labels(key);
                Arc::new(RouteMetrics {
                    key: key.clone(),
                    request_duration: self.metrics.request_duration.with_label_values(&l),
                    upstream_duration: self.metrics.upstream_duration.with_label_values(&l),
                    requests: RwLock::new(FastMap::default()),
                    metrics: self.metrics.clone(),
                })
            })
            .clone()
    }
}

impl RouteMetricsCache {
    /// Forget the routes `snap` (the serving snapshot; `None`: none) no longer has, with their
    /// series: requests and durations of an (Ingress, Service) pair that is gone (the Ingress
    /// left, or now routes to another Service), and the rate-limit and concurrency rejections
    /// of an Ingress that left or of a policy no longer attached to it. Requests that never
    /// reached a route (empty labels) stay.
    pub(super) fn prune(&self, snap: Option<&Snapshot>) {
        let routes = snap.iter().flat_map(|s| {
            let h = &*s.hosts;
            h.exact
                .values()
                .chain(h.wildcard.values())
                .chain(h.catch_all.iter())
                .flat_map(|r| r.routes().iter())
                .chain(h.default_route.iter())
                .map(move |r| (s, r))
        });
        let mut ingresses: HashSet<(&str, &str)> = HashSet::new();
        let mut pairs: HashSet<(&str, &str, &str)> = HashSet::new();
        let mut policies: HashSet<(&str, &str, &str)> = HashSet::new();
        for (s, r) in routes {
            let (ns, name) = (&*r.ingress.namespace, &*r.ingress.name);
            ingresses.insert((ns, name));
            if let RouteTarget::Backend(id) = &r.target
                && let Some(b) = s.backends.get(*id)
            {
                pairs.insert((ns, name, &*b.key.service));
            }
            for l in r.policy.rate_limits.iter() {
                policies.insert((ns, name, &*l.policy.name));
            }
        }
        let listed = |ns: &str, name: &str| {
            (ns.is_empty() && name.is_empty()) || ingresses.contains(&(ns, name))
        };
        let mut gone = Vec::new();
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(ingress, service), m| {
                let keep = match (ingress, service) {
                    (None, _) => true,
                    (Some(i), None) => listed(&i.namespace, &i.name),
                    (Some(i), Some(svc)) => pairs.contains(&(&i.namespace, &i.name, svc)),
                };
                if !keep {
                    gone.push(m.clone());
                }
                keep
            });
        let m = &self.metrics;
        for route in gone {
            let l = labels(&route.key);
            let _ = m.request_duration.remove_label_values(&l);
            let _ = m.upstream_duration.remove_label_values(&l);
            let requests = route
                .requests
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            for (status, method) in requests.keys() {
                let code = StatusCode::from_u16(*status).map(|c| c.as_str().to_string());
                let status = code.unwrap_or_else(|_| "other".to_string());
                let _ = m
                    .requests
                    .remove_label_values(&[l[0], l[1], l[2], &status, method]);
            }
        }
        // Series made without a cached handle: read them from the vectors themselves.
        for vec in [&m.ratelimit_rejected, &m.concurrency_rejected] {
            remove_series(vec, |l, _| {
                let (ns, name, policy) = (
                    label(l, "namespace"),
                    label(l, "ingress"),
                    label(l, "policy"),
                );
                let attached = policy.is_empty() || policies.contains(&(ns, name, policy));
                !listed(ns, name) || !attached
            });
        }
    }
}

/// The `method` label: the nine methods of RFC 9110 §9 and PATCH by name, anything else as
/// `OTHER` (a client must not be able to create series at will).
pub(super) fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = metrics
            .registry
            .gather()
            .into_iter()
            .find(|f| f.name() == name)?;
        let m = family.get_metric().iter().find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })?;
        Some(if name.ends_with("_total") {
            m.get_counter().get_value()
        } else {
            m.get_histogram().get_sample_count() as f64
        })
    }

    /// An Ingress that leaves the host table takes its cache entries and its series with it;
    /// the others, and requests that never reached a route, stay. When it comes back it
    /// counts from zero on live series.
    #[test]
    fn prune_forgets_ingresses_that_left() {
        use crate::model::{
            Backend, BackendKey, BackendTable, HostRoutes, HostTable, PathKind, Route, RoutePolicy,
            RouteTarget, ServicePortRef,
        };
        let metrics = Arc::new(Metrics::new());
        let cache = RouteMetricsCache::new(metrics.clone());
        let ing = |name: &str| IngressRef {
            namespace: "ns".into(),
            name: name.into(),
        };
        let svc: Arc<str> = Arc::from("api");
        for name in ["kept", "gone"] {
            cache
                .get(Some(&ing(name)), Some(&svc))
                .count(StatusCode::OK, &Method::GET);
            metrics
                .ratelimit_rejected
                .with_label_values(&["ns", name, "p"])
                .inc();
        }
        cache
            .get(None, None)
            .count(StatusCode::NOT_FOUND, &Method::GET);
        metrics
            .concurrency_rejected
            .with_label_values(&["global", "", "", ""])
            .inc();
        // `kept` routes to Service `service`, with policy `p` attached.
        let snapshot = |service: &str| {
            let mut hosts = HostTable::default();
            let policy = RoutePolicy {
                rate_limits: Arc::from(vec![crate::model::RateLimit {
                    policy: crate::model::PolicyRef {
                        namespace: "ns".into(),
                        name: "p".into(),
                        uid: "".into(),
                    },
                    bucket: None,
                    key: crate::model::RateLimitKey::Global,
                    max_in_flight: Some(1),
                }]),
                ..RoutePolicy::default()
            };
            hosts.exact.insert(
                "h".into(),
                HostRoutes::new(vec![Arc::new(Route {
                    kind: PathKind::Prefix,
                    path: "/".into(),
                    ingress: ing("kept"),
                    target: RouteTarget::Backend(crate::model::BackendId(0)),
                    policy: Arc::new(policy),
                })]),
            );
            Snapshot {
                hosts: Arc::new(hosts),
                backends: Arc::new(BackendTable {
                    backends: vec![Backend {
                        key: BackendKey {
                            namespace: "ns".into(),
                            service: service.into(),
                            port: ServicePortRef::Number(80),
                        },
                        endpoints: Arc::from(Vec::new()),
                        draining_fallback: false,
                        health_check: None,
                    }],
                }),
                ..Snapshot::default()
            }
        };
        metrics
            .ratelimit_rejected
            .with_label_values(&["ns", "kept", "detached"])
            .inc();
        cache.prune(Some(&snapshot("api")));
        let req = |name: &str| {
            value(
                &metrics,
                "portico_requests_total",
                &[("ingress", name), ("status", "200")],
            )
        };
        assert_eq!(req("kept"), Some(1.0));
        assert_eq!(req("gone"), None);
        let dur = |name: &str| {
            value(
                &metrics,
                "portico_request_duration_seconds",
                &[("ingress", name)],
            )
        };
        assert!(dur("kept").is_some() && dur("gone").is_none());
        let limited = |name: &str| {
            value(
                &metrics,
                "portico_ratelimit_rejected_total",
                &[("ingress", name)],
            )
        };
        assert_eq!((limited("kept"), limited("gone")), (Some(1.0), None));
        // A policy no longer attached to the Ingress takes its series with it.
        assert_eq!(
            value(
                &metrics,
                "portico_ratelimit_rejected_total",
                &[("policy", "detached")],
            ),
            None
        );
        assert_eq!(
            value(
                &metrics,
                "portico_requests_total",
                &[("ingress", ""), ("status", "404")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &metrics,
                "portico_concurrency_rejected_total",
                &[("scope", "global")]
            ),
            Some(1.0)
        );
        // Back again: a fresh entry on a live series.
        cache
            .get(Some(&ing("gone")), Some(&svc))
            .count(StatusCode::OK, &Method::GET);
        assert_eq!(req("gone"), Some(1.0));
        // `kept` now routes to another Service: its (kept, api) series go.
        cache.prune(Some(&snapshot("web")));
        assert_eq!(req("kept"), None);
        assert!(dur("kept").is_none());
        cache
            .get(Some(&ing("kept")), Some(&Arc::from("web")))
            .count(StatusCode::OK, &Method::GET);
        assert_eq!(req("kept"), Some(1.0));
        // No snapshot at all: every Ingress's series go.
        cache.prune(None);
        assert_eq!((req("kept"), req("gone")), (None, None));
    }

    #[test]
    fn cached_handles_update_the_same_series_as_the_vectors() {
        let metrics = Arc::new(Metrics::new());
        let cache = RouteMetricsCache::new(metrics.clone());
        let ing = IngressRef {
            namespace: "ns".into(),
            name: "web".into(),
        };
        let svc: Arc<str> = Arc::from("api");
        let a = cache.get(Some(&ing), Some(&svc));
        let b = cache.get(Some(&ing), Some(&svc));
        assert!(Arc::ptr_eq(&a, &b), "one entry per route");
        a.count(StatusCode::OK, &Method::GET);
        b.count(StatusCode::OK, &Method::GET);
        a.count(
            StatusCode::NOT_FOUND,
            &Method::from_bytes(b"BREW").expect("method"),
        );
        a.request_duration.observe(0.5);
        let labels = [("namespace", "ns"), ("ingress", "web"), ("service", "api")];
        let ok = [labels.as_slice(), &[("status", "200"), ("method", "GET")]].concat();
        let other = [labels.as_slice(), &[("status", "404"), ("method", "OTHER")]].concat();
        assert_eq!(value(&metrics, "portico_requests_total", &ok), Some(2.0));
        assert_eq!(value(&metrics, "portico_requests_total", &other), Some(1.0));
        assert_eq!(
            value(&metrics, "portico_request_duration_seconds", &labels),
            Some(1.0)
        );

        // A request that never reached a route is labelled with empty names.
        let none = cache.get(None, None);
        assert!(!Arc::ptr_eq(&none, &a));
        none.count(StatusCode::NOT_FOUND, &Method::GET);
        let empty = [
            ("namespace", ""),
            ("ingress", ""),
            ("service", ""),
            ("status", "404"),
        ];
        assert_eq!(value(&metrics, "portico_requests_total", &empty), Some(1.0));

        // Codes past the five standard classes (a backend may send any from 100 to 999) share
        // one series instead of minting one each.
        for code in [600, 777, 999] {
            a.count(StatusCode::from_u16(code).expect("code"), &Method::GET);
        }
        let odd = [labels.as_slice(), &[("status", "other"), ("method", "GET")]].concat();
        assert_eq!(value(&metrics, "portico_requests_total", &odd), Some(3.0));
        let family = metrics
            .registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "portico_requests_total")
            .expect("family");
        assert_eq!(
            family.get_metric().len(),
            4,
            "200, 404/OTHER, other, and the empty route's 404"
        );
    }
}
