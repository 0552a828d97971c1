//! The routing snapshot: immutable, precomputed data the proxy reads on every request, plus the
//! pure lookups over it (host table, path precedence, SNI table).
//!
//! Owns: [`Snapshot`] and everything hanging off it. Must not import tokio, hyper, kube,
//! k8s-openapi or the filesystem: it is plain data built by `translate` and read by `proxy`.

mod describe;
pub mod duration;
mod lookup;
pub mod path;
mod tls;
mod traffic;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use describe::describe;
pub use lookup::{HostMatch, RouteMatch, normalize_host};
pub use tls::{CertKey, TlsTable, Validity};
pub use traffic::*;

/// Default upstream connect timeout (brief §4.4; annotation `proxy-connect-timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time to wait for upstream response headers (annotation `proxy-read-timeout`).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default request body limit, 1 MiB (annotation `proxy-body-size`).
pub const DEFAULT_BODY_LIMIT: u64 = 1024 * 1024;
/// Default idle timeout of upgraded connections (WebSockets) and long streams.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// One immutable routing snapshot. Everything the request path needs hangs off this one value,
/// published behind one `ArcSwap` (see `publish`).
///
/// `PartialEq` is what lets the publisher skip swapping an unchanged snapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// Host table with per-host routes in precedence order. Shared (`Arc`) so an
    /// endpoint-only rebuild can reuse it untouched.
    pub hosts: Arc<HostTable>,
    /// Backends referenced by routes through [`BackendId`]; endpoints live here so endpoint
    /// churn replaces only this table.
    pub backends: Arc<BackendTable>,
    /// SNI certificate table (exact, wildcard, default from `--default-certificate`).
    pub tls: Arc<TlsTable>,
}

/// Host name → routes. Keyed with foldhash, several times faster than the std SipHash on
/// short host names; the Host header is attacker-controlled, so the hasher stays keyed with a
/// per-process random seed (HashDoS resistance), never a fixed one.
pub type HostMap = HashMap<String, HostRoutes, foldhash::fast::RandomState>;

/// Host → routes. Hosts are stored lower-case, without port.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostTable {
    /// Exact host names.
    pub exact: HostMap,
    /// One-label wildcards, keyed by the suffix after `*.` (`*.foo.com` → `foo.com`).
    pub wildcard: HostMap,
    /// Rules without a host: they catch every host not matched above.
    pub catch_all: Option<HostRoutes>,
    /// The default backend (oldest `spec.defaultBackend` of our class): used when a host
    /// matched but no path did, and for unknown hosts. `None` → 404.
    pub default_route: Option<Arc<Route>>,
}

/// The routes of one host, already in precedence order: longest path first, `Exact` before
/// `Prefix` at equal length, conflicts already resolved.
///
/// Built once with [`HostRoutes::new`], then read-only: next to the routes it keeps a compact
/// match table (see `lookup`) derived from them, so the fields are private and the routes are
/// read through [`HostRoutes::routes`].
#[derive(Debug, Clone, Default)]
pub struct HostRoutes {
    routes: Vec<Arc<Route>>,
    table: lookup::PathTable,
}

impl HostRoutes {
    /// The routes of one host, which must already be in precedence order (matching takes the
    /// first that matches).
    pub fn new(routes: Vec<Arc<Route>>) -> Self {
        let table = lookup::PathTable::new(&routes);
        HostRoutes { routes, table }
    }

    /// The routes, in precedence order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

// The match table is a function of the routes, so comparing the routes is enough (and it keeps
// the publisher's unchanged-snapshot check as cheap as before).
impl PartialEq for HostRoutes {
    fn eq(&self, other: &Self) -> bool {
        self.routes == other.routes
    }
}

/// How a route's path matches (Ingress v1 `pathType`; `ImplementationSpecific` is `Prefix`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathKind {
    Exact,
    Prefix,
}

/// One path rule of one Ingress on one host.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// `Exact` whole-string, or element-wise `Prefix`.
    pub kind: PathKind,
    /// The rule path, normalised; for `Prefix` without trailing slash (`/` stays `/`).
    pub path: String,
    /// Which Ingress declared it (metrics, logs, access log `route`).
    pub ingress: IngressRef,
    /// What serves it.
    pub target: RouteTarget,
    /// Per-route parameters resolved from flags and annotations.
    pub policy: Arc<RoutePolicy>,
}

/// Where a matched route sends the request.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteTarget {
    /// A backend in [`BackendTable`].
    Backend(BackendId),
    /// The route exists but cannot be served (missing Service, unsupported backend kind...):
    /// the proxy answers 503. The reason is for logs only, never sent to clients.
    Unavailable { reason: String },
}

