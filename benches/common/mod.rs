//! Synthetic cluster state for the benchmarks: N Ingresses (5 paths each), one Service and one
//! EndpointSlice per Ingress, built with k8s-openapi types exactly as a source would hand them to
//! `translate`. Deterministic: the same `Scale` always yields the same objects.
//!
//! Must not import tokio, hyper or the filesystem (it only builds `translate::Inputs`).
//!
//! Shape (chosen so lookups exercise the real precedence code, not a trivial table):
//! - Ingress `i` lives in namespace `ns{i % 100}`; two Ingresses share each host, so a host
//!   merges 10 routes from two objects (the common "several teams, one host" case);
//! - every fifth host is a one-label wildcard `*.w{h}.bench.test`, the others `h{h}.bench.test`;
//! - paths of Ingress `i`: Exact `/e{i}`, Prefix `/p{i}/api`, `/p{i}/static`, `/p{i}/app/v1`,
//!   ImplementationSpecific `/p{i}/x` (no `/` rule, so a path miss on a known host is possible);
//! - Service `svc{i}` port `http` 80 → EndpointSlice `svc{i}-1` with `endpoints_per_service`
//!   ready IPv4 endpoints on port 8080.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressClass, IngressClassSpec,
    IngressRule, IngressServiceBackend, IngressSpec, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use portico::translate::{Inputs, Slice, Svc};

/// Paths declared by each generated Ingress.
pub const PATHS_PER_INGRESS: usize = 5;
/// Ingresses merged on each host.
pub const INGRESSES_PER_HOST: usize = 2;

/// How big the generated cluster is.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub ingresses: usize,
    pub endpoints_per_service: usize,
}

/// The issue's scale: 10 000 Ingresses / 50 000 paths / 100 000 endpoints.
pub const ISSUE_SCALE: Scale = Scale {
    ingresses: 10_000,
    endpoints_per_service: 10,
};

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.to_string()),
        name: Some(name.to_string()),
        ..Default::default()
    }
}

/// Namespace of Ingress (and Service) `i`.
pub fn namespace(i: usize) -> String {
    format!("ns{}", i % 100)
}

/// Host index of Ingress `i`.
pub fn host_index(i: usize) -> usize {
    i / INGRESSES_PER_HOST
}

/// True when host `h` is a wildcard host.
pub fn is_wildcard(h: usize) -> bool {
    h % 5 == 4
}

/// The rule host of host index `h` as written in the Ingress.
pub fn rule_host(h: usize) -> String {
    if is_wildcard(h) {
        format!("*.w{h}.bench.test")
    } else {
        format!("h{h}.bench.test")
    }
}

fn path(kind: &str, p: String, service: &str) -> HTTPIngressPath {
    HTTPIngressPath {
        path: Some(p),
        path_type: kind.to_string(),
        backend: IngressBackend {
            service: Some(IngressServiceBackend {
                name: service.to_string(),
                port: Some(ServiceBackendPort {
                    name: Some("http".to_string()),
                    number: None,
                }),
            }),
            resource: None,
        },
    }
}

