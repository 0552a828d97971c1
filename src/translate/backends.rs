//! Ingress backends → Services → EndpointSlice endpoints (brief §4.3; Kubernetes
//! `IngressServiceBackend`, `ServicePort`, discovery.k8s.io/v1 `EndpointSlice`).
//!
//! Two separate steps, so that endpoint churn never re-derives routes (brief §2):
//! [`resolve_service`] runs during route derivation (Service, port, protocol) and yields a
//! [`ServiceBackend`] borrowed from the inputs, which becomes a [`BackendSpec`] once per backend;
//! [`resolve_endpoints`] turns specs into the [`BackendTable`] from slices alone.
//!
//! Owns: backend/Service/endpoint rules. Must not import tokio, hyper or the filesystem.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::IngressBackend;

use crate::model::{Backend, BackendKey, BackendTable, Endpoint, ServicePortRef, UpstreamProtocol};

use super::annotations::BackendProtocol;
use super::index::Index;
use super::slice::{AddressType, Slice};
use super::{BackendSpec, Diagnostic, Diags, ObjRef};

/// Label linking an EndpointSlice to its Service (Kubernetes well-known label).
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `ServicePort.appProtocol` value for HTTP/2 over cleartext (KEP-3726 standard values).
pub(super) const APP_PROTOCOL_H2C: &str = "kubernetes.io/h2c";

/// Why a backend cannot be served; the route stays, answering 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum BackendError {
    #[error("backend refers to a {0} resource; only Service backends are supported")]
    Resource(String),
    #[error("backend names no service")]
    NoService,
    #[error("backend service {0:?} must set exactly one of port.number and port.name")]
    BadPort(String),
    #[error("backend-protocol {0} is not supported (use HTTP, H2C or GRPC)")]
    UnsupportedProtocol(String),
    #[error(
        "annotation {0} restricts access and is not supported by portico; rather than serve \
         the route without it, it answers 503"
    )]
    UnsupportedAccessControl(String),
    #[error("Service {0} not found")]
    ServiceNotFound(String),
    #[error("Service {0} is of type ExternalName; portico only proxies to pod endpoints")]
    ExternalName(String),
    #[error("Service {service} has no TCP port {port}")]
    ServicePortNotFound { service: String, port: String },
}

impl BackendError {
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::Resource(_) => "ResourceBackendNotSupported",
            BackendError::NoService | BackendError::BadPort(_) => "InvalidBackend",
            BackendError::UnsupportedProtocol(_) => "UnsupportedBackendProtocol",
            BackendError::UnsupportedAccessControl(_) => "UnsupportedAnnotation",
            BackendError::ServiceNotFound(_) => "ServiceNotFound",
            BackendError::ExternalName(_) => "ExternalNameNotSupported",
            BackendError::ServicePortNotFound { .. } => "ServicePortNotFound",
        }
    }
}

/// A Service port an Ingress backend resolved to, borrowed from the inputs: route derivation
/// meets each backend once per path (5 paths per Ingress at issue 6's scale), so the owned
/// [`BackendKey`] (two `Arc<str>`s) is built only for the first path that names it
/// ([`ServiceBackend::spec`]); the others find it by this borrowed key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ServiceBackend<'a> {
    pub key: BorrowedKey<'a>,
    /// `ServicePort.name` (empty is `None`).
    pub port_name: Option<&'a str>,
    pub protocol: UpstreamProtocol,
}

/// [`BackendKey`] with borrowed strings, for lookups before the owned key exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct BorrowedKey<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub port: BorrowedPort<'a>,
}

/// [`ServicePortRef`] with a borrowed name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum BorrowedPort<'a> {
    Number(i32),
    Name(&'a str),
}

impl BorrowedKey<'_> {
    /// The owned key (allocates the two names, and the port name if any).
    pub fn to_owned_key(self) -> BackendKey {
        BackendKey {
            namespace: Arc::from(self.namespace),
            service: Arc::from(self.service),
            port: match self.port {
                BorrowedPort::Number(n) => ServicePortRef::Number(n),
                BorrowedPort::Name(n) => ServicePortRef::Name(Arc::from(n)),
            },
        }
    }
}

impl ServiceBackend<'_> {
    /// The spec to resolve endpoints for (no health check yet: the caller merges those).
    pub fn spec(&self) -> BackendSpec {
        BackendSpec {
            key: self.key.to_owned_key(),
            port_name: self.port_name.map(str::to_string),
            health_check: None,
        }
    }
}

