//! Kubernetes objects → routing [`Snapshot`] + [`Diagnostic`]s. Pure and deterministic: no I/O,
//! no clock, no environment. A bad object becomes a Diagnostic and is skipped; it never fails the
//! whole build and never takes other routes down.
//!
//! Owns: Ingress v1 semantics (brief §4.3), annotation parsing (§4.4/§4.6), TLS Secret parsing.
//! May import: model, crd, k8s-openapi, rustls (key parsing). Must not import tokio, hyper, kube
//! clients or the filesystem.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use crate::crd::RateLimitPolicy;
use crate::model::{self, Snapshot};

/// Everything translate reads. Sources (file provider, controller) fill it; order does not
/// matter (translate sorts where precedence depends on it).
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub ingresses: Vec<Arc<Ingress>>,
    pub ingress_classes: Vec<Arc<IngressClass>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
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
    /// Allow `type: ExternalName` Services as backends (refused by default).
    pub allow_external_name: bool,
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
            allow_external_name: false,
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

/// Build a snapshot from inputs. Never fails: bad objects become diagnostics.
pub fn translate(inputs: &Inputs, opts: &Options) -> (Snapshot, Vec<Diagnostic>) {
    let _ = (inputs, opts);
    (Snapshot::default(), Vec::new())
}
