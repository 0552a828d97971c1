//! The per-request pipeline: validate, normalise, route, forward, answer. Every request from
//! every listener goes through [`Handler::handle`].
//!
//! Owns: the request rules of brief §4.3/§4.4 that apply after a connection is accepted
//! (validation, Host/authority, path normalisation, routing, redirects, concurrency caps,
//! body limit, header rewriting, WebSocket tunnels, metrics and the access log). Must not
//! import kube, k8s-openapi, translate or the listener: it sees one snapshot per request
//! through [`Reader::load`].

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::model::{IngressRef, RateLimit, RouteTarget, UpstreamProtocol, normalize_host};
use crate::publish::Reader;

use super::balance::Affinity;
use super::client_ip::client_ip;
use super::error::{ProxyError, empty_body, full_body};
use super::framing::CL_TE_MARKER;
use super::health::HealthChecker;
use super::ratelimit::{Limiter, RateHeaders, Verdict};
use super::route_metrics::{RouteMetrics, RouteMetricsCache};
use super::upstream::{BodyFlags, OutboundRequest, PoolReturn, Upstreams};
use super::{BoxError, ConnInfo, ProxyBody, ProxyConfig, StreamProgress};
use crate::model::path::{is_sub_delim, is_unreserved, normalize_path};

/// ACME HTTP-01 challenges must stay reachable over plain HTTP (RFC 8555 §8.3).
const ACME_PREFIX: &str = "/.well-known/acme-challenge/";
/// Longest client `X-Request-ID` kept as is.
const MAX_REQUEST_ID_LEN: usize = 128;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Shared by all connections and worker threads.
pub struct Handler {
    cfg: Arc<ProxyConfig>,
    reader: Reader,
    metrics: Arc<Metrics>,
    upstreams: Upstreams,
    inflight: Arc<AtomicUsize>,
    /// Per-Ingress in-flight counts; outside the snapshot so a swap does not reset them.
    route_inflight: RwLock<HashMap<IngressRef, Arc<AtomicUsize>>>,
    request_ids: RequestIds,
    /// RateLimitPolicy buckets and `maxInFlight` counters, outside the snapshot (brief §4.5).
    limiter: Limiter,
    /// Request metric handles per (Ingress, Service).
    metric_cache: Arc<RouteMetricsCache>,
}

/// Decrements an in-flight counter when the request (including its response body) ends.
struct InflightGuard(Arc<AtomicUsize>);