/// Resolve an Ingress backend against the Services of the Ingress's namespace. Returns the
/// Service port to resolve endpoints for and the protocol to speak: the `backend-protocol`
/// annotation when set, else `kubernetes.io/h2c` on the Service port, else HTTP/1.1.
pub(super) fn resolve_service<'a>(
    namespace: &'a str,
    backend: &'a IngressBackend,
    index: &Index<'a>,
    protocol: &BackendProtocol,
) -> Result<ServiceBackend<'a>, BackendError> {
    if let Some(res) = &backend.resource {
        let kind = match &res.api_group {
            Some(g) if !g.is_empty() => format!("{g}/{}", res.kind),
            _ => res.kind.clone(),
        };
        return Err(BackendError::Resource(kind));
    }
    let Some(svc) = backend.service.as_ref().filter(|s| !s.name.is_empty()) else {
        return Err(BackendError::NoService);
    };
    let port_ref = match svc.port.as_ref().map(|p| (p.number, p.name.as_deref())) {
        Some((Some(n), None | Some(""))) => BorrowedPort::Number(n),
        Some((None, Some(name))) if !name.is_empty() => BorrowedPort::Name(name),
        _ => return Err(BackendError::BadPort(svc.name.clone())),
    };
    if let BackendProtocol::Unsupported(p) = protocol {
        return Err(BackendError::UnsupportedProtocol(p.clone()));
    }
    // Formatted only for an error (the common path never needs it).
    let full_name = || format!("{namespace}/{}", svc.name);
    let Some(service) = index.services.get(&(namespace, svc.name.as_str())) else {
        return Err(BackendError::ServiceNotFound(full_name()));
    };
    if service.is_external_name() {
        return Err(BackendError::ExternalName(full_name()));
    }
    let found = service.ports().iter().find(|p| match port_ref {
        BorrowedPort::Number(n) => p.port == n,
        BorrowedPort::Name(n) => p.name.as_deref() == Some(n),
    });
    let Some(port) = found else {
        let port = match port_ref {
            BorrowedPort::Number(n) => n.to_string(),
            BorrowedPort::Name(n) => format!("{n:?}"),
        };
        return Err(BackendError::ServicePortNotFound {
            service: full_name(),
            port,
        });
    };
    let upstream = match protocol {
        BackendProtocol::Set(p) => *p,
        _ if port.h2c => UpstreamProtocol::H2c,
        _ => UpstreamProtocol::Http1,
    };
    Ok(ServiceBackend {
        key: BorrowedKey {
            namespace,
            service: svc.name.as_str(),
            port: port_ref,
        },
        // Never empty (`SvcPort::name`).
        port_name: port.name.as_deref(),
        protocol: upstream,
    })
}

/// Endpoints of each backend, in `backends` order (so `BackendId(i)` is `backends[i]`).
///
/// Per the EndpointSlice API: an endpoint is usable when `conditions.ready` is not `false` (nil
/// means ready); when none is, endpoints that are `serving` and `terminating` are used so a
/// draining backend still answers (both decided when the [`Slice`] is built). Only `IPv4`/`IPv6`
/// slices are read (`FQDN` is ignored). Addresses are deduplicated across slices and sorted.
/// Zero endpoints is not a diagnostic: it is normal during rollouts, and the proxy answers 503.
pub fn resolve_endpoints(
    backends: &[BackendSpec],
    slices: &[Arc<Slice>],
) -> (BackendTable, Vec<Diagnostic>) {
    let mut diags = Diags::default();
    let mut by_service: BTreeMap<(&str, &str), Vec<&Slice>> = BTreeMap::new();
    for slice in slices {
        let Some(svc) = service_of(slice) else {
            continue;
        };
        by_service.entry(svc).or_default().push(slice);
    }
    let mut table = BackendTable {
        backends: Vec::with_capacity(backends.len()),
    };
    for spec in backends {
        let key = (&*spec.key.namespace, &*spec.key.service);
        let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
        table
            .backends
            .push(resolve_backend(spec, slices.iter().copied(), &mut diags));
    }
    (table, diags.finish())
}

/// The Service (namespace, name) an EndpointSlice belongs to: its namespace and the
/// `kubernetes.io/service-name` label; `None` for a slice without the label (not ours to read).
pub(super) fn service_of(slice: &Slice) -> Option<(&str, &str)> {
    Some((slice.namespace(), slice.service()?))
}

/// One backend from the slices of its Service (the caller has selected them with
/// [`service_of`]; their order does not matter: addresses are sorted and deduplicated).
pub(super) fn resolve_backend<'s>(
    spec: &BackendSpec,
    slices: impl Iterator<Item = &'s Slice>,
    diags: &mut Diags,
) -> Backend {
    let mut ready = BTreeSet::new();
    let mut draining = BTreeSet::new();
    for slice in slices {
        collect_slice(slice, spec, &mut ready, &mut draining, diags);
    }
    let (endpoints, draining_fallback) = if ready.is_empty() && !draining.is_empty() {
        (draining, true)
    } else {
        (ready, false)
    };
    Backend {
        key: spec.key.clone(),
        endpoints: endpoints
            .into_iter()
            .map(|addr| Endpoint { addr })
            .collect(),
        draining_fallback,
        health_check: spec.health_check.clone(),
    }
}

fn collect_slice(
    slice: &Slice,
    spec: &BackendSpec,
    ready: &mut BTreeSet<SocketAddr>,
    draining: &mut BTreeSet<SocketAddr>,
    diags: &mut Diags,
) {
    if slice.address_type() == AddressType::Other {
        return;
    }
    let want = spec.port_name.as_deref().unwrap_or_default();
    // The first port of the wanted name decides, even when it is unusable.
    let port = slice
        .ports()
        .iter()
        .find(|p| *p.name == *want)
        .and_then(|p| p.port);
    let Some(port) = port else {
        return;
    };
    for raw in slice.invalid_addresses() {
        diags.warn(
            "EndpointSlice",
            &ObjRef {
                namespace: slice.namespace(),
                name: slice.name(),
                uid: slice.uid_if_invalid(),
            },
            "InvalidEndpointAddress",
            format!(
                "address {raw:?} is not a valid {} address; skipped",
                slice.address_type().as_str()
            ),
        );
    }
    for ep in slice.endpoints() {
        let addr = SocketAddr::new(ep.addr, port);
        if ep.ready {
            ready.insert(addr);
        } else {
            draining.insert(addr);
        }
    }
}
