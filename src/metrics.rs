//! Prometheus metrics: one [`Metrics`] registry created at start and shared by every part.
//!
//! Owns: metric names, labels and buckets (documented in the README). Names follow
//! ingress-nginx where one exists, with the `portico_` prefix.

use std::collections::HashMap;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds, from 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Every metric portico exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `portico_requests_total{namespace,ingress,service,status,method}`.
    pub requests: IntCounterVec,
    /// `portico_request_duration_seconds{namespace,ingress,service}`: first byte in to last out.
    pub request_duration: HistogramVec,
    /// `portico_upstream_response_duration_seconds{namespace,ingress,service}`: until upstream
    /// response headers.
    pub upstream_duration: HistogramVec,
    /// `portico_upstream_connect_errors_total{namespace,service}`.
    pub upstream_connect_errors: IntCounterVec,
    /// `portico_upstream_retries_total{namespace,service}`.
    pub upstream_retries: IntCounterVec,
    /// `portico_open_connections{listener}` (listener = http | https).
    pub open_connections: IntGaugeVec,
    /// `portico_snapshot_builds_total{result}` (result = swapped | unchanged).
    pub snapshot_builds: IntCounterVec,
    /// `portico_snapshot_build_duration_seconds`.
    pub snapshot_build_duration: HistogramVec,
    /// `portico_config_diagnostics{kind,reason}`: current diagnostics.
    pub config_diagnostics: IntGaugeVec,
    /// `portico_backend_ready_endpoints{namespace,service,port}`.
    pub backend_ready_endpoints: IntGaugeVec,
    /// `portico_tls_certificate_expiry_timestamp_seconds{namespace,secret}`: `notAfter` of
    /// each served certificate.
    pub certificate_expiry: IntGaugeVec,
    /// `portico_manifest_files_invalid`: files of the manifests dir that do not parse.
    pub manifest_files_invalid: IntGauge,
    /// `portico_rejected_requests_total{reason}`: requests refused before routing (framing,
    /// path, host...).
    pub rejected_requests: IntCounterVec,
    /// `portico_ratelimit_rejected_total{namespace,ingress,policy}`: 429s by RateLimitPolicy
    /// (`policy` is the policy's name, in the Ingress's namespace).
    pub ratelimit_rejected: IntCounterVec,
    /// `portico_concurrency_rejected_total{scope,namespace,ingress,policy}`: 503s over a
    /// concurrency cap; scope = global (`--max-concurrent-requests`) | ingress (annotation) |
    /// policy (`maxInFlight`); labels that do not apply are empty.
    pub concurrency_rejected: IntCounterVec,
    /// `portico_ratelimit_tracked_keys`: token buckets held now (bounded by
    /// `--rate-limit-max-keys`).
    pub ratelimit_tracked_keys: IntGauge,
    /// `portico_ratelimit_evicted_keys_total`: buckets dropped to stay under the key cap while
    /// still holding state (their clients start over with a full bucket).
    pub ratelimit_evicted_keys: IntCounter,
    /// `portico_upstream_in_flight{namespace,service}`: requests on their way to or from a
    /// backend's endpoints now.
    pub upstream_in_flight: IntGaugeVec,
    /// `portico_upstream_ejections_total{namespace,service,endpoint}`: passive-health ejections.
    pub upstream_ejections: IntCounterVec,
    /// `portico_health_checks_total{namespace,service,endpoint,result}` (result = success |
    /// failure): active health-check probes.
    pub health_checks: IntCounterVec,
    /// `portico_upstream_endpoint_healthy{namespace,service,endpoint}`: 1 when the active
    /// health check counts the endpoint up, 0 when down (only for checked backends).
    pub endpoint_healthy: IntGaugeVec,
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            // Registration fails only on a duplicate name, which is a programming error caught
            // by the unit test below.
            let _ = r.register(Box::new(c.clone()));
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).map(|c| reg(&registry, c))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).map(|c| reg(&registry, c))
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .map(|c| reg(&registry, c))
        };
        let build = || -> prometheus::Result<Metrics> {
            Ok(Metrics {
                requests: counter(
                    "portico_requests_total",
                    "Requests served, by route and status",
                    &["namespace", "ingress", "service", "status", "method"],
                )?,
                request_duration: histogram(
                    "portico_request_duration_seconds",
                    "Time from request received to response finished",
                    &["namespace", "ingress", "service"],
                )?,
                upstream_duration: histogram(
                    "portico_upstream_response_duration_seconds",
                    "Time until the upstream's response headers",
                    &["namespace", "ingress", "service"],
                )?,
                upstream_connect_errors: counter(
                    "portico_upstream_connect_errors_total",
                    "Failed connection attempts to upstream endpoints",
                    &["namespace", "service"],
                )?,
                upstream_retries: counter(
                    "portico_upstream_retries_total",
                    "Requests retried on another endpoint",
                    &["namespace", "service"],
                )?,
                open_connections: gauge(
                    "portico_open_connections",
                    "Client connections open now",
                    &["listener"],
                )?,
                snapshot_builds: counter(
                    "portico_snapshot_builds_total",
                    "Routing snapshot builds, by result",
                    &["result"],
                )?,
                snapshot_build_duration: histogram(
                    "portico_snapshot_build_duration_seconds",
                    "Time to translate inputs into a snapshot",
                    &[],
                )?,
                config_diagnostics: gauge(
                    "portico_config_diagnostics",
                    "Current configuration diagnostics, by kind and reason",
                    &["kind", "reason"],
                )?,
                backend_ready_endpoints: gauge(
                    "portico_backend_ready_endpoints",
                    "Usable endpoints per backend",
                    &["namespace", "service", "port"],
                )?,
                certificate_expiry: gauge(
                    "portico_tls_certificate_expiry_timestamp_seconds",
                    "notAfter of each served certificate (Unix time), by the Secret it came from",
                    &["namespace", "secret"],
                )?,
                manifest_files_invalid: {
                    let g = IntGauge::new(
                        "portico_manifest_files_invalid",
                        "Manifest files that failed to parse (their last good objects serve)",
                    )?;
                    reg(&registry, g)
                },
                rejected_requests: counter(
                    "portico_rejected_requests_total",
                    "Requests refused before routing, by reason",
                    &["reason"],
                )?,
                ratelimit_rejected: counter(
                    "portico_ratelimit_rejected_total",
                    "Requests refused with 429 by a RateLimitPolicy",
                    &["namespace", "ingress", "policy"],
                )?,
                concurrency_rejected: counter(
                    "portico_concurrency_rejected_total",
                    "Requests refused with 503 over a concurrency cap, by scope",
                    &["scope", "namespace", "ingress", "policy"],
                )?,
                ratelimit_tracked_keys: {
                    let g = IntGauge::new(
                        "portico_ratelimit_tracked_keys",
                        "Rate-limit token buckets held now",
                    )?;
                    reg(&registry, g)
                },
                ratelimit_evicted_keys: {
                    let c = IntCounter::new(
                        "portico_ratelimit_evicted_keys_total",
                        "Rate-limit buckets with state dropped to stay under the key cap",
                    )?;
                    reg(&registry, c)
                },
                upstream_in_flight: gauge(
                    "portico_upstream_in_flight",
                    "Requests in flight to a backend now",
                    &["namespace", "service"],
                )?,
                upstream_ejections: counter(
                    "portico_upstream_ejections_total",
                    "Endpoints ejected by passive health checking",
                    &["namespace", "service", "endpoint"],
                )?,
                health_checks: counter(
                    "portico_health_checks_total",
                    "Active health-check probes, by result",
                    &["namespace", "service", "endpoint", "result"],
                )?,
                endpoint_healthy: gauge(
                    "portico_upstream_endpoint_healthy",
                    "Active health state of an endpoint (1 up, 0 down)",
                    &["namespace", "service", "endpoint"],
                )?,
                registry: registry.clone(),
            })
        };
        match build() {
            Ok(m) => m,
            // Only reachable through an invalid metric name in this file: fail loudly in tests.
            Err(e) => panic!("metric definitions are invalid: {e}"),
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Remove every series of `vec` for which `gone` (given its labels by name, and the series
/// itself) says so. The series are read from the vector, so this needs no record of the label
/// values ever made.
pub fn remove_series<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    mut gone: impl FnMut(&HashMap<&str, &str>, &prometheus::proto::Metric) -> bool,
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|p| (p.name(), p.value()))
                .collect();
            if gone(&labels, metric) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// The value of label `name` in `labels` ("" when absent).
pub fn label<'a>(labels: &HashMap<&str, &'a str>, name: &str) -> &'a str {
    labels.get(name).copied().unwrap_or_default()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_metrics_register_and_render() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["ns", "ing", "svc", "200", "GET"])
            .inc();
        m.manifest_files_invalid.set(0);
        let text = m.render();
        assert!(text.contains("portico_requests_total"));
        assert!(text.contains("portico_manifest_files_invalid"));
        // 13 families declared; those without samples yet are not rendered, so count registry.
        assert!(m.registry.gather().len() >= 2);
    }
}