impl InflightGuard {
    fn acquire(counter: &Arc<AtomicUsize>, cap: u32) -> Option<InflightGuard> {
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        if prev >= cap as usize {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InflightGuard(counter.clone()))
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Process-unique request ids: a random prefix and a counter (no extra crate needed).
struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        // `RandomState` is seeded from the OS per process: good enough to tell processes
        // apart, which is all an id prefix needs.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        RequestIds {
            prefix: format!("{:016x}", h.finish()),
            next: AtomicU64::new(1),
        }
    }

    fn generate(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // `prefix-counter` in lower-case hex, written by hand: `format!` cost more than a
        // thousand instructions per request here (callgrind). Hex digits and '-' only, so
        // always a valid header value; the buffer becomes the value without a copy.
        let mut digits = [0u8; 16];
        let mut at = digits.len();
        let mut rest = n;
        loop {
            at -= 1;
            digits[at] = b"0123456789abcdef"[(rest & 0xf) as usize];
            rest >>= 4;
            if rest == 0 || at == 0 {
                break;
            }
        }
        let mut id = Vec::with_capacity(self.prefix.len() + 1 + digits.len() - at);
        id.extend_from_slice(self.prefix.as_bytes());
        id.push(b'-');
        id.extend_from_slice(&digits[at..]);
        HeaderValue::try_from(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

/// Kept from the client only if it is short and made of token-like characters, so it is
/// safe in logs and upstream headers.
fn sane_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_REQUEST_ID_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:+/=".contains(c))
}

/// What the access log and metrics need about one request, filled in as it progresses.
/// Names are shared with the snapshot (`Arc` clones); host, path and request id are copied
/// only when the access log is on.
#[derive(Default)]
struct Record {
    method: Method,
    host: String,
    path: String,
    request_id: String,
    ingress: Option<IngressRef>,
    service: Option<Arc<str>>,
    upstream_addr: Option<SocketAddr>,
    upstream_ms: Option<u128>,
    bytes_in: Arc<AtomicU64>,
    /// `RateLimit-Policy` / `RateLimit` for the response, once the route's policies ran.
    rate_headers: Option<RateHeaders>,
    /// Metric handles of (ingress, service), once both are known.
    route_metrics: Option<Arc<RouteMetrics>>,
    /// An upgraded (WebSocket) request: its tunnel's bytes, sent when the tunnel ends. The
    /// access-log line waits for it, so it says how long the session lasted and what it
    /// carried, as nginx logs a WebSocket at close.
    tunnel: Option<tokio::sync::oneshot::Receiver<TunnelBytes>>,
}

/// What an upgraded connection carried, each way.
#[derive(Debug, Default, Clone, Copy)]
struct TunnelBytes {
    from_client: u64,
    to_client: u64,
}

impl Record {
    fn namespace(&self) -> &str {
        self.ingress.as_ref().map_or("", |i| &i.namespace)
    }

    fn ingress(&self) -> &str {
        self.ingress.as_ref().map_or("", |i| &i.name)
    }
}

/// The validated request head.
struct Head {
    /// Authority the client addressed (Host or `:authority`/absolute-form), as sent.
    authority: String,
    /// Normalised host for lookup.
    host: String,
    /// RFC 3986-normalised path.
    path: String,
    query: Option<String>,
}

impl Handler {
    pub fn new(cfg: Arc<ProxyConfig>, reader: Reader, metrics: Arc<Metrics>) -> Handler {
        let limiter = Limiter::new(
            cfg.rate_limit_max_keys,
            metrics.ratelimit_tracked_keys.clone(),
            metrics.ratelimit_evicted_keys.clone(),
        );
        Handler {
            upstreams: Upstreams::new(metrics.clone(), cfg.max_ejection_percent),
            metric_cache: Arc::new(RouteMetricsCache::new(metrics.clone())),
            cfg,
            reader,
            metrics,
            inflight: Arc::new(AtomicUsize::new(0)),
            route_inflight: RwLock::new(HashMap::new()),
            request_ids: RequestIds::new(),
            limiter,
        }
    }

    /// Rate-limit state (buckets, `maxInFlight` counters): exposed for tests and admin.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The upstream side (pools, health): exposed for tests and admin.
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// The active health checker over this handler's snapshots and endpoint marks; the
    /// listener runs it (once) beside the accept loops.
    pub fn health_checker(&self) -> HealthChecker {
        HealthChecker::new(
            self.upstreams.active_health(),
            self.reader.clone(),
            self.metrics.clone(),
        )
        .with_route_metrics(self.metric_cache.clone())
        .with_retained_state(self.upstreams.retained_state())
    }

    /// Requests in flight now (counted only when a global cap is configured).
    pub fn in_flight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Serve one request. The listener serves connections with upgrades enabled so WebSocket
    /// upgrades can be taken from `req`.
    pub async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
        conn: &ConnInfo,
    ) -> Response<ProxyBody> {
        // Counted and logged even when the client goes away before the response head (this
        // future is then dropped): a request abandoned on a slow backend is exactly the one an
        // operator looks for.
        let mut pending = Pending {
            rec: Some(Box::new(Record {
                method: req.method().clone(),
                path: if self.cfg.access_log {
                    req.uri().path().to_string()
                } else {
                    String::new()
                },
                ..Record::default()
            })),
            guards: Vec::new(),
            start: Instant::now(),
            metric_cache: &self.metric_cache,
            access_log: self.cfg.access_log,
            armed: true,
        };
        let mut pool_return = None;
        let result = self
            .serve(
                req,
                conn,
                pending.rec.get_or_insert_with(Box::default),
                &mut pending.guards,
                &mut pool_return,
            )
            .await;
        pending.armed = false;
        let mut rec = *pending.rec.take().unwrap_or_default();
        let guards = std::mem::take(&mut pending.guards);
        let start = pending.start;
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(reason) = e.reject_reason() {
                    self.metrics
                        .rejected_requests
                        .with_label_values(&[reason])
                        .inc();
                }
                tracing::debug!(error = %e, origin = ?e.origin(), "request answered with error");
                e.to_response()
            }
        };
        // Every response on a limited route carries the limits, 429 included (brief §4.5).
        if let Some(h) = rec.rate_headers.take() {
            h.apply(resp.headers_mut());
        }
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        let body = TrackedBody {
            inner: body,
            bytes_out: 0,
            errored: false,
            pool_return,
            finish: Some(Finish {
                rec,
                status,
                start,
                guards,
                metric_cache: self.metric_cache.clone(),
                access_log: self.cfg.access_log,
            }),
        };
        Response::from_parts(parts, body.boxed())
    }

    fn route_counter(&self, ing: &IngressRef) -> Arc<AtomicUsize> {
        if let Some(c) = self
            .route_inflight
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(ing)
        {
            return c.clone();
        }
        self.route_inflight
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(ing.clone())
            .or_default()
            .clone()
    }

    fn count_overload(&self, labels: [&str; 4]) {
        self.metrics
            .concurrency_rejected
            .with_label_values(&labels)
            .inc();
    }

    /// The limits' headers for a response on a limited route that is decided before the
    /// limits are checked (a redirect to HTTPS, no endpoint, the Ingress's concurrency cap):
    /// every response on a limited route carries them (brief §4.5); these report the state
    /// and spend nothing, as the policies' own `maxInFlight` refusal does.
    fn peek_limits(
        &self,
        limits: &[RateLimit],
        headers: &HeaderMap,
        conn: &ConnInfo,
        rec: &mut Record,
    ) {
        if limits.is_empty() {
            return;
        }
        let client = client_ip(conn.peer.ip(), headers, &self.cfg.trusted_proxies);
        rec.rate_headers = self.limiter.peek(limits, client, headers).headers;
    }

    /// The route's RateLimitPolicies (brief §4.5), all of which must admit: `maxInFlight`
    /// slots first (503, no token spent), then one token from every bucket (429, and a
    /// refusal by one policy spends nothing from the others). The resulting headers go on
    /// whatever response follows.
    fn enforce_limits(
        &self,
        limits: &[RateLimit],
        headers: &HeaderMap,
        conn: &ConnInfo,
        rec: &mut Record,
        guards: &mut Vec<InflightGuard>,
    ) -> Result<(), ProxyError> {
        if limits.is_empty() {
            return Ok(());
        }
        let client = client_ip(conn.peer.ip(), headers, &self.cfg.trusted_proxies);
        for limit in limits {
            let Some(cap) = limit.max_in_flight else {
                continue;
            };
            match InflightGuard::acquire(&self.limiter.in_flight(&limit.policy), cap) {
                Some(g) => guards.push(g),
                None => {
                    let name = &limit.policy.name;
                    self.count_overload(["policy", rec.namespace(), rec.ingress(), name]);
                    rec.rate_headers = self.limiter.peek(limits, client, headers).headers;
                    return Err(ProxyError::Overloaded("policy_concurrency"));
                }
            }
        }
        let checked = self.limiter.check(limits, client, headers, Instant::now());
        rec.rate_headers = checked.headers;
        if let Verdict::Limited {
            policy,
            retry_after_secs,
        } = checked.verdict
        {
            let name = limits.get(policy).map_or("", |l| &*l.policy.name);
            self.metrics
                .ratelimit_rejected
                .with_label_values(&[rec.namespace(), rec.ingress(), name])
                .inc();
            return Err(ProxyError::RateLimited { retry_after_secs });
        }
        Ok(())
    }

    async fn serve(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        rec: &mut Record,
        guards: &mut Vec<InflightGuard>,
        pool_return: &mut Option<PoolReturn>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // Load once: the whole request uses this one snapshot (brief §2).
        let snapshot = self.reader.load().ok_or(ProxyError::NotReady)?;
        if let Some(cap) = self.cfg.max_concurrent_requests {
            match InflightGuard::acquire(&self.inflight, cap) {
                Some(g) => guards.push(g),
                None => {
                    self.count_overload(["global", "", "", ""]);
                    return Err(ProxyError::Overloaded("global_concurrency"));
                }
            }
        }

        let mut head = validate_head(&req, &self.cfg)?;
        if self.cfg.access_log {
            rec.host = head.host.clone();
            rec.path = head.path.clone();
        }

        let matched = snapshot.route(&head.host, &head.path);
        let route = matched.route.ok_or(ProxyError::NoRoute)?;
        rec.ingress = Some(route.ingress.clone());
        let policy = route.policy.clone();

        let trusted = self
            .cfg
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&conn.peer.ip()));
        // The client's own scheme: a trusted proxy that terminated TLS (a cloud load balancer
        // in front of the plain port) says so in X-Forwarded-Proto. Redirecting such requests
        // would loop for ever; HSTS belongs on them.
        let https = conn.tls || (trusted && forwarded_https(req.headers()));
        // Plain HTTP on a TLS host → 308 keeps method and body (RFC 9110 §15.4.9).
        if !https
            && !head.path.starts_with(ACME_PREFIX)
            && policy.redirects(&snapshot.tls, &head.host)
        {
            self.peek_limits(&policy.rate_limits, req.headers(), conn, rec);
            return Ok(redirect(&head));
        }

        let backend = match &route.target {
            RouteTarget::Backend(id) => snapshot.backends.get(*id),
            RouteTarget::Unavailable { reason } => {
                tracing::debug!(%reason, ingress = rec.ingress(), "route unavailable");
                None
            }
        };
        let Some(backend) = backend else {
            self.peek_limits(&policy.rate_limits, req.headers(), conn, rec);
            return Err(ProxyError::NoEndpoints);
        };
        rec.service = Some(backend.key.service.clone());
        let route_metrics = self
            .metric_cache
            .get(rec.ingress.as_ref(), rec.service.as_ref());
        rec.route_metrics = Some(route_metrics.clone());
        if backend.endpoints.is_empty() {
            self.peek_limits(&policy.rate_limits, req.headers(), conn, rec);
            return Err(ProxyError::NoEndpoints);
        }

        if let Some(cap) = policy.max_concurrent_requests {
            let counter = self.route_counter(&route.ingress);
            match InflightGuard::acquire(&counter, cap) {
                Some(g) => guards.push(g),
                None => {
                    self.count_overload(["ingress", rec.namespace(), rec.ingress(), ""]);
                    self.peek_limits(&policy.rate_limits, req.headers(), conn, rec);
                    return Err(ProxyError::Overloaded("route_concurrency"));
                }
            }
        }
        self.enforce_limits(&policy.rate_limits, req.headers(), conn, rec, guards)?;

        // Content-Length over the limit: refuse before contacting any upstream.
        if policy.body_limit > 0
            && let Some(len) = content_length(req.headers())?
            && len > policy.body_limit
        {
            return Err(ProxyError::BodyTooLarge);
        }

        // HTTP/2 has no Upgrade (RFC 9113 §8.6): towards an h2c upstream the header is ignored,
        // as RFC 9110 §7.8 allows, and the request goes as a plain one.
        let upgrade =
            websocket_upgrade(&req) && policy.upstream_protocol == UpstreamProtocol::Http1;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        if parts.version == Version::HTTP_2 && policy.upstream_protocol == UpstreamProtocol::Http1 {
            crate::proxy::upstream::join_cookies(&mut headers);
        }
        // Hash input from the request as the client sent it (brief §4.6), before rewriting.
        let affinity = Affinity::of(
            &policy.load_balance,
            conn.peer.ip(),
            &headers,
            &self.cfg.trusted_proxies,
            conn.tls,
        );
        strip_hop_by_hop(&mut headers, upgrade);
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        // The authority as a header value once: X-Forwarded-Host and the upstream Host share
        // it (validate_head admitted visible ASCII only, so the conversion cannot fail).
        let authority = HeaderValue::try_from(std::mem::take(&mut head.authority))
            .map_err(|_| ProxyError::BadRequest("invalid_host"))?;
        // From a trusted proxy the client is the right-most X-Forwarded-For entry that is not
        // itself a trusted proxy (what rate limits and hashing use too); otherwise the peer.
        let real_ip =
            trusted.then(|| client_ip(conn.peer.ip(), &headers, &self.cfg.trusted_proxies));
        set_forwarding_headers(&mut headers, conn, trusted, real_ip, &authority);
        // One X-Request-ID reaches the upstream: the client's first, when it is sane, else a
        // new one (a repeated field would give the backend and the access log different ids).
        let mut ids = headers.get_all(&X_REQUEST_ID).iter();
        let first = ids.next();
        let repeated = ids.next().is_some();
        match first.filter(|v| sane_request_id(v)) {
            Some(id) if repeated => {
                let id = id.clone();
                headers.insert(X_REQUEST_ID.clone(), id);
            }
            Some(_) => {}
            None => {
                headers.insert(X_REQUEST_ID.clone(), self.request_ids.generate());
            }
        }
        if self.cfg.access_log
            && let Some(id) = headers.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok())
        {
            rec.request_id = id.to_string();
        }

        let body_flags = Arc::new(BodyFlags::default());
        let body = if body.is_end_stream() {
            None
        } else {
            Some(
                LimitedBody {
                    inner: body,
                    limit: policy.body_limit,
                    seen: 0,
                    flags: body_flags.clone(),
                    counter: rec.bytes_in.clone(),
                    // HTTP/2: the listener's stream idle timer counts these frames.
                    progress: if parts.version == Version::HTTP_2 {
                        parts.extensions.get::<StreamProgress>().cloned()
                    } else {
                        None
                    },
                }
                .boxed(),
            )
        };
        // Most paths need no normalisation: then the client's path-and-query is forwarded as
        // is (a shared `Bytes`, no copy, no re-parse).
        let path_and_query = match parts.uri.path_and_query() {
            Some(pq) if pq.path() == head.path && pq.query() == head.query.as_deref() => pq.clone(),
            _ => {
                let joined = match &head.query {
                    Some(q) => format!("{}?{q}", head.path),
                    None => head.path.clone(),
                };
                PathAndQuery::try_from(joined).map_err(|_| ProxyError::BadRequest("path"))?
            }
        };
        let out = OutboundRequest {
            method: parts.method,
            path_and_query,
            authority,
            headers,
            body,
            body_flags,
        };

        let forwarded = self
            .upstreams
            .forward(backend, &policy, out, self.cfg.max_retries, &affinity)
            .await?;
        rec.upstream_addr = Some(forwarded.addr);
        rec.upstream_ms = Some(forwarded.upstream_time.as_millis());
        route_metrics
            .upstream_duration
            .observe(forwarded.upstream_time.as_secs_f64());

        let mut resp = forwarded.response;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                // A 101 the client did not ask for cannot be relayed (RFC 9110 §15.2.2).
                return Err(ProxyError::UpstreamReset);
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let idle = self.cfg.stream_idle_timeout;
            // The tunnel is the request's real lifetime: its concurrency slots (global,
            // per-Ingress, maxInFlight) and the endpoint's in-flight count stay taken until it
            // ends, not just until the 101 is written.
            let held_guards = std::mem::take(guards);
            let held_upstream = forwarded.pool_return;
            let (done, tunnel_done) = tokio::sync::oneshot::channel();
            rec.tunnel = Some(tunnel_done);
            tokio::spawn(async move {
                let carried = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => tunnel(TokioIo::new(c), TokioIo::new(u), idle).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "upgrade failed");
                        TunnelBytes::default()
                    }
                };
                drop((held_guards, held_upstream));
                let _ = done.send(carried);
            });
            let (mut parts, _) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, true);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            // A WebSocket handshake may be a client's first request on a sticky route: its
            // reconnects find the same endpoint only with the cookie.
            affinity.apply(&mut parts.headers);
            return Ok(Response::from_parts(parts, empty_body()));
        }

        let (mut parts, body) = resp.into_parts();
        // The upstream's HTTP version is hop-by-hop (RFC 9110 §6.2): the client hears the
        // version of its own connection. hyper writes the status line from this field, so an
        // HTTP/1.0 upstream would otherwise downgrade (and close) a keep-alive HTTP/1.1 client;
        // hyper itself answers an HTTP/1.0 client as 1.0.
        parts.version = Version::HTTP_11;
        let present = hop_by_hop_present(&parts.headers);
        if present & HOP_TRANSFER_ENCODING != 0
            && let Some(problem) = ambiguous_response_framing(&parts.headers)
        {
            // hyper's client decodes such a body by its Transfer-Encoding but leaves the
            // header fields alone; forwarded, a stale Content-Length would cut the body short
            // on a response that looks complete, and a coding other than chunked would reach
            // the client undeclared. Refused as nginx does (RFC 9112 §6.3 calls the pair an
            // error to handle); the connection is dropped, not pooled.
            tracing::warn!(
                endpoint = %forwarded.addr,
                problem,
                "upstream response framing refused; answering 502"
            );
            return Err(ProxyError::UpstreamFraming);
        }
        strip_present_hop_by_hop(&mut parts.headers, present, false);
        affinity.apply(&mut parts.headers);
        if https
            && let Some(hsts) = &policy.hsts
            && let Ok(v) = HeaderValue::from_str(hsts)
        {
            parts.headers.insert(header::STRICT_TRANSPORT_SECURITY, v);
        }
        *pool_return = forwarded.pool_return;
        // Upstream body errors propagate so hyper aborts the client response instead of
        // finishing it as if complete (brief §4.4).
        Ok(Response::from_parts(
            parts,
            body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
        ))
    }
}