/// Namespace/name of an Ingress.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IngressRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

/// Parameters of one route, resolved from flags (defaults) and annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Maximum request body in bytes; 0 means unlimited (ingress-nginx `proxy-body-size: 0`).
    pub body_limit: u64,
    /// Whether plain-HTTP requests get a 308 to HTTPS; see [`RoutePolicy::redirects`].
    pub ssl_redirect: SslRedirect,
    /// `Strict-Transport-Security` value to add on HTTPS responses, when opted in.
    pub hsts: Option<String>,
    /// Protocol to speak to the upstream.
    pub upstream_protocol: UpstreamProtocol,
    /// Per-Ingress cap on concurrent requests (`portico.dev/max-concurrent-requests`),
    /// `None` = no cap.
    pub max_concurrent_requests: Option<u32>,
    /// Endpoint choice (`portico.dev/load-balance`, `portico.dev/hash-key`).
    pub load_balance: LoadBalance,
    /// Valid RateLimitPolicies targeting this route's Ingress, in policy name order; all apply.
    pub rate_limits: Arc<[RateLimit]>,
}

/// When a route answers plain HTTP with a 308 to HTTPS (brief §4.3: a host with TLS redirects,
/// unless the route's Ingress opts out). "Has TLS" means a valid certificate of the host's own
/// (exact, or a one-label wildcard) in the snapshot: a rejected TLS entry means no redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslRedirect {
    /// Opted out, or the route's own host is known to have no valid certificate.
    #[default]
    No,
    /// The route's own host has a valid certificate.
    Yes,
    /// The route serves hosts it does not name (a catch-all rule, the default backend, a
    /// wildcard rule without a wildcard certificate): a request redirects when its own host has
    /// a valid certificate, so a TLS host is never served in the clear by falling through,
    /// unless the Ingress that gave that certificate opts out.
    IfHostHasTls,
}

impl RoutePolicy {
    /// Whether a plain-HTTP request for `host` (normalised) on this route gets a 308 to HTTPS.
    /// Costs a TLS-table lookup only for routes that serve hosts they do not name.
    pub fn redirects(&self, tls: &TlsTable, host: &str) -> bool {
        match self.ssl_redirect {
            SslRedirect::No => false,
            SslRedirect::Yes => true,
            SslRedirect::IfHostHasTls => tls.redirects_host(host),
        }
    }
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            body_limit: DEFAULT_BODY_LIMIT,
            ssl_redirect: SslRedirect::No,
            hsts: None,
            upstream_protocol: UpstreamProtocol::Http1,
            max_concurrent_requests: None,
            load_balance: LoadBalance::RoundRobin,
            rate_limits: Arc::from(Vec::new()),
        }
    }
}

/// Protocol spoken to upstream endpoints (annotation `backend-protocol`, Service `appProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the client's HTTP/2 requests are translated).
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (gRPC backends).
    H2c,
}

/// Index into [`BackendTable::backends`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u32);

/// All backends of a snapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BackendTable {
    pub backends: Vec<Backend>,
}

impl BackendTable {
    pub fn get(&self, id: BackendId) -> Option<&Backend> {
        self.backends.get(id.0 as usize)
    }
}

/// Stable identity of a backend across snapshots: state that outlives a snapshot swap
/// (round-robin cursors, pools, health marks) is keyed by this, never by [`BackendId`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
    /// The Service port as written in the Ingress: number or name.
    pub port: ServicePortRef,
}

impl std::fmt::Display for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.port {
            ServicePortRef::Number(n) => write!(f, "{}/{}:{}", self.namespace, self.service, n),
            ServicePortRef::Name(n) => write!(f, "{}/{}:{}", self.namespace, self.service, n),
        }
    }
}

/// Service port reference from an Ingress backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServicePortRef {
    Number(i32),
    Name(Arc<str>),
}

/// A Service port resolved to the pod endpoints that serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub key: BackendKey,
    /// Usable endpoints in a stable order (sorted by address): ready ones, or, when none is
    /// ready, serving+terminating ones. Empty → 503.
    pub endpoints: Arc<[Endpoint]>,
    /// True when `endpoints` holds the serving+terminating fallback.
    pub draining_fallback: bool,
    /// Active health check of the endpoints, when an Ingress routing here asks for one.
    pub health_check: Option<Arc<HealthCheck>>,
}

/// One pod address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: SocketAddr,
}