fn ingress(i: usize) -> Ingress {
    let svc = format!("svc{i}");
    let paths = vec![
        path("Exact", format!("/e{i}"), &svc),
        path("Prefix", format!("/p{i}/api"), &svc),
        path("Prefix", format!("/p{i}/static"), &svc),
        path("Prefix", format!("/p{i}/app/v1"), &svc),
        path("ImplementationSpecific", format!("/p{i}/x"), &svc),
    ];
    debug_assert_eq!(paths.len(), PATHS_PER_INGRESS);
    Ingress {
        metadata: meta(&namespace(i), &format!("ing{i}")),
        spec: Some(IngressSpec {
            ingress_class_name: Some("portico".to_string()),
            rules: Some(vec![IngressRule {
                host: Some(rule_host(host_index(i))),
                http: Some(HTTPIngressRuleValue { paths }),
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn service(i: usize) -> Service {
    Service {
        metadata: meta(&namespace(i), &format!("svc{i}")),
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some("http".to_string()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// EndpointSlice of Service `i`; `generation` shifts the addresses so an "endpoint update"
/// really changes every backend.
pub fn endpoint_slice(i: usize, per_service: usize, generation: usize) -> EndpointSlice {
    let mut labels = BTreeMap::new();
    labels.insert("kubernetes.io/service-name".to_string(), format!("svc{i}"));
    let endpoints = (0..per_service)
        .map(|e| {
            // 10.a.b.c: unique per (service, endpoint, generation) for up to 2^24 addresses.
            let n = (i * per_service + e + generation) % (1 << 24);
            Endpoint {
                addresses: vec![format!("10.{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff)],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect::<Vec<_>>();
    let mut metadata = meta(&namespace(i), &format!("svc{i}-1"));
    metadata.labels = Some(labels);
    EndpointSlice {
        metadata,
        address_type: "IPv4".to_string(),
        endpoints: Some(endpoints),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_string()),
            port: Some(8080),
            protocol: Some("TCP".to_string()),
            app_protocol: None,
        }]),
    }
}

/// The whole generated cluster as translate inputs.
pub fn inputs(scale: Scale) -> Inputs {
    let class = IngressClass {
        metadata: ObjectMeta {
            name: Some("portico".to_string()),
            ..Default::default()
        },
        spec: Some(IngressClassSpec {
            controller: Some("portico.dev/ingress-controller".to_string()),
            parameters: None,
        }),
    };
    Inputs {
        ingresses: (0..scale.ingresses).map(|i| Arc::new(ingress(i))).collect(),
        ingress_classes: vec![Arc::new(class)],
        services: (0..scale.ingresses)
            .map(|i| Arc::new(Svc::from(service(i))))
            .collect(),
        endpoint_slices: (0..scale.ingresses)
            .map(|i| {
                Arc::new(Slice::from(endpoint_slice(
                    i,
                    scale.endpoints_per_service,
                    0,
                )))
            })
            .collect(),
        ..Default::default()
    }
}

/// Slices of the same Services with every address moved (an EndpointSlice-only update).
pub fn updated_slices(scale: Scale) -> Vec<Arc<Slice>> {
    (0..scale.ingresses)
        .map(|i| {
            Arc::new(Slice::from(endpoint_slice(
                i,
                scale.endpoints_per_service,
                1,
            )))
        })
        .collect()
}

/// `inputs` with the EndpointSlice of Service `service` replaced (every address moved) and
/// every other object the same `Arc`: the endpoint event issue 6 means (one Service's pods
/// changed).
pub fn with_one_slice_updated(inputs: &Inputs, scale: Scale, service: usize) -> Inputs {
    let mut out = inputs.clone();
    out.endpoint_slices[service] = Arc::new(Slice::from(endpoint_slice(
        service,
        scale.endpoints_per_service,
        scale.ingresses * scale.endpoints_per_service,
    )));
    out
}

/// A request (normalised host, normalised path) and what it must resolve to.
#[derive(Debug, Clone)]
pub struct Query {
    pub host: String,
    pub path: String,
}

/// Which kind of lookup a query set exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    ExactHit,
    PrefixHit,
    WildcardHit,
    Miss,
}

impl Lookup {
    pub const ALL: [Lookup; 4] = [
        Lookup::ExactHit,
        Lookup::PrefixHit,
        Lookup::WildcardHit,
        Lookup::Miss,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Lookup::ExactHit => "exact_hit",
            Lookup::PrefixHit => "prefix_hit",
            Lookup::WildcardHit => "wildcard_host",
            Lookup::Miss => "miss",
        }
    }
}

/// `n` queries of one kind spread over the whole table (a fixed stride, so consecutive lookups
/// touch different hosts and the benchmark is not one hot cache line).
pub fn queries(scale: Scale, kind: Lookup, n: usize) -> Vec<Query> {
    let stride = 7919; // prime: walks all Ingresses before repeating
    (0..n)
        .map(|k| {
            let mut i = (k * stride) % scale.ingresses;
            let wildcard_wanted = kind == Lookup::WildcardHit;
            // Step to the next Ingress whose host has the kind we want.
            let mut guard = 0;
            while is_wildcard(host_index(i)) != wildcard_wanted && guard < 10 {
                i = (i + INGRESSES_PER_HOST) % scale.ingresses;
                guard += 1;
            }
            let h = host_index(i);
            let host = if is_wildcard(h) {
                format!("tenant{k}.w{h}.bench.test")
            } else {
                format!("h{h}.bench.test")
            };
            let path = match kind {
                Lookup::ExactHit => format!("/e{i}"),
                Lookup::PrefixHit => format!("/p{i}/app/v1/users/{k}"),
                Lookup::WildcardHit => format!("/p{i}/api/orders"),
                Lookup::Miss => format!("/nothing/{k}"),
            };
            Query { host, path }
        })
        .collect()
}