fn redirect(head: &Head) -> Response<ProxyBody> {
    let mut location = format!("https://{}{}", head.host, head.path);
    if let Some(q) = &head.query {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = Response::new(full_body(Bytes::from_static(b"Permanent Redirect\n")));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// More than `max` header fields, counted as HTTP/1.1 would: h2 clients may send each cookie
/// as a field of its own (RFC 9113 §8.2.3), which HTTP/1.1 sends as one line, so all
/// `cookie` fields count once. The cookies are counted only on a map already over `max`.
fn too_many_fields(headers: &HeaderMap, max: usize) -> bool {
    let n = headers.len();
    if n <= max {
        return false;
    }
    let cookies = headers.get_all(header::COOKIE).iter().count();
    n - cookies + usize::from(cookies > 0) > max
}

/// All the checks of the request head that need no route (brief §4.4 "Status codes",
/// "Framing", "Paths", "Host").
fn validate_head<B>(req: &Request<B>, cfg: &ProxyConfig) -> Result<Head, ProxyError> {
    // The h1 framing guard renamed the Content-Length of a head that also carried
    // Transfer-Encoding (RFC 9112 §6.3 item 3: ambiguous framing, 400 and close). A client
    // sending the marker name itself gets the same answer.
    if req.headers().contains_key(CL_TE_MARKER) {
        return Err(ProxyError::BadRequest("cl_and_te"));
    }
    // portico is a reverse proxy: it does not open CONNECT tunnels (nor h2 extended CONNECT).
    if req.method() == Method::CONNECT {
        return Err(ProxyError::UnsupportedMethod);
    }
    let uri = req.uri();
    // Authority-form (`GET other.example:80`) is for CONNECT only (RFC 9112 §3.2.3); taken as
    // the authority it would route a request past a front proxy's Host-based checks. An
    // absolute-form target must be http or https (RFC 9112 §3.2.2).
    if uri.authority().is_some() {
        match uri.scheme_str() {
            None => return Err(ProxyError::BadRequest("authority_form")),
            Some(s) if !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https") => {
                return Err(ProxyError::BadRequest("bad_scheme"));
            }
            Some(_) => {}
        }
    }
    let target_len = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, |s| s.len() + 3);
    if target_len > cfg.max_request_line {
        return Err(ProxyError::UriTooLong);
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    // hyper's h1 parser refuses more fields than `max_headers` itself (431); h2 has no such
    // limit, only a header-list size, so the count is checked here for both.
    if header_bytes > cfg.max_header_bytes || too_many_fields(req.headers(), cfg.max_headers) {
        return Err(ProxyError::HeadersTooLarge);
    }

    check_transfer_encoding(req)?;
    // Differing duplicate Content-Length is ambiguous framing (RFC 9112 §6.3 item 5).
    content_length(req.headers())?;

    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("duplicate_host"));
    }
    let host_header = match host_header {
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ProxyError::BadRequest("invalid_host"))?;
            if !valid_authority(s) {
                return Err(ProxyError::BadRequest("invalid_host"));
            }
            Some(s)
        }
        None => None,
    };
    // RFC 9112 §3.2: an HTTP/1.1 request without Host is refused.
    if req.version() == Version::HTTP_11 && host_header.is_none() {
        return Err(ProxyError::BadRequest("missing_host"));
    }
    // Absolute-form (RFC 9112 §3.2.2) and h2 `:authority` (RFC 9113 §8.3.1) win over Host.
    let authority = match uri.authority() {
        Some(a) => {
            if !valid_authority(a.as_str()) {
                return Err(ProxyError::BadRequest("invalid_host"));
            }
            a.as_str().to_string()
        }
        None => host_header.unwrap_or_default().to_string(),
    };
    // `Head` owns its host, so a borrowed (already normal) host is copied once here.
    let host = normalize_host(&authority)
        .map(String::from)
        .unwrap_or_default();

    let raw_path = if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    };
    let path = normalize_path(raw_path).map_err(|_| ProxyError::BadRequest("path"))?;
    let query = uri.query().map(str::to_string);
    if let Some(q) = &query
        && q.bytes().any(|b| b == b'\\' || b.is_ascii_control())
    {
        return Err(ProxyError::BadRequest("path"));
    }
    Ok(Head {
        authority,
        host,
        path,
        query,
    })
}

