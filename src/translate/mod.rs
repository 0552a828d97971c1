//! Kubernetes objects → routing [`Snapshot`] + [`Diagnostic`]s. Pure and deterministic: no I/O,
//! no clock, no environment. A bad object becomes a Diagnostic and is skipped; it never fails the
//! whole build and never takes other routes down.
//!
//! Owns: Ingress v1 semantics (brief §4.3), annotation parsing (§4.4/§4.6), TLS Secret parsing.
//! May import: model, crd, k8s-openapi, rustls + rustls-pki-types (key parsing), serde_json
//! (content fingerprints to order duplicate objects). Must not import tokio, hyper, kube clients,
//! file_source or the filesystem.
//!
//! Layout, one processor per concern (Contour `internal/dag` style): `index` orders and
//! deduplicates inputs, `class` decides ownership, `hosts`/`paths` validate rules, `tls` builds
//! the SNI table, `annotations` reads policy, `routes` assembles hosts and resolves conflicts,
//! `backends` resolves Services (during route derivation) and endpoints (separately, so endpoint
//! churn never re-derives routes).

mod annotations;
mod backends;
mod class;
mod hosts;
mod incremental;
mod index;
mod paths;
mod policies;
mod routes;
mod service;
mod slice;
mod tls;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use crate::crd::RateLimitPolicy;
use crate::model::{self, BackendKey, BackendTable, HostTable, Snapshot, TlsTable};

pub use annotations::parse_size;
pub use backends::resolve_endpoints;
pub use class::{claimed_by_another, serves_ingress};
pub use hosts::is_dns1123_subdomain;
pub use incremental::Translator;
pub use service::{LoadBalancerIngress, Svc, SvcPort};
pub use slice::{AddressType, Slice, SliceEndpoint, SlicePort};
pub use tls::{SECRET_TYPE_TLS, certificate_diagnostics, next_validity_change};

/// Everything translate reads. Sources (file provider, controller) fill it; order does not
/// matter (translate sorts where precedence depends on it). Services and EndpointSlices come in
/// translate's own compact forms ([`Svc`], `From<&Service>`; [`Slice`], `From<&EndpointSlice>`),
/// which is all a source needs to keep of them; the other kinds are the k8s-openapi (or CRD)
/// objects.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub ingresses: Vec<Arc<Ingress>>,
    pub ingress_classes: Vec<Arc<IngressClass>>,
    pub services: Vec<Arc<Svc>>,
    pub endpoint_slices: Vec<Arc<Slice>>,
    pub secrets: Vec<Arc<Secret>>,
    pub rate_limit_policies: Vec<Arc<RateLimitPolicy>>,
}

/// Default IngressClass name we serve (`--ingress-class`).
pub const DEFAULT_INGRESS_CLASS: &str = "portico";
/// Default `spec.controller` value of our IngressClass (`--controller-name`).
pub const DEFAULT_CONTROLLER_NAME: &str = "portico.dev/ingress-controller";

/// Translation options, from flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// IngressClass name we serve.
    pub ingress_class: String,
    /// `spec.controller` value that marks an IngressClass as ours.
    pub controller_name: String,
    /// `--default-certificate ns/name`.
    pub default_certificate: Option<(String, String)>,
    /// Defaults for per-route parameters, overridable by annotation.
    pub defaults: RouteDefaults,
}

/// Per-route defaults (flags), each overridable per Ingress by annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDefaults {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub body_limit: u64,
    /// Redirect plain HTTP to HTTPS on hosts with TLS (annotation `ssl-redirect` opts out).
    pub ssl_redirect: bool,
    /// HSTS header value when enabled (`portico.dev/hsts: "true"` opts a route in).
    pub hsts_max_age: Duration,
}

impl Default for RouteDefaults {
    fn default() -> Self {
        RouteDefaults {
            connect_timeout: model::DEFAULT_CONNECT_TIMEOUT,
            read_timeout: model::DEFAULT_READ_TIMEOUT,
            body_limit: model::DEFAULT_BODY_LIMIT,
            ssl_redirect: true,
            hsts_max_age: Duration::from_secs(31_536_000),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ingress_class: DEFAULT_INGRESS_CLASS.to_string(),
            controller_name: DEFAULT_CONTROLLER_NAME.to_string(),
            default_certificate: None,
            defaults: RouteDefaults::default(),
        }
    }
}

