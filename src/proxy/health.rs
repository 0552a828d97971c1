//! Active HTTP health checks (brief §4.6 `portico.dev/health-check-*`): one probe task per
//! (endpoint address, check) of every backend in the published snapshot that carries a
//! [`HealthCheck`], and the shared [`ActiveHealth`] marks endpoint selection reads.
//!
//! Kubernetes readiness stays the primary signal: only endpoints in the snapshot (ready, or the
//! serving+terminating fallback) are probed, and a probe can only take an endpoint out of
//! rotation, never add one. An endpoint starts up (readiness already vouched for it); it goes
//! down after `unhealthy_threshold` consecutive failures (non-2xx/3xx, timeout, connect or
//! protocol error) and up again after `healthy_threshold` consecutive successes.
//!
//! Owns: probe tasks, their state (keyed by endpoint address + check, dropped with the
//! endpoint) and the `portico_health_checks_total` / `portico_upstream_endpoint_healthy`
//! series; its snapshot-following task also has upstream forget the state of endpoints and
//! backends that left ([`RetainedState::prune`]: passive health, cursors, budgets) and prune
//! their series ([`prune_upstream_series`]), and has the request path's per-route metric handles
//! drop the Ingresses that left (`RouteMetricsCache::prune`). May import model, publish,
//! metrics, hyper and tokio;
//! must not import kube, k8s-openapi, translate or the handler.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::model::{HealthCheck, Snapshot};
use crate::publish::Reader;

use super::listener::Shutdown;
use super::route_metrics::RouteMetricsCache;
use super::upstream::{RetainedState, prune_upstream_series};

/// How often the checker looks for a new snapshot (an `ArcSwap` load and a pointer compare);
/// well inside the brief's "changes take effect within 1 s".
pub const SNAPSHOT_POLL: Duration = Duration::from_millis(200);
/// Probes are spread by up to this share of the interval so endpoints (and replicas) do not
/// all probe in lock step.
const JITTER_DIVISOR: u32 = 10;
/// `User-Agent` of probes, so backend logs can tell them apart.
const USER_AGENT: &str = "portico-health-check";

/// Endpoints an active check counts down now, by address (a `Vec` because one address may be
/// probed under two different checks; it is almost always one entry).
#[derive(Debug, Default)]
pub struct ActiveHealth {
    /// foldhash: read on every request to a checked backend; keys are our endpoints.
    down: RwLock<HashMap<SocketAddr, Vec<Arc<HealthCheck>>, foldhash::fast::RandomState>>,
}

impl ActiveHealth {
    /// True when `check` counts `addr` down. Cheap when nothing is down (the common case).
    pub fn is_down(&self, addr: SocketAddr, check: &HealthCheck) -> bool {
        let down = self.down.read().unwrap_or_else(PoisonError::into_inner);
        !down.is_empty()
            && down
                .get(&addr)
                .is_some_and(|v| v.iter().any(|c| **c == *check))
    }

    pub(super) fn set(&self, addr: SocketAddr, check: &Arc<HealthCheck>, is_down: bool) {
        let mut down = self.down.write().unwrap_or_else(PoisonError::into_inner);
        let list = down.entry(addr).or_default();
        list.retain(|c| c != check);
        if is_down {
            list.push(check.clone());
        }
        if list.is_empty() {
            down.remove(&addr);
        }
    }
}

/// One probed (endpoint, check) pair.
type TargetKey = (SocketAddr, Arc<HealthCheck>);

struct Target {
    /// `namespace, service, endpoint` of the metric series.
    labels: [String; 3],
    task: JoinHandle<()>,
}

/// The active health-check task. [`Proxy::serve`](super::Proxy::serve) runs it beside the
/// listeners; it stops when the proxy's shutdown fires.
pub struct HealthChecker {
    state: Arc<ActiveHealth>,
    reader: Reader,
    metrics: Arc<Metrics>,
    /// The request path's per-route metric handles, pruned when Ingresses leave.
    route_metrics: Option<Arc<RouteMetricsCache>>,
    /// The upstream state kept across snapshots, pruned on every change.
    retained: Option<RetainedState>,
}

impl HealthChecker {
    pub fn new(state: Arc<ActiveHealth>, reader: Reader, metrics: Arc<Metrics>) -> HealthChecker {
        HealthChecker {
            state,
            reader,
            metrics,
            route_metrics: None,
            retained: None,
        }
    }

    /// Also prune the upstream state of endpoints and backends that left, on every change.
    pub(super) fn with_retained_state(mut self, retained: RetainedState) -> Self {
        self.retained = Some(retained);
        self
    }

    /// Also prune `cache` (and the series of Ingresses that left) on every route change.
    pub(super) fn with_route_metrics(mut self, cache: Arc<RouteMetricsCache>) -> Self {
        self.route_metrics = Some(cache);
        self
    }