/// RFC 3986 reg-name bytes: unreserved, `%` of pct-encoded, sub-delims.
const REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = is_unreserved(b) || is_sub_delim(b) || b == b'%';
        i += 1;
    }
    t
};

/// Host or authority as RFC 3986 §3.2 writes it, without userinfo (RFC 9110 §4.2.4 forbids it
/// in http URIs): a non-empty reg-name (unreserved, pct-encoded and sub-delims characters) or
/// a bracketed IPv6 literal, and an optional all-digit port. RFC 9112 §3.2: any other Host is
/// a 400. Checked byte by byte, with no allocation (this runs on every request).
fn valid_authority(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => "",
            _ => match after.strip_prefix(':') {
                Some(p) => p,
                None => return false,
            },
        };
        return !literal.is_empty()
            && literal
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && port.bytes().all(|b| b.is_ascii_digit());
    }
    // One pass: reg-name characters up to the first `:`, digits after it.
    let mut in_port = false;
    for (i, b) in s.bytes().enumerate() {
        let ok = if in_port {
            b.is_ascii_digit()
        } else if b == b':' {
            in_port = true;
            i > 0
        } else {
            REG_NAME[usize::from(b)]
        };
        if !ok {
            return false;
        }
    }
    !s.is_empty()
}