/// How bad a diagnostic is. `Error`: the object (or part of it) is not served as written;
/// `portico check` exits non-zero. `Warning`: served, but something was ignored or defaulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// A problem with one object, for logs, the diagnostics gauge, Events and `portico check`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Object kind, e.g. `Ingress`, `Secret`, `RateLimitPolicy`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `metadata.uid` of the object when known (objects from the API server); empty otherwise
    /// (manifest files without one, or an object that is referenced but missing). Events name
    /// it, so `kubectl describe` finds them.
    pub uid: String,
    /// Stable CamelCase reason, e.g. `ServiceNotFound`, `InvalidCertificate`, `PathConflict`.
    pub reason: String,
    /// Human-readable explanation.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{sev}: {} {}/{}: {}: {}",
            self.kind, self.namespace, self.name, self.reason, self.message
        )
    }
}

impl Diagnostic {
    fn new(
        severity: Severity,
        kind: &str,
        obj: &ObjRef,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity,
            kind: kind.to_string(),
            namespace: obj.namespace.to_string(),
            name: obj.name.to_string(),
            uid: obj.uid.to_string(),
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// Namespace/name (and uid, when known) of the object a diagnostic is about.
#[derive(Debug, Clone, Copy)]
struct ObjRef<'a> {
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
}

/// Collects diagnostics while translating; sorted and deduplicated at the end so the output
/// does not depend on input order.
#[derive(Debug, Default)]
struct Diags(Vec<Diagnostic>);

impl Diags {
    fn error(&mut self, kind: &str, obj: &ObjRef, reason: &str, message: impl Into<String>) {
        self.0
            .push(Diagnostic::new(Severity::Error, kind, obj, reason, message));
    }

    fn warn(&mut self, kind: &str, obj: &ObjRef, reason: &str, message: impl Into<String>) {
        self.0.push(Diagnostic::new(
            Severity::Warning,
            kind,
            obj,
            reason,
            message,
        ));
    }

    fn finish(mut self) -> Vec<Diagnostic> {
        self.0.sort();
        self.0.dedup();
        self.0
    }
}

/// What a route's backend resolves to once endpoints are known: the stable key plus the name of
/// the Service port, which selects the EndpointSlice port (brief §4.3).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendSpec {
    pub key: BackendKey,
    /// `ServicePort.name`; `None` (or empty) matches an unnamed EndpointSlice port.
    pub port_name: Option<String>,
    /// Active health check requested by the Ingress annotations routing here.
    pub health_check: Option<Arc<model::HealthCheck>>,
}

/// The endpoint-independent part of a snapshot: hosts and routes (targets already refer to
/// [`model::BackendId`]s), TLS, and the backends still to resolve. Keeping this separate lets an
/// endpoint-only change re-run [`resolve_endpoints`] alone (brief §2).
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    pub hosts: Arc<HostTable>,
    pub tls: Arc<TlsTable>,
    /// Indexed by `BackendId.0`, sorted by key.
    pub backends: Arc<[BackendSpec]>,
}

impl Routes {
    /// Combine with a resolved backend table into a snapshot.
    pub fn snapshot(&self, backends: BackendTable) -> Snapshot {
        Snapshot {
            hosts: Arc::clone(&self.hosts),
            backends: Arc::new(backends),
            tls: Arc::clone(&self.tls),
        }
    }
}

/// Derive hosts, routes and TLS from Ingresses, IngressClasses, Services, Secrets and
/// RateLimitPolicies (validated here; valid ones attach to their Ingress's routes).
/// EndpointSlices are not read here.
pub fn derive_routes(inputs: &Inputs, opts: &Options) -> (Routes, Vec<Diagnostic>) {
    let mut diags = Diags::default();
    let routes = routes::derive(inputs, opts, &mut diags);
    (routes, diags.finish())
}

/// Why a Secret cannot serve as a TLS certificate (`(reason, message)`, as the diagnostic of a
/// TLS entry naming it would say), or `None` when it can. For the rebuild step, which keeps the
/// last valid version of a Secret that turns invalid.
pub fn tls_secret_problem(secret: &Secret) -> Option<(&'static str, String)> {
    tls::load_secret(secret)
        .err()
        .map(|e| (e.reason(), e.to_string()))
}

/// Build a snapshot from inputs. Never fails: bad objects become diagnostics.
pub fn translate(inputs: &Inputs, opts: &Options) -> (Snapshot, Vec<Diagnostic>) {
    let mut diags = Diags::default();
    let routes = routes::derive(inputs, opts, &mut diags);
    let (backends, endpoint_diags) = resolve_endpoints(&routes.backends, &inputs.endpoint_slices);
    diags.0.extend(endpoint_diags);
    (routes.snapshot(backends), diags.finish())
}