    /// Follow the published snapshot until `shutdown` fires: start a probe task for every new
    /// (endpoint, check), stop the ones whose endpoint or check left, and forget their state
    /// and metric series (and the ejection series of endpoints that left). Bounded by
    /// `shutdown`; every probe task is bounded by it too and is aborted when this returns.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut targets: HashMap<TargetKey, Target> = HashMap::new();
        let mut last: Option<Arc<Snapshot>> = None;
        let mut tick = tokio::time::interval(SNAPSHOT_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.fired() => break,
                _ = tick.tick() => {}
            }
            let snap = self.reader.load();
            let same = match (&snap, &last) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            self.reconcile(snap.as_deref(), &mut targets, &shutdown);
            if let Some(retained) = &self.retained {
                retained.prune(snap.as_deref());
            }
            prune_upstream_series(snap.as_deref(), &self.metrics);
            // Routes change only with the host table; endpoint-only builds reuse it.
            let routes_changed = match (&snap, &last) {
                (Some(a), Some(b)) => !Arc::ptr_eq(&a.hosts, &b.hosts),
                _ => true,
            };
            if routes_changed && let Some(cache) = &self.route_metrics {
                cache.prune(snap.as_deref());
            }
            last = snap;
        }
        for (key, t) in targets.drain() {
            t.task.abort();
            self.forget(&key, &t.labels);
        }
    }

    fn reconcile(
        &self,
        snap: Option<&Snapshot>,
        targets: &mut HashMap<TargetKey, Target>,
        shutdown: &Shutdown,
    ) {
        let mut wanted: HashMap<TargetKey, [String; 3]> = HashMap::new();
        for b in snap.iter().flat_map(|s| s.backends.backends.iter()) {
            let Some(check) = &b.health_check else {
                continue;
            };
            for ep in b.endpoints.iter() {
                wanted.entry((ep.addr, check.clone())).or_insert_with(|| {
                    [
                        b.key.namespace.to_string(),
                        b.key.service.to_string(),
                        ep.addr.to_string(),
                    ]
                });
            }
        }
        let gone: Vec<TargetKey> = targets
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(t) = targets.remove(&key) {
                t.task.abort();
                self.forget(&key, &t.labels);
            }
        }
        for (key, labels) in wanted {
            if targets.contains_key(&key) {
                continue;
            }
            let probe = Probe {
                addr: key.0,
                check: key.1.clone(),
                state: self.state.clone(),
                metrics: self.metrics.clone(),
                labels: labels.clone(),
            };
            let task = tokio::spawn(probe.run(shutdown.clone()));
            targets.insert(key, Target { labels, task });
        }
    }

    /// An endpoint (or its check) left the snapshot: drop its mark and its series, so neither
    /// state nor label values grow with pod churn.
    fn forget(&self, key: &TargetKey, labels: &[String; 3]) {
        self.state.set(key.0, &key.1, false);
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        let _ = self.metrics.endpoint_healthy.remove_label_values(&l);
        for result in ["success", "failure"] {
            let mut lr = l.clone();
            lr.push(result);
            let _ = self.metrics.health_checks.remove_label_values(&lr);
        }
    }
}

/// The probe loop of one (endpoint, check).
struct Probe {
    addr: SocketAddr,
    check: Arc<HealthCheck>,
    state: Arc<ActiveHealth>,
    metrics: Arc<Metrics>,
    labels: [String; 3],
}

impl Probe {
    async fn run(self, mut shutdown: Shutdown) {
        let l: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        let gauge = self.metrics.endpoint_healthy.with_label_values(&l);
        let result = |r: &'static str| {
            let mut lr = l.clone();
            lr.push(r);
            self.metrics.health_checks.with_label_values(&lr)
        };
        let (ok_count, fail_count) = (result("success"), result("failure"));
        // Endpoints start up (readiness vouched for them). Clear any mark a probe task of the
        // same (endpoint, check) that was aborted mid-poll may have written after it was
        // forgotten, or the endpoint would stay excluded while the gauge says up.
        self.state.set(self.addr, &self.check, false);
        gauge.set(1);
        let mut verdict = Verdict::default();
        // The first probe comes after a jitter only, so a new endpoint is vetted quickly.
        let mut wait = jitter(self.check.interval);
        // Bounded by shutdown (and by abort when the endpoint leaves).
        loop {
            tokio::select! {
                () = shutdown.fired() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let ok = probe(self.addr, &self.check).await;
            if ok {
                ok_count.inc();
            } else {
                fail_count.inc();
            }
            if let Some(up) = verdict.observe(ok, &self.check) {
                self.state.set(self.addr, &self.check, !up);
                gauge.set(i64::from(up));
                if up {
                    tracing::info!(endpoint = %self.addr, service = %self.labels[1], "active health check: endpoint up");
                } else {
                    tracing::warn!(endpoint = %self.addr, service = %self.labels[1], path = %self.check.path, "active health check: endpoint down");
                }
            }
            wait = self.check.interval + jitter(self.check.interval);
        }
    }
}