/// RFC 9112 §6.1: on HTTP/1.x only `chunked` is supported, and it must be last. HTTP/2
/// forbids the header (RFC 9113 §8.2.2), so any Transfer-Encoding there is malformed.
fn check_transfer_encoding<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let values = req.headers().get_all(header::TRANSFER_ENCODING);
    let mut codings = Vec::new();
    for v in values {
        let s = v
            .to_str()
            .map_err(|_| ProxyError::BadRequest("transfer_encoding"))?;
        codings.extend(s.split(',').map(|c| c.trim().to_ascii_lowercase()));
    }
    if codings.is_empty() {
        return Ok(());
    }
    if req.version() >= Version::HTTP_2 {
        return Err(ProxyError::BadRequest("transfer_encoding"));
    }
    if codings.iter().any(|c| c != "chunked") {
        return Err(ProxyError::UnsupportedTransferCoding);
    }
    if codings.len() > 1 {
        // `chunked, chunked` is chunked applied twice: refuse rather than guess.
        return Err(ProxyError::BadRequest("transfer_encoding"));
    }
    if req.headers().contains_key(header::CONTENT_LENGTH) {
        return Err(ProxyError::BadRequest("cl_and_te"));
    }
    Ok(())
}

/// The request's Content-Length, refusing invalid or differing values (RFC 9110 §8.6).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ProxyError> {
    let mut found: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let s = v
            .to_str()
            .map_err(|_| ProxyError::BadRequest("content_length"))?;
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ProxyError::BadRequest("content_length"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| ProxyError::BadRequest("content_length"))?;
            if found.is_some_and(|f| f != n) {
                return Err(ProxyError::BadRequest("content_length"));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// An HTTP/1.1 WebSocket handshake (RFC 6455 §4.1): `Connection: upgrade` + `Upgrade:
/// websocket`. Other upgrade protocols (h2c...) are not relayed.
fn websocket_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && connection_has(req.headers(), "upgrade")
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
            })
}

/// RFC 9110 §7.6.1: remove Connection and every header it names, plus the well-known
/// hop-by-hop fields. `TE: trailers` survives (gRPC needs it, RFC 9113 §8.2.2); Upgrade
/// survives only on upgrades.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    strip_present_hop_by_hop(headers, hop_by_hop_present(headers), keep_upgrade);
}

/// Which fixed hop-by-hop fields `headers` carries, as [`hop_by_hop_bit`]s: one pass over the
/// names. Most messages carry none, or only Connection.
fn hop_by_hop_present(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0u8, |acc, n| acc | hop_by_hop_bit(n))
}

/// [`strip_hop_by_hop`] with the fields already found by [`hop_by_hop_present`].
fn strip_present_hop_by_hop(headers: &mut HeaderMap, present: u8, keep_upgrade: bool) {
    // Only the fields present are removed (a hashed remove per absent name cost more than the
    // rest of the function). Names listed in Connection need a Connection header, which is
    // one of them.
    if present == 0 {
        return;
    }
    // Read, then remove: `entry()` would reserve a slot first, which regrows a full map, and
    // a new connection's maps are full (hyper sizes them to the parsed head); callgrind
    // counted two such regrowths per request with a new connection each. There is almost
    // always one Connection field: it is held apart, so only further ones allocate.
    let (first, more): (Option<HeaderValue>, Vec<HeaderValue>) = if present & HOP_CONNECTION != 0 {
        let mut values = headers.get_all(header::CONNECTION).iter().cloned();
        let listed = (values.next(), values.collect());
        headers.remove(header::CONNECTION);
        listed
    } else {
        (None, Vec::new())
    };
    for token in first
        .iter()
        .chain(&more)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        // Upgrade stays on upgrades; Keep-Alive and (otherwise) Upgrade are removed below
        // with the fixed fields anyway, so the most common tokens of all ("keep-alive" on
        // nearly every HTTP/1.1 response) need no lookup by name here.
        if token.is_empty()
            || token.eq_ignore_ascii_case("keep-alive")
            || token.eq_ignore_ascii_case("upgrade")
        {
            continue;
        }
        // `&str` names are looked up without allocating (and case-insensitively); a token
        // that is not a valid header name names nothing.
        headers.remove(token);
    }
    if present & HOP_KEEP_ALIVE != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if present & HOP_PROXY_CONNECTION != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if present & HOP_TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & HOP_TE != 0 {
        let te_trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        headers.remove(header::TE);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if !keep_upgrade && present & HOP_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// Why an upstream response head cannot be forwarded as framed, if it cannot: a
/// Transfer-Encoding beside a Content-Length, or one that is not exactly `chunked` (any other
/// coding would stay applied to the body hyper hands over, and the field naming it is
/// hop-by-hop and removed). `None` for the usual heads, which carry no Transfer-Encoding.
fn ambiguous_response_framing(headers: &HeaderMap) -> Option<&'static str> {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    let first = codings.next()?;
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Some("both Content-Length and Transfer-Encoding");
    }
    if !first.eq_ignore_ascii_case(b"chunked") || codings.next().is_some() {
        return Some("a transfer coding other than chunked");
    }
    None
}

const HOP_CONNECTION: u8 = 1;
const HOP_TE: u8 = 2;
const HOP_TRANSFER_ENCODING: u8 = 4;
const HOP_UPGRADE: u8 = 8;
const HOP_KEEP_ALIVE: u8 = 16;
const HOP_PROXY_CONNECTION: u8 = 32;

