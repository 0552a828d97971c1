//! Traffic-policy parameters carried by the snapshot: rate limits and concurrency caps from
//! RateLimitPolicies, the load-balancing strategy and the active health check of a backend.
//!
//! Owns: these plain data types only. The state they drive (token buckets, in-flight counts,
//! health marks) lives in the proxy, outside the snapshot, keyed by the stable identities
//! defined here. Must not import tokio, hyper, kube or k8s-openapi.

use std::sync::Arc;
use std::time::Duration;

/// How a route's requests pick an endpoint of its backend (annotation `portico.dev/load-balance`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum LoadBalance {
    /// Each endpoint in turn (a cursor per backend, outside the snapshot).
    #[default]
    RoundRobin,
    /// Power of two choices on in-flight request counts per endpoint.
    LeastRequest,
    /// Uniformly random endpoint.
    Random,
    /// Rendezvous-style consistent hashing on a request key: a key stays on one endpoint and an
    /// added or removed endpoint moves only about 1/N of keys.
    ConsistentHash(HashKey),
}

/// What a consistent hash is computed over (annotation `portico.dev/hash-key`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// The client address (after `--trusted-proxies` X-Forwarded-For handling).
    ClientIp,
    /// A request header, by lower-case name; a missing header hashes as the empty value.
    Header(String),
    /// A cookie; when the request has none the proxy issues one (sticky sessions).
    Cookie {
        name: String,
        /// `Max-Age` of the issued cookie (`portico.dev/hash-cookie-ttl`); `None` = session
        /// cookie.
        ttl: Option<Duration>,
    },
}

/// Stable identity of a RateLimitPolicy: buckets and in-flight counts are keyed by it, so they
/// survive rebuilds. `uid` when the API server gave one, else empty (file provider).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub uid: Arc<str>,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a token bucket is keyed by (RateLimitPolicy `spec.key`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateLimitKey {
    /// The client address (brief §4.5: peer, or right-most untrusted X-Forwarded-For entry when
    /// the peer is a trusted proxy).
    ClientIp,
    /// A request header by lower-case name; requests without it share one bucket.
    Header(String),
    /// One bucket for the whole policy.
    Global,
}

/// Token bucket numbers: capacity `burst`, refilled continuously at `requests / period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenBucketSpec {
    pub requests: u32,
    pub period: Duration,
    pub burst: u32,
}

/// One valid RateLimitPolicy as the proxy applies it to the routes of its target Ingress.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub policy: PolicyRef,
    /// `None` when the policy only caps concurrency.
    pub bucket: Option<TokenBucketSpec>,
    pub key: RateLimitKey,
    /// Cap on concurrent requests per replica (`maxInFlight`); excess → 503.
    pub max_in_flight: Option<u32>,
}

/// Active HTTP health check of a backend's endpoints (annotations `portico.dev/health-check-*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HealthCheck {
    /// Request path, e.g. `/healthz`; a 2xx or 3xx answer is healthy.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that mark a down endpoint up again.
    pub healthy_threshold: u32,
    /// Consecutive failures that mark an endpoint down.
    pub unhealthy_threshold: u32,
}

/// Defaults of the active health check annotations (only `health-check-path` is required to
/// turn checks on).
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