/// The up/down state of one (endpoint, check) and the streak of results arguing to flip it.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    up: bool,
    streak: u32,
}

impl Default for Verdict {
    /// Up: Kubernetes readiness already vouched for the endpoint.
    fn default() -> Self {
        Verdict {
            up: true,
            streak: 0,
        }
    }
}

impl Verdict {
    /// Count one probe result; `Some(new state)` when it flips: down after
    /// `unhealthy_threshold` consecutive failures, up after `healthy_threshold` consecutive
    /// successes. A result agreeing with the current state resets the streak.
    fn observe(&mut self, ok: bool, check: &HealthCheck) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        let threshold = if self.up {
            check.unhealthy_threshold
        } else {
            check.healthy_threshold
        };
        if self.streak < threshold.max(1) {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(self.up)
    }
}

fn jitter(interval: Duration) -> Duration {
    let max = interval / JITTER_DIVISOR;
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(..=ms))
}

/// One probe: a fresh HTTP/1.1 connection, `GET path` with `Host` = the endpoint address,
/// within the check's timeout. Healthy = 2xx or 3xx response headers.
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> bool {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (mut tx, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
        let req = Request::get(check.path.as_str())
            .header(header::HOST, addr.to_string())
            .header(header::USER_AGENT, USER_AGENT)
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .ok()?;
        // The connection task ends when the exchange does (`Connection: close`) and at the
        // latest after the check's timeout, so a probe never leaves a task behind.
        let timeout = check.timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, conn).await;
        });
        let s = tx.send_request(req).await.ok()?.status();
        Some(s.is_success() || s.is_redirection())
    };
    matches!(
        tokio::time::timeout(check.timeout, attempt).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> Arc<HealthCheck> {
        Arc::new(HealthCheck {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        })
    }

    #[test]
    fn marks_are_per_address_and_check() {
        let s = ActiveHealth::default();
        let a = SocketAddr::from(([10, 0, 0, 1], 80));
        let c = check();
        let other = Arc::new(HealthCheck {
            path: "/other".into(),
            ..(*c).clone()
        });
        assert!(!s.is_down(a, &c));
        s.set(a, &c, true);
        assert!(s.is_down(a, &c));
        assert!(!s.is_down(a, &other));
        s.set(a, &c, true);
        s.set(a, &c, false);
        assert!(!s.is_down(a, &c));
        assert!(s.down.read().expect("lock").is_empty(), "no state left");
    }

    /// A one-shot raw HTTP server answering every connection with `reply` (or nothing).
    async fn raw_server(reply: Option<&'static str>) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            // Bounded: the listener lives as long as the test's runtime.
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    assert!(text.starts_with("GET /healthz HTTP/1.1\r\n"), "{text}");
                    assert!(text.to_ascii_lowercase().contains(&format!("host: {addr}")));
                    match reply {
                        Some(r) => {
                            let _ = s.write_all(r.as_bytes()).await;
                        }
                        // Never answer: hold the socket until the peer gives up.
                        None => {
                            let _ = s.read(&mut buf).await;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn probe_results_by_status_class_timeout_and_refusal() {
        let c = HealthCheck {
            timeout: Duration::from_millis(300),
            ..(*check()).clone()
        };
        let answer = |status: &'static str| {
            raw_server(Some(match status {
                "200" => "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                "302" => "HTTP/1.1 302 Found\r\nlocation: /\r\ncontent-length: 0\r\n\r\n",
                "404" => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
                _ => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
            }))
        };
        assert!(probe(answer("200").await, &c).await);
        assert!(probe(answer("302").await, &c).await);
        assert!(!probe(answer("404").await, &c).await);
        assert!(!probe(answer("503").await, &c).await);
        // Not HTTP at all.
        assert!(!probe(raw_server(Some("garbage\r\n\r\n")).await, &c).await);
        // No answer within the timeout.
        assert!(!probe(raw_server(None).await, &c).await);
        // Refused.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead = l.local_addr().expect("addr");
        drop(l);
        assert!(!probe(dead, &c).await);
    }

    #[test]
    fn thresholds_flip_the_state_only_on_consecutive_results() {
        let c = check(); // healthy 2, unhealthy 3
        let mut v = Verdict::default();
        let run = |v: &mut Verdict, results: &[bool]| -> Vec<Option<bool>> {
            results.iter().map(|ok| v.observe(*ok, &c)).collect()
        };
        // Two failures, a success (streak reset), then three failures: down on the third.
        assert_eq!(
            run(&mut v, &[false, false, true, false, false, false]),
            [None, None, None, None, None, Some(false)]
        );
        // One success, a failure (reset), then two successes: up on the second.
        assert_eq!(
            run(&mut v, &[true, false, true, true]),
            [None, None, None, Some(true)]
        );
        assert_eq!(run(&mut v, &[true, true]), [None, None]);
    }

    #[test]
    fn jitter_stays_within_a_tenth() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(10)) <= Duration::from_secs(1));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