/// Which of the fixed hop-by-hop fields of RFC 9110 §7.6.1 (plus the legacy Keep-Alive and
/// Proxy-Connection) `name` is, as a bit; 0 for any other name.
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        HOP_CONNECTION
    } else if name == header::TE {
        HOP_TE
    } else if name == header::TRANSFER_ENCODING {
        HOP_TRANSFER_ENCODING
    } else if name == header::UPGRADE {
        HOP_UPGRADE
    } else if name == KEEP_ALIVE {
        HOP_KEEP_ALIVE
    } else if name == PROXY_CONNECTION {
        HOP_PROXY_CONNECTION
    } else {
        0
    }
}

/// X-Forwarded-* and X-Real-IP. Client-sent values survive only from trusted proxies;
/// otherwise they are replaced (and `Forwarded` dropped) so clients cannot spoof them.
/// X-Forwarded-Proto says `https`: its last entry, the one the trusted peer itself set or
/// added (entries before it came from further away, a client's own claim included), in any
/// case; over several field lines, the last line's.
fn forwarded_https(headers: &HeaderMap) -> bool {
    headers
        .get_all(&X_FORWARDED_PROTO)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|scheme| scheme.trim().eq_ignore_ascii_case("https"))
}

fn set_forwarding_headers(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    trusted: bool,
    real_ip: Option<IpAddr>,
    authority: &HeaderValue,
) {
    let peer_ip = &conn.peer_ip_value;
    // Before the fields set here are added: only the client's own are looked at.
    if !trusted {
        strip_untrusted_forwarding(headers);
    }
    let prior: Vec<&str> = if trusted {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    let xff = if prior.is_empty() {
        peer_ip.clone()
    } else {
        let joined = format!("{}, {}", prior.join(", "), conn.peer.ip());
        HeaderValue::from_str(&joined).unwrap_or_else(|_| peer_ip.clone())
    };
    let set = |headers: &mut HeaderMap, name: &HeaderName, value: HeaderValue| {
        if trusted && headers.contains_key(name) {
            return;
        }
        headers.insert(name.clone(), value);
    };
    // Room for the five fields set here and the X-Request-ID the caller may add next, in
    // one step: a fresh map (a new connection's first request) would otherwise grow and
    // rehash on the way.
    headers.reserve(6);
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    set(
        headers,
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    set(headers, &X_FORWARDED_HOST, authority.clone());
    set(headers, &X_FORWARDED_PORT, conn.local_port_value.clone());
    // Never taken from the request (brief §4.5: X-Real-IP from clients is not trusted, and
    // a load balancer passes a client's on unchanged): the client address portico decided.
    let real_ip = match real_ip {
        Some(ip) if ip != conn.peer.ip() => {
            HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| peer_ip.clone())
        }
        _ => peer_ip.clone(),
    };
    headers.insert(X_REAL_IP.clone(), real_ip);
}

/// From a peer outside `--trusted-proxies`, the other forwarding fields a backend may believe
/// go too: `Forwarded`, any further `X-Forwarded-*` (Prefix, Server, Scheme, Ssl, ...),
/// `X-Original-*` and `X-Rewrite-URL` (URL overrides some frameworks honour: a client could
/// reach a path the route does not expose) and `X-Scheme`. One pass over the names; most
/// requests carry none.
fn strip_untrusted_forwarding(headers: &mut HeaderMap) {
    let spoofable = |name: &HeaderName| {
        if *name == header::FORWARDED {
            return true;
        }
        let name = name.as_str();
        // Most names are ruled out by their first byte (callgrind: string compares on every
        // field of every request cost more than the rest of this function).
        if !name.starts_with('x') {
            return false;
        }
        match name.strip_prefix("x-forwarded-") {
            Some(rest) => !matches!(rest, "for" | "proto" | "host" | "port"),
            None => {
                name.starts_with("x-original-") || name == "x-rewrite-url" || name == "x-scheme"
            }
        }
    };
    if !headers.keys().any(spoofable) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| spoofable(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// Error raised into the upstream request body when the client's body crosses the limit.
#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub struct BodyLimitExceeded;

/// The client's request body on its way upstream: counts bytes and fails the stream the
/// moment it crosses the route's limit, so nothing is buffered (brief §4.4 "Body limit").
struct LimitedBody {
    inner: Incoming,
    limit: u64,
    seen: u64,
    flags: Arc<BodyFlags>,
    counter: Arc<AtomicU64>,
    progress: Option<StreamProgress>,
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.flags.polled(match &polled {
            Poll::Ready(Some(Ok(_))) => Some(true),
            Poll::Pending => Some(false),
            Poll::Ready(_) => None,
        });
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(p) = &this.progress {
                    p.moved();
                }
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.seen = this.seen.saturating_add(n);
                    this.counter.fetch_add(n, Ordering::Relaxed);
                    if this.limit > 0 && this.seen > this.limit {
                        this.flags.limit_hit.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(BodyLimitExceeded))));
                    }
                }
                // hyper stops polling once the body says it has ended (Content-Length
                // reached), so the end is noticed here as well as at `None`.
                if this.inner.is_end_stream() {
                    this.flags.mark_sent();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.flags.client_failed.store(true, Ordering::Release);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.flags.mark_sent();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Emitted once per request when the response body is done (or dropped).
struct Finish {
    rec: Record,
    status: StatusCode,
    start: Instant,
    guards: Vec<InflightGuard>,
    metric_cache: Arc<RouteMetricsCache>,
    access_log: bool,
}

/// The response body to the client: counts bytes, returns the upstream connection to the
/// pool on a clean end, releases concurrency slots, and writes metrics + access log.
struct TrackedBody {
    inner: ProxyBody,
    bytes_out: u64,
    errored: bool,
    pool_return: Option<PoolReturn>,
    finish: Option<Finish>,
}

impl TrackedBody {
    fn complete(&mut self) {
        if let Some(p) = self.pool_return.take() {
            p.give_back();
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes_out += d.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.errored = true;
                // The upstream connection is broken: never pool it.
                this.pool_return = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.complete();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Status recorded for a request whose client went away before its response head (nginx's
/// 499, "client closed request").
const CLIENT_CLOSED: u16 = 499;

/// A request being handled: what [`Finish`] will hold, recorded with [`CLIENT_CLOSED`] if the
/// handling future is dropped (client disconnect, h2 RST_STREAM, shutdown cut) before it
/// produced a response.
struct Pending<'a> {
    /// Taken when the handling finishes (a `None` is never recorded twice). Boxed: the
    /// handling future, which holds this, is moved whole several times per request.
    rec: Option<Box<Record>>,
    guards: Vec<InflightGuard>,
    start: Instant,
    /// Borrowed: cloned only when a request is abandoned.
    metric_cache: &'a Arc<RouteMetricsCache>,
    access_log: bool,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let (true, Some(rec)) = (self.armed, self.rec.take()) else {
            return;
        };
        let rec = *rec;
        let status = StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
        Finish {
            rec,
            status,
            start: self.start,
            guards: std::mem::take(&mut self.guards),
            metric_cache: self.metric_cache.clone(),
            access_log: self.access_log,
        }
        .record(0, true);
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if !self.errored && self.inner.is_end_stream() {
            self.complete();
        }
        if let Some(f) = self.finish.take() {
            f.record(self.bytes_out, self.errored);
        }
    }
}

impl Finish {
    /// Count the request and write its access-log line; the concurrency slots go last. An
    /// upgraded request is counted now (its 101), and logged when its tunnel ends.
    fn record(mut self, bytes_out: u64, aborted: bool) {
        let tunnel = self.rec.tunnel.take();
        let f = self;
        let rec = &f.rec;
        let route_metrics = match &rec.route_metrics {
            Some(m) => m.clone(),
            // Answered before a backend was chosen (no route, redirect, limits, ...).
            None => f
                .metric_cache
                .get(rec.ingress.as_ref(), rec.service.as_ref()),
        };
        route_metrics.count(f.status, &rec.method);
        let elapsed = f.start.elapsed();
        route_metrics
            .request_duration
            .observe(elapsed.as_secs_f64());
        if f.access_log {
            match (tunnel, tokio::runtime::Handle::try_current()) {
                (Some(done), Ok(rt)) => {
                    let (rec, status, start) = (f.rec, f.status, f.start);
                    rt.spawn(async move {
                        // The tunnel task always answers, unless the runtime shuts down first.
                        let carried = done.await.unwrap_or_default();
                        let bytes_in = rec.bytes_in.load(Ordering::Relaxed) + carried.from_client;
                        access_line(&rec, status, start, bytes_in, carried.to_client, false);
                    });
                    drop(f.guards);
                    return;
                }
                _ => {
                    let bytes_in = rec.bytes_in.load(Ordering::Relaxed);
                    access_line(rec, f.status, f.start, bytes_in, bytes_out, aborted);
                }
            }
        }
        drop(f.guards);
    }
}

/// One access-log line (target `portico::access`).
fn access_line(
    rec: &Record,
    status: StatusCode,
    start: Instant,
    bytes_in: u64,
    bytes_out: u64,
    aborted: bool,
) {
    let (namespace, ingress) = (rec.namespace(), rec.ingress());
    let route = if ingress.is_empty() {
        String::new()
    } else {
        format!("{namespace}/{ingress}")
    };
    let upstream_addr = rec.upstream_addr.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        target: "portico::access",
        method = %rec.method,
        host = %rec.host,
        path = %rec.path,
        status = status.as_u16(),
        bytes_in,
        bytes_out,
        duration_ms = start.elapsed().as_millis() as u64,
        upstream_addr = %upstream_addr,
        upstream_ms = rec.upstream_ms.map(|m| m as u64),
        route = %route,
        request_id = %rec.request_id,
        aborted,
    );
}

/// Copy both directions of an upgraded connection until both ends close, an error occurs in
/// either direction (then both stop at once, as `tokio::io::copy_bidirectional` does: a reset
/// or cut client must not leave the tunnel waiting on a quiet upstream), or nothing moved in
/// either direction for `idle`.
async fn tunnel<A, B>(a: A, b: B, idle: Duration) -> TunnelBytes
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let base = Instant::now();
    let last = AtomicU64::new(0);
    let (from_a, from_b) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let copy = async {
        tokio::try_join!(
            copy_one(&mut ar, &mut bw, &last, base, &from_a),
            copy_one(&mut br, &mut aw, &last, base, &from_b)
        )
    };
    let watchdog = async {
        if idle.is_zero() {
            // --stream-idle-timeout 0s: no idle timeout.
            return std::future::pending().await;
        }
        loop {
            // An idle timeout past what the clock can represent never comes.
            let Some(deadline) = base
                .checked_add(Duration::from_millis(last.load(Ordering::Relaxed)))
                .and_then(|t| t.checked_add(idle))
            else {
                return std::future::pending().await;
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        _ = copy => {}
        _ = watchdog => tracing::debug!("upgraded stream idle, closing"),
    }
    TunnelBytes {
        from_client: from_a.load(Ordering::Relaxed),
        to_client: from_b.load(Ordering::Relaxed),
    }
}

/// One direction of [`tunnel`]: `Ok` at a clean end of `r` (passed on as a half-close of
/// `w`), `Err` at the first error.
async fn copy_one<R, W>(
    r: &mut R,
    w: &mut W,
    last: &AtomicU64,
    base: Instant,
    copied: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        // A TLS stream takes the bytes into its session and may send them only at its next
        // write or flush; the reader may then stay quiet for a long time, so push each chunk
        // out now (a no-op on plain TCP).
        w.flush().await?;
        copied.fetch_add(n as u64, Ordering::Relaxed);
        last.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A client whose reads fail (a reset or cut connection); writes go nowhere.
    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Err(std::io::ErrorKind::ConnectionAborted.into()))
        }
    }

    impl AsyncWrite for Broken {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// The client side buffers what is written until flushed, as a TLS stream does: what a
    /// quiet upstream sent last still reaches the client.
    #[tokio::test]
    async fn a_tunnel_flushes_what_it_wrote_to_a_buffering_client() {
        let (mut client, a) = tokio::io::duplex(64 * 1024);
        let (mut upstream, b) = tokio::io::duplex(64 * 1024);
        let t = tokio::spawn(tunnel(tokio::io::BufWriter::new(a), b, HOUR));
        upstream.write_all(b"last words").await.expect("write");
        let mut got = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("the bytes reached the client although the upstream went quiet")
            .expect("read");
        assert_eq!(&got, b"last words");
        t.abort();
    }

    /// An error on one side ends both directions, however quiet the other side is.
    #[tokio::test]
    async fn a_tunnel_ends_at_the_first_error() {
        let (_upstream, b) = tokio::io::duplex(64 * 1024);
        tokio::time::timeout(Duration::from_secs(10), tunnel(Broken, b, HOUR))
            .await
            .expect("the tunnel ended although the upstream stays open and quiet");
    }

    /// RFC 3986 §3.2 authorities without userinfo; anything else is a 400.
    #[test]
    fn authorities_follow_the_uri_grammar() {
        for ok in [
            "example.com",
            "example.com:8080",
            "x:",
            "1.2.3.4:443",
            "[::1]:80",
            "[2001:db8::1]",
            "a_b.example",
            "xn--bcher-kva.example",
            "a%41b",
        ] {
            assert!(valid_authority(ok), "{ok}");
        }
        for bad in [
            "", ":80", "user@x", "x:1:2", "x:port", "a{b}", "a|b", "a^b", "a b", "a/b", "a\"b",
            "[::1", "[::1]x", "[zz]", "[]", "a\\b",
        ] {
            assert!(!valid_authority(bad), "{bad}");
        }
    }

    fn req(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri).version(version);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).expect("request")
    }

    fn cfg() -> ProxyConfig {
        ProxyConfig::default()
    }

    #[test]
    fn transfer_codings() {
        let c = cfg();
        let te = |v: &str| {
            validate_head(
                &req(
                    Version::HTTP_11,
                    "/",
                    &[("host", "a"), ("transfer-encoding", v)],
                ),
                &c,
            )
            .err()
        };
        assert_eq!(te("chunked"), None);
        assert_eq!(te("gzip"), Some(ProxyError::UnsupportedTransferCoding));
        assert_eq!(
            te("gzip, chunked"),
            Some(ProxyError::UnsupportedTransferCoding)
        );
        assert_eq!(
            te("chunked, chunked"),
            Some(ProxyError::BadRequest("transfer_encoding"))
        );
        let both = req(
            Version::HTTP_11,
            "/",
            &[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("content-length", "3"),
            ],
        );
        assert_eq!(
            validate_head(&both, &c).err(),
            Some(ProxyError::BadRequest("cl_and_te"))
        );
    }

    #[test]
    fn connect_is_not_offered() {
        let r = Request::builder()
            .method(Method::CONNECT)
            .uri("x.example:443")
            .header("host", "x.example:443")
            .body(())
            .expect("request");
        assert_eq!(
            validate_head(&r, &cfg()).err(),
            Some(ProxyError::UnsupportedMethod)
        );
    }

    #[test]
    fn content_length_rules() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(content_length(&h), Ok(Some(5)));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(content_length(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("+5"));
        assert!(content_length(&h).is_err());
    }

    #[test]
    fn host_rules() {
        let c = cfg();
        let v = |r: Request<()>| validate_head(&r, &c);
        assert_eq!(
            v(req(Version::HTTP_11, "/", &[])).err(),
            Some(ProxyError::BadRequest("missing_host"))
        );
        assert!(v(req(Version::HTTP_10, "/", &[])).is_ok());
        assert_eq!(
            v(req(Version::HTTP_11, "/", &[("host", "u@a")])).err(),
            Some(ProxyError::BadRequest("invalid_host"))
        );
        assert_eq!(
            v(req(Version::HTTP_11, "/", &[("host", "a b")])).err(),
            Some(ProxyError::BadRequest("invalid_host"))
        );
        assert_eq!(
            v(req(Version::HTTP_11, "/", &[("host", "a"), ("host", "b")])).err(),
            Some(ProxyError::BadRequest("duplicate_host"))
        );
        let head = v(req(
            Version::HTTP_11,
            "http://Abs.Example:81/x",
            &[("host", "other")],
        ))
        .expect("ok");
        assert_eq!(head.authority, "Abs.Example:81");
        assert_eq!(head.host, "abs.example");
        assert_eq!(
            v(req(Version::HTTP_11, "http://u@abs/x", &[("host", "abs")])).err(),
            Some(ProxyError::BadRequest("invalid_host"))
        );
    }

    #[test]
    fn sizes() {
        let mut c = cfg();
        c.max_request_line = 10;
        assert_eq!(
            validate_head(&req(Version::HTTP_11, "/0123456789", &[("host", "a")]), &c).err(),
            Some(ProxyError::UriTooLong)
        );
        let mut c = cfg();
        c.max_header_bytes = 20;
        assert_eq!(
            validate_head(
                &req(
                    Version::HTTP_11,
                    "/",
                    &[("host", "a"), ("x-long", "0123456789")]
                ),
                &c
            )
            .err(),
            Some(ProxyError::HeadersTooLarge)
        );
        let mut c = cfg();
        c.max_headers = 2;
        let two = [("host", "a"), ("x-a", "1")];
        assert!(validate_head(&req(Version::HTTP_2, "/", &two), &c).is_ok());
        // h2's split cookies count as the one line HTTP/1.1 would send.
        let cookies = [
            ("host", "a"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("cookie", "c=3"),
        ];
        assert!(validate_head(&req(Version::HTTP_2, "/", &cookies), &c).is_ok());
        assert_eq!(
            validate_head(
                &req(
                    Version::HTTP_2,
                    "/",
                    &[("host", "a"), ("x-a", "1"), ("x-a", "2")]
                ),
                &c
            )
            .err(),
            Some(ProxyError::HeadersTooLarge)
        );
    }

    #[test]
    fn hop_by_hop_is_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn every_connection_field_names_what_is_stripped() {
        let message = || {
            let mut h = HeaderMap::new();
            h.append(
                header::CONNECTION,
                HeaderValue::from_static("Keep-Alive, Upgrade"),
            );
            h.append(header::CONNECTION, HeaderValue::from_static(" , x-one"));
            h.append(header::CONNECTION, HeaderValue::from_static("X-Two"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert("x-one", HeaderValue::from_static("1"));
            h.insert("x-two", HeaderValue::from_static("2"));
            h.insert("x-keep", HeaderValue::from_static("3"));
            h
        };
        let mut h = message();
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-keep"]);
        // On an upgrade the Upgrade field stays, though Connection names it.
        let mut h = message();
        strip_hop_by_hop(&mut h, true);
        let mut names: Vec<_> = h.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["upgrade", "x-keep"]);
        // Connection alone naming Keep-Alive, with no Keep-Alive field, leaves the rest.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("x-keep", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn request_ids_are_unique_and_sane() {
        let ids = RequestIds::new();
        let a = ids.generate();
        let b = ids.generate();
        assert_ne!(a, b);
        assert!(sane_request_id(&a));
        assert!(!sane_request_id(&HeaderValue::from_static("a b")));
        assert!(!sane_request_id(&HeaderValue::from_static("")));
        let long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(!sane_request_id(&HeaderValue::from_str(&long).expect("v")));
    }
}
