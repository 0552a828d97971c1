//! Talking to upstream endpoints: endpoint choice (round robin, least request, random,
//! consistent hash — brief §4.6), connection pools (HTTP/1.1 keep-alive and h2c), in-flight
//! counts, passive health (ejection), the active-health marks of [`super::health`], retry
//! budget and the retry loop.
//!
//! Owns: all state that outlives a snapshot swap on the upstream side, keyed by stable
//! identities ([`BackendKey`], endpoint address + protocol), never by snapshot indices. Must
//! not import kube, k8s-openapi, `publish` or the handler: it receives a [`Backend`] and a
//! [`RoutePolicy`] from the caller's one snapshot load.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::core::Collector;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::metrics::{Metrics, label, remove_series};
use crate::model::{Backend, BackendKey, LoadBalance, RoutePolicy, Snapshot, UpstreamProtocol};

use super::ProxyBody;
use super::balance::{self, Affinity};
use super::error::ProxyError;
use super::health::ActiveHealth;

/// Idle keep-alive connections kept per endpoint. Enough for the concurrency of a busy
/// endpoint: below the peak number of requests in flight to it, every burst closes the
/// surplus and the next one opens them again (a TCP handshake and a close per request
/// over the cap). nginx's `keepalive` and ingress-nginx's `upstream-keepalive-connections`
/// are in the same range (hundreds); unused ones leave after [`POOL_IDLE_TIMEOUT`].
pub const MAX_IDLE_PER_ENDPOINT: usize = 256;
/// Idle pooled connections older than this are dropped: 60 s, ingress-nginx's
/// `upstream-keepalive-timeout`, below nginx's own 75 s `keepalive_timeout` (a common app
/// server), so portico closes first. The brief sets no value. Servers that close idle
/// connections sooner (Node and uvicorn after 5 s) are usually found closed when taken and
/// skipped ([`STALE_CONNECTION_ALLOWANCE`]), but a close that crosses a request fails that
/// request (retried only when idempotent and bodiless).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pooled connections found closed at send time that may be skipped per request without
/// counting as a retry or an endpoint failure.
pub const STALE_CONNECTION_ALLOWANCE: u32 = 2;
/// How often the pool reaper runs.
pub const POOL_REAP_INTERVAL: Duration = Duration::from_secs(30);
/// Consecutive failures that eject an endpoint (brief §4.6).
pub const EJECT_AFTER_FAILURES: u32 = 5;
/// First ejection period; doubles on each ejection up to [`EJECT_MAX`].
pub const EJECT_BASE: Duration = Duration::from_secs(10);
/// Longest ejection.
pub const EJECT_MAX: Duration = Duration::from_secs(300);
/// Silence after which an upstream connection is probed ([`keep_alive`]).
pub const UPSTREAM_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between two keepalive probes.
pub const UPSTREAM_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the kernel closes the connection.
pub const UPSTREAM_KEEPALIVE_PROBES: u32 = 3;

/// Receive window of each stream on an h2c upstream connection (hyper's default: 2 MiB;
/// grpc-go starts at 64 KiB). The response data of a stream whose client reads slowly waits
/// in portico up to this much.
pub const UPSTREAM_H2_STREAM_WINDOW: u32 = 256 * 1024;
/// Receive window of a whole h2c upstream connection: the largest HTTP/2 allows. One
/// connection carries every client's requests to an endpoint, and data a stream received but
/// its client has not taken yet counts against this window as well as the stream's; were it
/// smaller than the stalled streams can hold (hyper's default is 5 MiB), a few clients that
/// stop reading would stall every other request to that endpoint. What portico holds is then
/// bounded per stream (this window), not per connection.
pub const UPSTREAM_H2_CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// How often an h2c connection's task re-reads the backend's stream limit when no request
/// made it run (see `Upstreams::connect`).
const H2_LIMIT_REFRESH: Duration = Duration::from_millis(250);
/// Pool map entries beyond this trigger a sweep of endpoints without idle connections.
const POOL_SWEEP_THRESHOLD: usize = 4096;
/// Health entries beyond this trigger a sweep of entries that carry no state.
const HEALTH_SWEEP_THRESHOLD: usize = 4096;
/// In-flight entries beyond this trigger a sweep of idle endpoints.
const INFLIGHT_SWEEP_THRESHOLD: usize = 4096;
/// Retries may add at most this fraction of requests (brief §4.6).
pub const RETRY_BUDGET_RATIO: f64 = 0.2;
/// ...but at least this many retries per second per backend are always allowed.
pub const RETRY_BUDGET_FLOOR_PER_SEC: f64 = 3.0;
/// Earned retries fade with this time constant (seconds): the budget tracks recent traffic,
/// so a backend that turns bad after a quiet spell does not meet a bank of retries (up to
/// 100) saved up long ago and get several times its load.
const RETRY_BUDGET_WINDOW_SECS: f64 = 10.0;
/// The earned retries are faded at most this often.
const FADE_STEP: Duration = Duration::from_millis(100);

/// Why a connection could not be obtained. Nothing was sent: always safe to retry.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

/// A connection ready for one request.
enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>, Arc<H2Stream>),
}

/// One h2c connection to an endpoint, shared by the requests in flight to it. A connection
/// carries at most as many streams as the backend's `SETTINGS_MAX_CONCURRENT_STREAMS` allows
/// (gRPC watch and streaming calls hold theirs for hours); requests beyond that go to
/// another connection to the same endpoint rather than queue behind them.
struct H2Conn {
    tx: http2::SendRequest<ProxyBody>,
    /// Its streams (see [`H2Stream`]).
    load: Arc<H2Load>,
    /// The backend's current `SETTINGS_MAX_CONCURRENT_STREAMS`, published by the connection
    /// task (hyper's default of 100 until the backend's SETTINGS arrive).
    limit: Arc<AtomicUsize>,
}

/// The streams portico has open on one h2c connection, and since when it has had none.
struct H2Load {
    open: AtomicUsize,
    /// When the connection was made: the clock [`Self::idle_since_ms`] counts from.
    base: Instant,
    /// Milliseconds after `base` when the last stream ended (or the connection was made).
    idle_since_ms: AtomicU64,
}

impl H2Load {
    /// No stream for [`POOL_IDLE_TIMEOUT`]: the reaper closes the connection.
    fn idle_expired(&self) -> bool {
        let idle_since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        self.open.load(Ordering::Acquire) == 0
            && self.base.elapsed().saturating_sub(idle_since) >= POOL_IDLE_TIMEOUT
    }
}

impl H2Conn {
    fn has_room(&self) -> bool {
        !self.tx.is_closed()
            && self.load.open.load(Ordering::Acquire) < self.limit.load(Ordering::Acquire)
    }

    fn stream(&mut self) -> (http2::SendRequest<ProxyBody>, Arc<H2Stream>) {
        self.load.open.fetch_add(1, Ordering::AcqRel);
        (self.tx.clone(), Arc::new(H2Stream(self.load.clone())))
    }
}

/// A request's stream on an [`H2Conn`], counted from the choice of the connection until both
/// its response body and its request body have ended, or the attempt failed: the stream is
/// then closed or reset. (A backend may finish its response while the client still streams
/// its request, as bidirectional gRPC may: the stream stays open, and counts, until then.)
/// Shared by the response's [`PoolReturn`] and the request body ([`HoldsStream`]).
struct H2Stream(Arc<H2Load>);

/// A request body that keeps its h2c stream counted until hyper has sent or dropped it.
struct HoldsStream {
    inner: ProxyBody,
    _stream: Arc<H2Stream>,
}

impl hyper::body::Body for HoldsStream {
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        let load = &self.0;
        if load.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ms = u64::try_from(load.base.elapsed().as_millis()).unwrap_or(u64::MAX);
            load.idle_since_ms.store(ms, Ordering::Release);
        }
    }
}

/// What the response body holds for its upstream until it ends: the request's in-flight slot
/// (least-request counts and the `portico_upstream_in_flight` gauge) and, on HTTP/1.1, the
/// keep-alive connection to return to the pool. Dropping it without
/// [`PoolReturn::give_back`] closes the connection (the right thing after an aborted body);
/// either way the in-flight slot is released.
pub struct PoolReturn {
    conn: Option<PooledConn>,
    _h2_stream: Option<Arc<H2Stream>>,
    _in_flight: InFlight,
}

struct PooledConn {
    pool: Arc<Pool>,
    addr: SocketAddr,
    tx: http1::SendRequest<ProxyBody>,
}

impl PoolReturn {
    /// The response finished cleanly: park the connection for reuse.
    pub fn give_back(self) {
        let PoolReturn {
            conn,
            _h2_stream,
            _in_flight,
        } = self;
        drop(_h2_stream);
        drop(_in_flight);
        let Some(mut c) = conn else {
            return;
        };
        if c.tx.is_ready() {
            c.pool.put(c.addr, c.tx);
            return;
        }
        if c.tx.is_closed() {
            return;
        }
        // hyper's dispatcher flips to ready right after the message ends; wait for it off the
        // request path. Outside a runtime (shutdown) the connection is simply dropped.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let ready = tokio::time::timeout(Duration::from_secs(5), c.tx.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                c.pool.put(c.addr, c.tx);
            }
        });
    }
}

/// One request in flight to one endpoint: counted per endpoint (least request) and per
/// backend (gauge) from the attempt until the response body ends or the attempt fails.
struct InFlight {
    endpoint: Arc<AtomicUsize>,
    gauge: prometheus::IntGauge,
}

impl InFlight {
    fn new(endpoint: Arc<AtomicUsize>, gauge: prometheus::IntGauge) -> InFlight {
        endpoint.fetch_add(1, Ordering::AcqRel);
        gauge.inc();
        InFlight { endpoint, gauge }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// How one request walks the endpoints, fixed when it starts so retries continue the same
/// walk (round robin from the request's cursor position, hashing down the key's ranking).
#[derive(Debug, Clone, Copy)]
enum Choice {
    RoundRobin(usize),
    LeastRequest,
    Random,
    Hash(u64),
}

/// Maps keyed by endpoint address or backend key, looked up several times per request. Their
/// keys come from our own snapshot (pod IPs, Service names), not from requests; foldhash
/// (randomly seeded per process) costs a fraction of std's SipHash (callgrind: ~9 SipHash
/// runs per request over these maps).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Idle keep-alive connections of one endpoint, with the time each was parked.
type IdleList = Vec<(http1::SendRequest<ProxyBody>, Instant)>;

#[derive(Default)]
struct Pool {
    /// One lock per endpoint so requests to different endpoints never contend.
    idle: RwLock<FastMap<SocketAddr, Arc<Mutex<IdleList>>>>,
    h2: Mutex<FastMap<SocketAddr, Vec<H2Conn>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves plain data behind;
    // keep serving rather than poisoning every later request.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

/// Read-mostly map of shared per-key state: the common case takes only the read lock.
fn shared<K, V>(map: &RwLock<FastMap<K, Arc<V>>>, key: &K, init: impl FnOnce() -> V) -> Arc<V>
where
    K: Eq + std::hash::Hash + Clone,
{
    if let Some(v) = read(map).get(key) {
        return v.clone();
    }
    write(map)
        .entry(key.clone())
        .or_insert_with(|| Arc::new(init()))
        .clone()
}

impl Pool {
    fn take_h1(&self, addr: SocketAddr) -> Option<http1::SendRequest<ProxyBody>> {
        let list = read(&self.idle).get(&addr)?.clone();
        let mut list = lock(&list);
        // Newest first (LIFO) keeps few connections warm; stale or closed ones are dropped.
        while let Some((tx, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE_TIMEOUT && tx.is_ready() && !tx.is_closed() {
                return Some(tx);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, tx: http1::SendRequest<ProxyBody>) {
        {
            let idle = read(&self.idle);
            if idle.len() > POOL_SWEEP_THRESHOLD {
                drop(idle);
                // Pod IPs churn: forget endpoints that have no idle connection left.
                write(&self.idle).retain(|_, l| !lock(l).is_empty());
            }
        }
        let list = shared(&self.idle, &addr, Mutex::default);
        let mut list = lock(&list);
        // Closed and expired entries are skipped by `take_h1` and swept by `reap`; only a
        // full list is swept here, so a return costs no walk over the idle connections.
        if list.len() >= MAX_IDLE_PER_ENDPOINT {
            list.retain(|(t, since)| !t.is_closed() && since.elapsed() < POOL_IDLE_TIMEOUT);
        }
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((tx, Instant::now()));
        }
    }

    /// Drop idle connections past [`POOL_IDLE_TIMEOUT`] or closed by the upstream, and forget
    /// endpoints left without any.
    fn reap(&self) {
        write(&self.idle).retain(|_, list| {
            let mut list = lock(list);
            list.retain(|(tx, since)| !tx.is_closed() && since.elapsed() < POOL_IDLE_TIMEOUT);
            !list.is_empty()
        });
        // An h2c connection without streams for the idle timeout is dropped: hyper then
        // closes it (GOAWAY). One with streams stays, however old.
        lock(&self.h2).retain(|_, conns| {
            conns.retain(|c| !c.tx.is_closed() && !c.load.idle_expired());
            !conns.is_empty()
        });
    }

    /// A stream on the first open h2c connection to `addr` with room for one more.
    fn take_h2(&self, addr: SocketAddr) -> Option<(http2::SendRequest<ProxyBody>, Arc<H2Stream>)> {
        let mut h2 = lock(&self.h2);
        let conns = h2.get_mut(&addr)?;
        conns.retain(|c| !c.tx.is_closed());
        let found = conns.iter_mut().find(|c| c.has_room()).map(H2Conn::stream);
        if conns.is_empty() {
            h2.remove(&addr);
        }
        found
    }

    /// Stop giving out streams on the connection whose streams `load` counts; the streams still
    /// running on it finish there.
    fn forget_h2(&self, addr: SocketAddr, load: &Arc<H2Load>) {
        let mut h2 = lock(&self.h2);
        if let Some(conns) = h2.get_mut(&addr) {
            conns.retain(|c| !Arc::ptr_eq(load, &c.load));
            if conns.is_empty() {
                h2.remove(&addr);
            }
        }
    }

    /// Pool a new connection and open this request's stream on it. A connection opened while
    /// another one gained room (several requests found every connection full at once) is not
    /// pooled: it carries its one request and closes, so a burst leaves no surplus behind.
    fn put_h2(
        &self,
        addr: SocketAddr,
        mut conn: H2Conn,
    ) -> (http2::SendRequest<ProxyBody>, Arc<H2Stream>) {
        let mut h2 = lock(&self.h2);
        let conns = h2.entry(addr).or_default();
        conns.retain(|c| !c.tx.is_closed());
        let stream = conn.stream();
        if !conns.iter().any(H2Conn::has_room) {
            conns.push(conn);
        }
        stream
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Health {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

impl Health {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }

    /// No ejection, or the last one ended [`EJECT_MAX`] ago: nothing worth keeping.
    fn forgotten(&self, now: Instant) -> bool {
        self.ejected_until
            .is_none_or(|t| now.saturating_duration_since(t) >= EJECT_MAX)
    }
}

/// The clock, read at most once and only when something asks: the health map is empty in the
/// common case (it holds only endpoints with recent trouble), and in a VM a clock read costs
/// about as much as a hashed map lookup.
#[derive(Default)]
struct LazyNow(Option<Instant>);

impl LazyNow {
    fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

#[derive(Debug, Clone, Copy)]
struct Budget {
    /// Earned by requests (RETRY_BUDGET_RATIO each), fading with RETRY_BUDGET_WINDOW_SECS: an
    /// exponentially weighted count of recent requests.
    ratio_tokens: f64,
    /// When `ratio_tokens` was last faded.
    faded: Instant,
    /// Refilled over time (RETRY_BUDGET_FLOOR_PER_SEC), capped at one second's worth.
    floor_tokens: f64,
    last: Instant,
}

impl Budget {
    /// Fade the earned tokens up to `now` (a time before the last fade fades nothing).
    fn fade(&mut self, now: Instant) {
        // In steps of at least FADE_STEP: the exponential then costs nothing measurable per
        // request, and the count still follows the last ~10 s closely.
        let dt = now.saturating_duration_since(self.faded);
        if dt >= FADE_STEP {
            self.ratio_tokens *= (-dt.as_secs_f64() / RETRY_BUDGET_WINDOW_SECS).exp();
            self.faded = now;
        }
    }
}

/// The outcome of forwarding: response headers from one endpoint.
pub struct Forwarded {
    pub response: Response<Incoming>,
    /// Endpoint that answered (access log).
    pub addr: SocketAddr,
    /// Time to response headers of the answering attempt.
    pub upstream_time: Duration,
    /// In-flight slot and (HTTP/1.1) keep-alive connection, for the response body to hold
    /// until it completes. Always `Some` from [`Upstreams::forward`].
    pub pool_return: Option<PoolReturn>,
}

/// What the caller hands over for one forwarded request. The URI is origin-form (path and
/// query, already normalised); `authority` is the Host the upstream should see.
pub struct OutboundRequest {
    pub method: Method,
    pub path_and_query: PathAndQuery,
    /// Empty when the client named no host (HTTP/1.0 without Host): HTTP/1.1 then sends an
    /// empty Host (RFC 9112 §3.2).
    pub authority: HeaderValue,
    pub headers: HeaderMap,
    /// `None`: the request has no body (it may be re-sent on another endpoint).
    pub body: Option<ProxyBody>,
    /// Set by the client-body wrapper; lets a send failure be blamed on the right side.
    pub body_flags: Arc<BodyFlags>,
}

/// What happened to the client's request body while it streamed upstream.
#[derive(Debug, Default)]
pub struct BodyFlags {
    /// The body crossed the route's limit (→ 413).
    pub limit_hit: AtomicBool,
    /// Reading the client's body failed (client went away mid-upload): not the upstream's
    /// fault, so no passive-health penalty.
    pub client_failed: AtomicBool,
    /// The whole body has been handed to the upstream connection: the upstream's read
    /// timeout runs from here (see [`BodyFlags::mark_sent`]).
    sent: AtomicBool,
    sent_signal: tokio::sync::Notify,
    /// Frames of the body handed upstream so far ([`BodyFlags::polled`]).
    frames: AtomicU64,
    /// The last poll of the body waited for the client (its pace, not the upstream's).
    awaiting_client: AtomicBool,
}

impl BodyFlags {
    /// The body's last frame went upstream. An upload slower than the read timeout is the
    /// client's pace, not the upstream failing to answer: the timeout waits for this (as
    /// nginx's `proxy_read_timeout` starts once the request is sent).
    pub fn mark_sent(&self) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            // A stored permit: a waiter arriving later returns at once.
            self.sent_signal.notify_one();
        }
    }

    /// Resolves once [`Self::mark_sent`] was called.
    async fn wait_sent(&self) {
        if !self.sent.load(Ordering::Acquire) {
            self.sent_signal.notified().await;
        }
    }

    /// One poll of the body: `Some(true)` a frame went upstream, `Some(false)` it waits for
    /// the client, `None` it ended or failed.
    pub fn polled(&self, frame: Option<bool>) {
        match frame {
            Some(true) => {
                self.frames.fetch_add(1, Ordering::Relaxed);
                self.awaiting_client.store(false, Ordering::Relaxed);
            }
            Some(false) => self.awaiting_client.store(true, Ordering::Relaxed),
            None => self.awaiting_client.store(false, Ordering::Relaxed),
        }
    }

    /// Resolves when the exchange has gone `timeout` without progress, saying whose fault:
    /// - the upstream answered nothing for `timeout` after the whole body was sent, or took no
    ///   body frame for `timeout` while the body waited for it (it stopped reading: nginx's
    ///   `proxy_send_timeout`) → [`Stalled::Upstream`];
    /// - the client sent no body frame for `timeout` (nginx's `client_body_timeout`, between
    ///   two reads) → [`Stalled::Client`].
    ///
    /// An upload slower than `timeout` in all, but never idle that long, trips neither.
    async fn read_timeout(&self, timeout: Duration) -> Stalled {
        let timeout = timeout.min(NEVER);
        loop {
            let before = self.frames.load(Ordering::Relaxed);
            tokio::select! {
                () = self.wait_sent() => break,
                () = tokio::time::sleep(timeout) => {}
            }
            if self.frames.load(Ordering::Relaxed) == before && !self.sent.load(Ordering::Acquire) {
                return if self.awaiting_client.load(Ordering::Relaxed) {
                    Stalled::Client
                } else {
                    Stalled::Upstream
                };
            }
        }
        tokio::time::sleep(timeout).await;
        Stalled::Upstream
    }

    /// The error to answer with when a send failed because of the client's body.
    fn client_error(&self) -> Option<ProxyError> {
        if self.limit_hit.load(Ordering::Acquire) {
            Some(ProxyError::BodyTooLarge)
        } else if self.client_failed.load(Ordering::Acquire) {
            Some(ProxyError::ClientBody)
        } else {
            None
        }
    }
}

/// Who left an exchange without progress for the read timeout ([`BodyFlags::read_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stalled {
    Upstream,
    Client,
}

/// Upstream state shared by every connection and worker thread; survives snapshot swaps.
pub struct Upstreams {
    cursors: Arc<RwLock<FastMap<BackendKey, Arc<AtomicUsize>>>>,
    pool: Arc<Pool>,
    /// Read on every pick, written only on failures (and the success after one).
    health: Arc<RwLock<FastMap<SocketAddr, Health>>>,
    budgets: Arc<RwLock<FastMap<BackendKey, Arc<Mutex<Budget>>>>>,
    /// Requests in flight per endpoint address (least request), across snapshots.
    in_flight: Arc<RwLock<FastMap<SocketAddr, Arc<AtomicUsize>>>>,
    /// Marks of the active health checker ([`super::health`]).
    active: Arc<ActiveHealth>,
    /// `--max-ejection-percent`.
    max_ejection_percent: u8,
    metrics: Arc<Metrics>,
}

/// The per-endpoint and per-backend state of [`Upstreams`] that outlives snapshots (passive
/// health, round-robin cursors, retry budgets, least-request counts): pruned on every
/// snapshot change by the active health checker's task, so it follows what is served.
pub struct RetainedState {
    cursors: Arc<RwLock<FastMap<BackendKey, Arc<AtomicUsize>>>>,
    health: Arc<RwLock<FastMap<SocketAddr, Health>>>,
    budgets: Arc<RwLock<FastMap<BackendKey, Arc<Mutex<Budget>>>>>,
    in_flight: Arc<RwLock<FastMap<SocketAddr, Arc<AtomicUsize>>>>,
}

impl RetainedState {
    /// Forget the state of endpoints and backends `snap` (the snapshot now serving; `None`:
    /// none) no longer has.
    ///
    /// - An endpoint that left loses its passive-health record (brief §4.6), ejection and
    ///   doubling history included: when its address comes back (the pod turned ready again,
    ///   or a new pod got it), Kubernetes says it is ready, and it starts afresh rather than
    ///   staying ejected for up to 300 s. The record is small (failed endpoints only), so it is
    ///   checked on every change.
    /// - Cursors, budgets and in-flight counters hold at most one entry per live backend or
    ///   endpoint, so they are swept only once they hold more than that (Services and pods
    ///   that come and go would otherwise grow them for ever). An in-flight counter a request
    ///   still holds stays.
    pub fn prune(&self, snap: Option<&Snapshot>) {
        let backends = snap.map_or(&[][..], |s| &s.backends.backends[..]);
        if !read(&self.health).is_empty() {
            let mut health = write(&self.health);
            let mut listed: HashSet<SocketAddr> = HashSet::with_capacity(health.len());
            for ep in backends.iter().flat_map(|b| b.endpoints.iter()) {
                if health.contains_key(&ep.addr) {
                    listed.insert(ep.addr);
                }
            }
            health.retain(|addr, _| listed.contains(addr));
        }
        let live_backends = backends.len();
        if read(&self.cursors).len() > live_backends || read(&self.budgets).len() > live_backends {
            let keys: HashSet<&BackendKey> = backends.iter().map(|b| &b.key).collect();
            write(&self.cursors).retain(|k, _| keys.contains(k));
            write(&self.budgets).retain(|k, _| keys.contains(k));
        }
        let live_endpoints: usize = backends.iter().map(|b| b.endpoints.len()).sum();
        if read(&self.in_flight).len() > live_endpoints {
            let addrs: HashSet<SocketAddr> = backends
                .iter()
                .flat_map(|b| b.endpoints.iter().map(|e| e.addr))
                .collect();
            write(&self.in_flight)
                .retain(|addr, n| addrs.contains(addr) || Arc::strong_count(n) > 1);
        }
    }
}

/// Remove the per-Service upstream series of Services `snap` (the snapshot now serving;
/// `None`: none) no longer routes to (`portico_upstream_connect_errors_total`,
/// `portico_upstream_retries_total`, and `portico_upstream_in_flight` once nothing is in
/// flight), so namespaces and Services that come and go (preview environments) do not grow
/// the exported series for ever; then [`prune_ejection_series`]. The active health checker's
/// task calls it on every snapshot change.
pub fn prune_upstream_series(snap: Option<&Snapshot>, metrics: &Metrics) {
    let services: HashSet<(&str, &str)> = snap
        .iter()
        .flat_map(|s| s.backends.backends.iter())
        .map(|b| (&*b.key.namespace, &*b.key.service))
        .collect();
    let gone =
        |l: &HashMap<&str, &str>| !services.contains(&(label(l, "namespace"), label(l, "service")));
    remove_series(&metrics.upstream_connect_errors, |l, _| gone(l));
    remove_series(&metrics.upstream_retries, |l, _| gone(l));
    // Requests still in flight hold the handle; the series goes at a later change.
    remove_series(&metrics.upstream_in_flight, |l, m| {
        gone(l) && m.get_gauge().get_value() == 0.0
    });
    prune_ejection_series(snap, metrics);
}

/// Remove the `portico_upstream_ejections_total` series whose endpoint `snap` (the snapshot
/// now serving; `None`: none) no longer lists under their Service. Pod IPs churn, so without
/// this the label values would grow with every pod that ever failed. The series are read from
/// the counter vector itself (only ejected endpoints have one): nothing to do when none was
/// ever ejected, and only their Services' endpoints are looked at.
fn prune_ejection_series(snap: Option<&Snapshot>, metrics: &Metrics) {
    let families = metrics.upstream_ejections.collect();
    let made: Vec<[&str; 3]> = families
        .iter()
        .flat_map(|f| f.get_metric().iter())
        .map(|m| {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map_or("", |l| l.value())
            };
            [label("namespace"), label("service"), label("endpoint")]
        })
        .collect();
    if made.is_empty() {
        return;
    }
    let services: HashSet<(&str, &str)> = made.iter().map(|[ns, svc, _]| (*ns, *svc)).collect();
    let mut present: HashSet<(&str, &str, SocketAddr)> = HashSet::new();
    for b in snap.iter().flat_map(|s| s.backends.backends.iter()) {
        let service = (&*b.key.namespace, &*b.key.service);
        if services.contains(&service) {
            present.extend(b.endpoints.iter().map(|e| (service.0, service.1, e.addr)));
        }
    }
    for labels @ [ns, svc, endpoint] in made {
        let listed = endpoint
            .parse::<SocketAddr>()
            .is_ok_and(|addr| present.contains(&(ns, svc, addr)));
        if !listed {
            let _ = metrics.upstream_ejections.remove_label_values(&labels);
        }
    }
}

/// TCP keepalive of upstream connections: probed after [`UPSTREAM_KEEPALIVE_IDLE`] without
/// traffic, every [`UPSTREAM_KEEPALIVE_INTERVAL`], given up after
/// [`UPSTREAM_KEEPALIVE_PROBES`] unanswered. An upstream whose host died without a FIN or RST
/// (its node gone, a NAT entry dropped) is then noticed by the kernel within about a minute
/// of silence: its pooled connections close, and a response it was streaming (a gRPC watch,
/// an event stream) fails instead of waiting out the stream idle timeout, an hour. The kernel
/// does it without any frame a server could object to: gRPC servers answer HTTP/2 PINGs more
/// frequent than every 5 minutes with GOAWAY "too_many_pings". The probes also keep NAT and
/// load-balancer idle timers from dropping quiet connections. Best effort: a socket that
/// refuses the options is used as it is.
fn keep_alive(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(UPSTREAM_KEEPALIVE_IDLE)
        .with_interval(UPSTREAM_KEEPALIVE_INTERVAL)
        .with_retries(UPSTREAM_KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on an upstream connection");
    }
}

/// An h2c upstream reset the stream with REFUSED_STREAM: it never processed the request.
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

/// RFC 9110 §9.2.2 idempotent methods (CONNECT/POST/PATCH are not).
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl Upstreams {
    /// Inside a tokio runtime this also starts the pool reaper, which ends when the
    /// `Upstreams` is dropped; outside one, idle connections are only expired lazily.
    pub fn new(metrics: Arc<Metrics>, max_ejection_percent: u8) -> Upstreams {
        let pool = Arc::new(Pool::default());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(POOL_REAP_INTERVAL);
                tick.tick().await;
                // Bounded by the pool's lifetime.
                loop {
                    tick.tick().await;
                    let Some(pool) = weak.upgrade() else {
                        break;
                    };
                    pool.reap();
                }
            });
        }
        Upstreams {
            cursors: Arc::default(),
            pool,
            health: Arc::default(),
            budgets: Arc::default(),
            in_flight: Arc::default(),
            active: Arc::new(ActiveHealth::default()),
            max_ejection_percent: max_ejection_percent.min(100),
            metrics,
        }
    }

    /// The marks the active health checker writes and endpoint choice reads.
    pub fn active_health(&self) -> Arc<ActiveHealth> {
        self.active.clone()
    }

    /// The state kept per endpoint and per backend across snapshots, for
    /// [`RetainedState::prune`].
    pub fn retained_state(&self) -> RetainedState {
        RetainedState {
            cursors: self.cursors.clone(),
            health: self.health.clone(),
            budgets: self.budgets.clone(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// Requests in flight to `addr` now (tests, admin).
    pub fn endpoint_in_flight(&self, addr: SocketAddr) -> usize {
        read(&self.in_flight)
            .get(&addr)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    fn in_flight_counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        {
            let map = read(&self.in_flight);
            if let Some(c) = map.get(&addr) {
                return c.clone();
            }
            if map.len() > INFLIGHT_SWEEP_THRESHOLD {
                drop(map);
                // Pod IPs churn: forget endpoints with nothing in flight and no holder.
                write(&self.in_flight)
                    .retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Acquire) > 0);
            }
        }
        shared(&self.in_flight, &addr, AtomicUsize::default)
    }

    fn choice(&self, backend: &Backend, policy: &RoutePolicy, affinity: &Affinity) -> Choice {
        match (&policy.load_balance, affinity.key) {
            (LoadBalance::LeastRequest, _) => Choice::LeastRequest,
            (LoadBalance::Random, _) => Choice::Random,
            (LoadBalance::ConsistentHash(_), Some(k)) => Choice::Hash(k),
            // Round robin, and a hashing route whose caller gave no key.
            _ => Choice::RoundRobin(self.cursor(&backend.key).fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// An endpoint selection may use: not tried by this request, not ejected by passive
    /// health, not marked down by the backend's active check.
    fn usable(
        &self,
        backend: &Backend,
        addr: SocketAddr,
        health: &FastMap<SocketAddr, Health>,
        now: &mut LazyNow,
    ) -> bool {
        if health.get(&addr).is_some_and(|h| h.is_ejected(now.get())) {
            return false;
        }
        match &backend.health_check {
            Some(check) => !self.active.is_down(addr, check),
            None => true,
        }
    }

    /// Pick the next endpoint for a request. Endpoints already tried are never picked again;
    /// ejected or actively-down ones are skipped. When every endpoint of the backend is
    /// ejected or down, selection ignores health and picks among the untried ones ("panic
    /// mode", as Envoy does): serving from possibly-bad endpoints beats a certain 503, and
    /// Kubernetes readiness already vouched for them. A retry after the usable endpoints were
    /// tried gets nothing: health marks protect retries too.
    fn pick(&self, backend: &Backend, choice: Choice, tried: &[SocketAddr]) -> Option<SocketAddr> {
        if let Choice::RoundRobin(start) = choice {
            return self.pick_round_robin(backend, start, tried);
        }
        let mut now = LazyNow::default();
        let untried: Vec<SocketAddr> = backend
            .endpoints
            .iter()
            .map(|e| e.addr)
            .filter(|a| !tried.contains(a))
            .collect();
        let usable: Vec<SocketAddr> = {
            let health = read(&self.health);
            untried
                .iter()
                .copied()
                .filter(|a| self.usable(backend, *a, &health, &mut now))
                .collect()
        };
        if usable.is_empty() && self.any_usable(backend, tried, &mut now) {
            return None;
        }
        let candidates = if usable.is_empty() { &untried } else { &usable };
        match choice {
            Choice::LeastRequest => balance::p2c(candidates, |a| self.endpoint_in_flight(a)),
            Choice::Random => balance::random(candidates),
            Choice::Hash(key) => balance::rendezvous(key, candidates),
            Choice::RoundRobin(_) => None,
        }
    }

    fn cursor(&self, key: &BackendKey) -> Arc<AtomicUsize> {
        shared(&self.cursors, key, AtomicUsize::default)
    }

    /// Round robin over the backend's endpoints, skipping ones already tried for this request
    /// and, when possible, ejected or down ones (else the first untried one: panic mode).
    ///
    /// The cursor advances once per request (`start`), not per attempt: a retry walks on from
    /// the request's own position, so a failing endpoint does not shift the rotation. When the
    /// cursor's endpoint cannot take the request, the walk goes on from an offset that turns
    /// with every round of the cursor, so the skipped endpoint's share spreads over all the
    /// others instead of doubling its next neighbour's (endpoints are in address order, and a
    /// node's pods, which often fail together, are neighbours there).
    fn pick_round_robin(
        &self,
        backend: &Backend,
        start: usize,
        tried: &[SocketAddr],
    ) -> Option<SocketAddr> {
        let eps = &backend.endpoints;
        let n = eps.len();
        if n == 0 {
            return None;
        }
        let mut now = LazyNow::default();
        let health = read(&self.health);
        let first = start % n;
        let turn = (start / n) % n.saturating_sub(1).max(1);
        let others = (0..n - 1).map(|j| (first + 1 + (turn + j) % (n - 1)) % n);
        let mut fallback = None;
        for i in std::iter::once(first).chain(others) {
            let addr = eps[i].addr;
            if tried.contains(&addr) {
                continue;
            }
            if !self.usable(backend, addr, &health, &mut now) {
                fallback.get_or_insert(addr);
                continue;
            }
            return Some(addr);
        }
        drop(health);
        fallback.filter(|_| !self.any_usable(backend, tried, &mut now))
    }

    /// True when one of `tried` is usable: the backend is not in panic mode, so an untried
    /// ejected or down endpoint is no retry target.
    fn any_usable(&self, backend: &Backend, tried: &[SocketAddr], now: &mut LazyNow) -> bool {
        let health = read(&self.health);
        tried.iter().any(|a| self.usable(backend, *a, &health, now))
    }

    /// Cheap upper bound of [`Upstreams::has_retry_target`] (no health lookups), for the
    /// request path's decision to keep a copy of the headers.
    fn has_untried(backend: &Backend, tried: &[SocketAddr]) -> bool {
        backend.endpoints.iter().any(|e| !tried.contains(&e.addr))
    }

    /// True when [`Upstreams::pick`] would find an endpoint for another attempt.
    fn has_retry_target(&self, backend: &Backend, tried: &[SocketAddr]) -> bool {
        if !Self::has_untried(backend, tried) {
            return false;
        }
        let mut now = LazyNow::default();
        let health = read(&self.health);
        backend
            .endpoints
            .iter()
            .any(|e| !tried.contains(&e.addr) && self.usable(backend, e.addr, &health, &mut now))
            || {
                drop(health);
                !self.any_usable(backend, tried, &mut now)
            }
    }

    /// A success resets the failure count. The ejection history stays until the endpoint has
    /// been back for [`EJECT_MAX`] without another ejection: a flapping endpoint that answers
    /// now and then still backs off longer each time (brief §4.6: "doubling up to 5 min"),
    /// instead of starting again at 10 s after every lucky request.
    fn record_success(&self, addr: SocketAddr) {
        // A healthy endpoint needs no entry: the map only holds endpoints with recent trouble,
        // so pod-IP churn cannot grow it without bound. The common case is a read lock.
        let mut now = LazyNow::default();
        if read(&self.health).get(&addr).is_none_or(|h| {
            h.is_ejected(now.get()) || (h.consecutive_failures == 0 && !h.forgotten(now.get()))
        }) {
            return;
        }
        let mut health = write(&self.health);
        let now = now.get();
        match health.get_mut(&addr) {
            Some(h) if h.is_ejected(now) => {}
            Some(h) if h.forgotten(now) => {
                health.remove(&addr);
            }
            Some(h) => h.consecutive_failures = 0,
            None => {}
        }
    }

    /// Passive health (brief §4.6): eject after consecutive failures, doubling the period,
    /// never more than `--max-ejection-percent` (default 50%) of the backend's endpoints at
    /// once (rounded down: a single endpoint is never ejected at 50%).
    fn record_failure(&self, backend: &Backend, addr: SocketAddr) {
        let now = Instant::now();
        let mut health = write(&self.health);
        if health.len() > HEALTH_SWEEP_THRESHOLD {
            health.retain(|_, h| h.is_ejected(now) || h.consecutive_failures > 0);
        }
        let ejected_now = backend
            .endpoints
            .iter()
            .filter(|e| health.get(&e.addr).is_some_and(|h| h.is_ejected(now)))
            .count();
        let h = health.entry(addr).or_default();
        if h.is_ejected(now) {
            return;
        }
        h.consecutive_failures += 1;
        let allowed = (ejected_now + 1) * 100
            <= backend.endpoints.len() * usize::from(self.max_ejection_percent);
        if h.consecutive_failures >= EJECT_AFTER_FAILURES && allowed {
            let factor = 1u32.checked_shl(h.ejections).unwrap_or(u32::MAX);
            let period = EJECT_BASE.saturating_mul(factor).min(EJECT_MAX);
            h.ejected_until = Some(now + period);
            h.ejections = h.ejections.saturating_add(1);
            h.consecutive_failures = 0;
            tracing::warn!(endpoint = %addr, backend = %backend.key, secs = period.as_secs(), "endpoint ejected");
            self.metrics
                .upstream_ejections
                .with_label_values(&[
                    &*backend.key.namespace,
                    &*backend.key.service,
                    &addr.to_string(),
                ])
                .inc();
        }
    }

    /// Idle keep-alive HTTP/1.1 connections pooled for `addr` (tests, admin).
    pub fn idle_connections(&self, addr: SocketAddr) -> usize {
        read(&self.pool.idle)
            .get(&addr)
            .map_or(0, |l| lock(l).len())
    }

    /// True when `addr` is ejected now (tests, admin).
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        read(&self.health)
            .get(&addr)
            .is_some_and(|h| h.is_ejected(Instant::now()))
    }

    fn budget(&self, key: &BackendKey) -> Arc<Mutex<Budget>> {
        shared(&self.budgets, key, || {
            let now = Instant::now();
            Mutex::new(Budget {
                ratio_tokens: 0.0,
                faded: now,
                floor_tokens: RETRY_BUDGET_FLOOR_PER_SEC,
                last: now,
            })
        })
    }

    fn budget_deposit(&self, key: &BackendKey, now: Instant) {
        let b = self.budget(key);
        let mut e = lock(&b);
        e.fade(now);
        // Cap what a busy period can bank so a burst of retries stays bounded.
        e.ratio_tokens = (e.ratio_tokens + RETRY_BUDGET_RATIO).min(100.0);
    }

    fn budget_withdraw(&self, key: &BackendKey) -> bool {
        let now = Instant::now();
        let b = self.budget(key);
        let mut e = lock(&b);
        let elapsed = now.saturating_duration_since(e.last).as_secs_f64();
        e.last = now;
        e.floor_tokens =
            (e.floor_tokens + elapsed * RETRY_BUDGET_FLOOR_PER_SEC).min(RETRY_BUDGET_FLOOR_PER_SEC);
        e.fade(now);
        if e.floor_tokens >= 1.0 {
            e.floor_tokens -= 1.0;
            true
        } else if e.ratio_tokens >= 1.0 {
            e.ratio_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        proto: UpstreamProtocol,
        connect_timeout: Duration,
    ) -> Result<(Sender, bool), ConnectError> {
        match proto {
            UpstreamProtocol::Http1 => {
                if let Some(tx) = self.pool.take_h1(addr) {
                    return Ok((Sender::H1(tx), true));
                }
            }
            UpstreamProtocol::H2c => {
                if let Some((tx, stream)) = self.pool.take_h2(addr) {
                    return Ok((Sender::H2(tx, stream), true));
                }
            }
        }
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout)??;
        // Small request/response writes must not wait for Nagle.
        stream.set_nodelay(true)?;
        keep_alive(&stream);
        let io = TokioIo::new(stream);
        match proto {
            UpstreamProtocol::Http1 => {
                let (tx, conn) = tokio::time::timeout(connect_timeout, http1::handshake(io))
                    .await
                    .map_err(|_| ConnectError::Timeout)??;
                tokio::spawn(async move {
                    // Upgrades enabled so WebSocket 101s can take the connection over.
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(error = %e, "upstream h1 connection ended");
                    }
                });
                Ok((Sender::H1(tx), false))
            }
            UpstreamProtocol::H2c => {
                let handshake = http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(UPSTREAM_H2_STREAM_WINDOW)
                    .initial_connection_window_size(UPSTREAM_H2_CONNECTION_WINDOW)
                    .handshake(io);
                let (tx, mut conn) = tokio::time::timeout(connect_timeout, handshake)
                    .await
                    .map_err(|_| ConnectError::Timeout)??;
                let limit = Arc::new(AtomicUsize::new(conn.current_max_send_streams()));
                let published = limit.clone();
                tokio::spawn(async move {
                    // The backend's stream limit arrives (and may change) in SETTINGS frames,
                    // which hyper's own connection task handles; this task (hyper's dispatch)
                    // can only read it. It runs when a request is dispatched, and on a tick,
                    // so a limit that arrived while nothing was sent is seen within a tick.
                    let mut tick = tokio::time::interval(H2_LIMIT_REFRESH);
                    let ended = std::future::poll_fn(|cx| {
                        let polled = std::pin::Pin::new(&mut conn).poll(cx);
                        while tick.poll_tick(cx).is_ready() {}
                        published.store(conn.current_max_send_streams(), Ordering::Release);
                        polled
                    })
                    .await;
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "upstream h2c connection ended");
                    }
                });
                let conn = H2Conn {
                    tx,
                    load: Arc::new(H2Load {
                        open: AtomicUsize::new(0),
                        base: Instant::now(),
                        idle_since_ms: AtomicU64::new(0),
                    }),
                    limit,
                };
                let (tx, stream) = self.pool.put_h2(addr, conn);
                Ok((Sender::H2(tx, stream), false))
            }
        }
    }

    /// Forward one request to `backend` with retries (brief §4.4 "Retries"):
    /// - a failed connect (or a pooled connection that closed before the request was
    ///   written) moves to another endpoint for every method: nothing reached the upstream;
    /// - an idempotent request without a body is also retried after a reset before response
    ///   headers and on a 502/503/504 response, within the retry budget;
    /// - at most `max_retries` retries; the last upstream response passes through unchanged.
    ///
    /// Endpoints are chosen by the route's `load_balance`, with `affinity` (from the handler)
    /// as the consistent-hash key; the returned [`PoolReturn`] holds the request's in-flight
    /// slot until the response body ends.
    pub async fn forward(
        &self,
        backend: &Backend,
        policy: &RoutePolicy,
        mut req: OutboundRequest,
        max_retries: u32,
        affinity: &Affinity,
    ) -> Result<Forwarded, ProxyError> {
        let labels = [&*backend.key.namespace, &*backend.key.service];
        let has_body = req.body.is_some();
        let replayable = !has_body && is_idempotent(&req.method);
        // Earned when the first attempt goes out, with the clock read that times it.
        let mut deposited = false;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_err = ProxyError::NoEndpoints;
        let mut attempt: u32 = 0;
        let mut stale_allowance: u32 = STALE_CONNECTION_ALLOWANCE;
        // The attempt is the last one sent again (stale connection, refused stream), not a
        // retry: it is counted once.
        let mut resend = false;
        let choice = self.choice(backend, policy, affinity);
        let in_flight_gauge = self.metrics.upstream_in_flight.with_label_values(&labels);
        loop {
            if attempt > max_retries {
                return Err(last_err);
            }
            let Some(addr) = self.pick(backend, choice, &tried) else {
                return Err(last_err);
            };
            tried.push(addr);
            let in_flight = InFlight::new(self.in_flight_counter(addr), in_flight_gauge.clone());
            if attempt > 0 && !resend {
                self.metrics
                    .upstream_retries
                    .with_label_values(&labels)
                    .inc();
            }
            resend = false;
            attempt += 1;

            let (sender, reused) = match self
                .connect(addr, policy.upstream_protocol, policy.connect_timeout)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(endpoint = %addr, error = %e, "upstream connect failed");
                    self.metrics
                        .upstream_connect_errors
                        .with_label_values(&labels)
                        .inc();
                    self.record_failure(backend, addr);
                    last_err = ProxyError::UpstreamConnect;
                    continue;
                }
            };

            let body = req.body.take().unwrap_or_else(super::error::empty_body);
            let body = match &sender {
                Sender::H2(_, stream) if has_body => http_body_util::BodyExt::boxed(HoldsStream {
                    inner: body,
                    _stream: stream.clone(),
                }),
                _ => body,
            };
            // The header map moves into the request unless a later attempt may need it again
            // (a bodyless idempotent request that can still be retried on another endpoint,
            // or a bodyless h2c one its stream could be refused for): copying it for every
            // request cost several allocations each.
            let resendable = !has_body && stale_allowance > 0 && matches!(sender, Sender::H2(..));
            let keep_headers = resendable
                || (replayable && attempt <= max_retries && Self::has_untried(backend, &tried));
            let headers = if keep_headers {
                req.headers.clone()
            } else {
                std::mem::take(&mut req.headers)
            };
            let built = build_request(&req, headers, &sender, addr, body);
            // Which h2c connection this attempt uses, to stop sharing it if it times out.
            let h2_conn = match &sender {
                Sender::H2(_, stream) => Some(stream.0.clone()),
                Sender::H1(_) => None,
            };
            let started = Instant::now();
            if !deposited {
                deposited = true;
                self.budget_deposit(&backend.key, started);
            }
            let sent = if has_body {
                // The timeout runs from the end of the upload, however long that takes, as
                // long as the upstream keeps taking it (BodyFlags::read_timeout).
                tokio::select! {
                    biased;
                    r = send(sender, built) => Ok(r),
                    who = req.body_flags.read_timeout(policy.read_timeout) => Err(who),
                }
            } else {
                tokio::time::timeout_at(deadline(started, policy.read_timeout), send(sender, built))
                    .await
                    .map_err(|_| Stalled::Upstream)
            };
            let upstream_time = started.elapsed();
            match sent {
                // The client stopped sending its body: not the upstream's fault.
                Err(Stalled::Client) => return Err(ProxyError::ClientBodyTimeout),
                Err(Stalled::Upstream) => {
                    self.record_failure(backend, addr);
                    if let Some(conn) = &h2_conn {
                        // The h2c connection may be dead without knowing it (a peer gone
                        // without a FIN or RST, a NAT entry dropped): later requests go to
                        // another one. Streams still running on this one finish on it.
                        self.pool.forget_h2(addr, conn);
                    }
                    return Err(ProxyError::UpstreamTimeout);
                }
                Ok(Err(SendFailure::NotSent(back))) => {
                    // Never written: as safe as a connect failure, body included.
                    if let Some(e) = req.body_flags.client_error() {
                        return Err(e);
                    }
                    let (parts, body) = back.into_parts();
                    // The map may have moved into the request: take it back (with the Host
                    // header set or removed for this sender, which the next build redoes).
                    req.headers = parts.headers;
                    req.body = Some(body);
                    if reused && stale_allowance > 0 {
                        // A pooled keep-alive connection the upstream closed while idle is
                        // routine, not an endpoint failure: try the same endpoint again on
                        // another connection without spending a retry (bounded).
                        stale_allowance -= 1;
                        tried.pop();
                        attempt -= 1;
                        resend = true;
                        continue;
                    }
                    self.record_failure(backend, addr);
                    last_err = ProxyError::UpstreamConnect;
                    continue;
                }
                Ok(Err(SendFailure::Failed(e))) => {
                    if let Some(e) = req.body_flags.client_error() {
                        return Err(e);
                    }
                    if refused_stream(&e) {
                        // Closed before any processing (RFC 9113 §8.7): the endpoint is at its
                        // stream limit or going away, not failing, and the request may be sent
                        // again, whatever its method, when it had no body (bounded, on
                        // another stream of the same endpoint, without spending a retry).
                        tracing::debug!(endpoint = %addr, "upstream refused the stream");
                        last_err = ProxyError::UpstreamReset;
                        if resendable {
                            stale_allowance -= 1;
                            tried.pop();
                            attempt -= 1;
                            resend = true;
                            continue;
                        }
                        return Err(last_err);
                    }
                    tracing::debug!(endpoint = %addr, error = %e, "upstream failed before response headers");
                    self.record_failure(backend, addr);
                    last_err = ProxyError::UpstreamReset;
                    if replayable
                        && attempt <= max_retries
                        && self.has_retry_target(backend, &tried)
                        && self.budget_withdraw(&backend.key)
                    {
                        continue;
                    }
                    return Err(last_err);
                }
                Ok(Ok((response, pool_return, h2_stream))) => {
                    let status = response.status();
                    if matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    ) {
                        self.record_failure(backend, addr);
                        if replayable
                            && attempt <= max_retries
                            && self.has_retry_target(backend, &tried)
                            && self.budget_withdraw(&backend.key)
                        {
                            // The response is dropped unread, so its connection closes.
                            continue;
                        }
                    } else {
                        self.record_success(addr);
                    }
                    return Ok(Forwarded {
                        response,
                        addr,
                        upstream_time,
                        pool_return: Some(PoolReturn {
                            conn: pool_return.map(|tx| PooledConn {
                                pool: self.pool.clone(),
                                addr,
                                tx,
                            }),
                            _h2_stream: h2_stream,
                            _in_flight: in_flight,
                        }),
                    });
                }
            }
        }
    }
}

/// `after` past `from`, a clock reading the caller already took (`tokio::time::timeout` would
/// read the clock again). Capped at 30 years, tokio's own "never", so a huge
/// `proxy-read-timeout` cannot overflow the addition.
fn deadline(from: Instant, after: Duration) -> Instant {
    from + after.min(NEVER)
}

/// tokio's own "never" (30 years): longer timeouts are capped to it, so a huge
/// `proxy-read-timeout` cannot overflow an addition.
const NEVER: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

fn build_request(
    req: &OutboundRequest,
    headers: HeaderMap,
    sender: &Sender,
    addr: SocketAddr,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let mut out = Request::new(body);
    *out.method_mut() = req.method.clone();
    *out.headers_mut() = headers;
    match sender {
        Sender::H1(_) => {
            *out.version_mut() = Version::HTTP_11;
            *out.uri_mut() = Uri::from(req.path_and_query.clone());
            out.headers_mut()
                .insert(http::header::HOST, req.authority.clone());
            // A body of unknown length (chunked from an h1 client, DATA without content-length
            // from h2) goes chunked; left to itself, hyper's client sends a GET or HEAD whose
            // length it does not know with no body at all.
            if !hyper::body::Body::is_end_stream(out.body())
                && hyper::body::Body::size_hint(out.body()).exact().is_none()
                && !out.headers().contains_key(http::header::CONTENT_LENGTH)
            {
                out.headers_mut().insert(
                    http::header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
        }
        Sender::H2(..) => {
            // h2 carries the authority in `:authority` (RFC 9113 §8.3.1); no Host header.
            *out.version_mut() = Version::HTTP_2;
            out.headers_mut().remove(http::header::HOST);
            // The authority was validated with the request (a client's Host that is no URI
            // authority is a 400); the endpoint's address stands in only if it is missing. The
            // path and scheme are never lost to a fallback.
            let uri = |authority: &str| {
                Uri::builder()
                    .scheme("http")
                    .authority(authority)
                    .path_and_query(req.path_and_query.clone())
                    .build()
            };
            let given = req.authority.to_str().ok().filter(|a| !a.is_empty());
            *out.uri_mut() = given
                .map(uri)
                .and_then(Result::ok)
                .or_else(|| uri(&addr.to_string()).ok())
                .unwrap_or_else(|| Uri::from(req.path_and_query.clone()));
        }
    }
    out
}

/// Cookie fields an h2 client split over several lines (RFC 9113 §8.2.3) MUST be joined
/// with `"; "` before an HTTP/1.1 hop, which allows one Cookie header (RFC 6265 §5.4); several
/// lines would be folded with `", "` by some backends, or all but one dropped. The handler
/// calls it for h2 requests to HTTP/1.1 upstreams only.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut lines = headers.get_all(http::header::COOKIE).iter();
    if lines.next().is_none() || lines.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for line in headers.get_all(http::header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(line.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(http::header::COOKIE, v);
    }
}

enum SendFailure {
    /// The request was never written; it comes back for another attempt.
    NotSent(Box<Request<ProxyBody>>),
    Failed(hyper::Error),
}

/// The response, with what must live until its body ends: the HTTP/1.1 connection to pool
/// again, or the h2c stream's place in its connection's count.
type SendOk = (
    Response<Incoming>,
    Option<http1::SendRequest<ProxyBody>>,
    Option<Arc<H2Stream>>,
);

async fn send(sender: Sender, req: Request<ProxyBody>) -> Result<SendOk, SendFailure> {
    match sender {
        Sender::H1(mut tx) => {
            if tx.ready().await.is_err() {
                return Err(SendFailure::NotSent(Box::new(req)));
            }
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    // A 101 hands the connection to the upgrade; it never returns to the pool.
                    let keep = resp.status() != StatusCode::SWITCHING_PROTOCOLS;
                    Ok((resp, keep.then_some(tx), None))
                }
                Err(mut e) => match e.take_message() {
                    Some(req) => Err(SendFailure::NotSent(Box::new(req))),
                    None => Err(SendFailure::Failed(e.into_error())),
                },
            }
        }
        Sender::H2(mut tx, stream) => {
            if tx.ready().await.is_err() {
                return Err(SendFailure::NotSent(Box::new(req)));
            }
            match tx.try_send_request(req).await {
                Ok(resp) => Ok((resp, None, Some(stream))),
                Err(mut e) => match e.take_message() {
                    Some(req) => Err(SendFailure::NotSent(Box::new(req))),
                    None => Err(SendFailure::Failed(e.into_error())),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServicePortRef};
    use crate::proxy::DEFAULT_MAX_EJECTION_PERCENT;

    /// Upstream sockets carry TCP keepalive with portico's timings.
    #[tokio::test]
    async fn upstream_sockets_probe_a_silent_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let sock = socket2::SockRef::from(&stream);
        assert!(!sock.keepalive().expect("SO_KEEPALIVE"));
        keep_alive(&stream);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            UPSTREAM_KEEPALIVE_IDLE
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            UPSTREAM_KEEPALIVE_INTERVAL
        );
        assert_eq!(
            sock.tcp_keepalive_retries().expect("TCP_KEEPCNT"),
            UPSTREAM_KEEPALIVE_PROBES
        );
    }

    #[test]
    fn deadline_adds_the_timeout_and_caps_a_huge_one() {
        let from = Instant::now();
        let d = deadline(from, Duration::from_secs(60));
        assert_eq!(d, from + Duration::from_secs(60));
        // `proxy-read-timeout: "18446744073709551615"` parses to Duration::from_secs(u64::MAX).
        let never = deadline(from, Duration::from_secs(u64::MAX));
        assert!(never > from + Duration::from_secs(10 * 365 * 24 * 3600));
    }

    fn backend(n: u16) -> Backend {
        Backend {
            key: BackendKey {
                namespace: "ns".into(),
                service: "svc".into(),
                port: ServicePortRef::Number(80),
            },
            endpoints: (0..n)
                .map(|i| Endpoint {
                    addr: SocketAddr::from(([10, 0, 0, 1], 8000 + i)),
                })
                .collect(),
            draining_fallback: false,
            health_check: None,
        }
    }

    #[test]
    fn round_robin_cycles_and_survives_new_backend_values() {
        let u = Upstreams::new(Arc::new(Metrics::new()), DEFAULT_MAX_EJECTION_PERCENT);
        let b = backend(3);
        let next = |u: &Upstreams, b: &Backend| {
            let start = u.cursor(&b.key).fetch_add(1, Ordering::Relaxed);
            u.pick(b, Choice::RoundRobin(start), &[]).expect("pick")
        };
        let picks: Vec<_> = (0..6).map(|_| next(&u, &b)).collect();
        assert_eq!(picks[0..3], picks[3..6]);
        let mut distinct = picks[0..3].to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3);
        // A new Backend value with the same key (a snapshot swap) continues the cursor.
        let b2 = backend(3);
        assert_eq!(next(&u, &b2), picks[0]);
    }

    #[test]
    fn pick_skips_tried() {
        let u = Upstreams::new(Arc::new(Metrics::new()), DEFAULT_MAX_EJECTION_PERCENT);
        let b = backend(2);
        let first = u.pick(&b, Choice::RoundRobin(0), &[]).expect("pick");
        let second = u.pick(&b, Choice::RoundRobin(0), &[first]).expect("pick");
        assert_ne!(first, second);
        assert_eq!(u.pick(&b, Choice::RoundRobin(0), &[first, second]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_after_five_failures_doubles_and_caps_at_half() {
        let u = Upstreams::new(Arc::new(Metrics::new()), DEFAULT_MAX_EJECTION_PERCENT);
        let b = backend(2);
        let a0 = b.endpoints[0].addr;
        let a1 = b.endpoints[1].addr;
        for _ in 0..4 {
            u.record_failure(&b, a0);
        }
        assert!(!u.is_ejected(a0));
        u.record_failure(&b, a0);
        assert!(u.is_ejected(a0));
        // Ejected endpoints are skipped.
        for start in 0..4 {
            assert_eq!(u.pick(&b, Choice::RoundRobin(start), &[]), Some(a1));
        }
        // Never more than half: a1 cannot be ejected while a0 is.
        for _ in 0..10 {
            u.record_failure(&b, a1);
        }
        assert!(!u.is_ejected(a1));
        tokio::time::advance(EJECT_BASE + Duration::from_millis(1)).await;
        assert!(!u.is_ejected(a0));
        for _ in 0..5 {
            u.record_failure(&b, a0);
        }
        assert!(u.is_ejected(a0));
        // Second ejection lasts 20 s.
        tokio::time::advance(EJECT_BASE + Duration::from_secs(1)).await;
        assert!(u.is_ejected(a0));
        tokio::time::advance(EJECT_BASE).await;
        assert!(!u.is_ejected(a0));
    }

    /// A success between ejections resets the failure count but not the backoff: the next
    /// ejection is twice as long. Only after EJECT_MAX back without one does it start over.
    #[tokio::test(start_paused = true)]
    async fn a_success_between_ejections_keeps_the_backoff() {
        let u = Upstreams::new(Arc::new(Metrics::new()), DEFAULT_MAX_EJECTION_PERCENT);
        let b = backend(2);
        let a0 = b.endpoints[0].addr;
        let eject = |u: &Upstreams| {
            for _ in 0..EJECT_AFTER_FAILURES {
                u.record_failure(&b, a0);
            }
        };
        eject(&u);
        tokio::time::advance(EJECT_BASE + Duration::from_millis(1)).await;
        u.record_success(a0);
        // Four failures after the success are not five in a row.
        for _ in 0..EJECT_AFTER_FAILURES - 1 {
            u.record_failure(&b, a0);
        }
        u.record_success(a0);
        u.record_failure(&b, a0);
        assert!(!u.is_ejected(a0));
        eject(&u);
        assert!(u.is_ejected(a0));
        tokio::time::advance(EJECT_BASE * 2 - Duration::from_millis(1)).await;
        assert!(u.is_ejected(a0), "the second ejection lasts 20 s");
        tokio::time::advance(Duration::from_millis(2)).await;
        // Back for EJECT_MAX: the history is forgotten, the next ejection is 10 s again.
        tokio::time::advance(EJECT_MAX).await;
        u.record_success(a0);
        eject(&u);
        tokio::time::advance(EJECT_BASE + Duration::from_millis(1)).await;
        assert!(!u.is_ejected(a0));
    }

    #[test]
    fn ejection_share_follows_max_ejection_percent_and_is_counted() {
        let metrics = Arc::new(Metrics::new());
        let b = backend(4);
        let fail = |u: &Upstreams, a: SocketAddr| {
            for _ in 0..EJECT_AFTER_FAILURES {
                u.record_failure(&b, a);
            }
        };
        // 100%: every endpoint may go.
        let u = Upstreams::new(metrics.clone(), 100);
        for e in b.endpoints.iter() {
            fail(&u, e.addr);
        }
        assert!(b.endpoints.iter().all(|e| u.is_ejected(e.addr)));
        // 25% of 4: exactly one.
        let u = Upstreams::new(metrics.clone(), 25);
        for e in b.endpoints.iter() {
            fail(&u, e.addr);
        }
        assert_eq!(
            b.endpoints.iter().filter(|e| u.is_ejected(e.addr)).count(),
            1
        );
        // 0%: passive ejection off.
        let u = Upstreams::new(metrics.clone(), 0);
        fail(&u, b.endpoints[0].addr);
        assert!(!u.is_ejected(b.endpoints[0].addr));
        let first = b.endpoints[0].addr.to_string();
        assert_eq!(
            metrics
                .upstream_ejections
                .with_label_values(&["ns", "svc", &first])
                .get(),
            2,
            "one ejection under 100% and one under 25%"
        );
    }

    #[test]
    fn an_ejection_series_leaves_with_its_endpoint() {
        let metrics = Arc::new(Metrics::new());
        let u = Upstreams::new(metrics.clone(), 100);
        let b = backend(3);
        let (gone, stays) = (b.endpoints[0].addr, b.endpoints[1].addr);
        for a in [gone, stays] {
            for _ in 0..EJECT_AFTER_FAILURES {
                u.record_failure(&b, a);
            }
        }
        let series = |m: &Metrics| -> Vec<String> {
            let mut v: Vec<String> = m
                .upstream_ejections
                .collect()
                .iter()
                .flat_map(|f| f.get_metric().iter())
                .flat_map(|m| m.get_label().iter())
                .filter(|l| l.name() == "endpoint")
                .map(|l| l.value().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(series(&metrics), [gone.to_string(), stays.to_string()]);
        let snapshot = |b: Backend| Snapshot {
            backends: Arc::new(crate::model::BackendTable { backends: vec![b] }),
            ..Snapshot::default()
        };
        // Both still listed: nothing goes.
        prune_ejection_series(Some(&snapshot(b.clone())), &metrics);
        assert_eq!(series(&metrics), [gone.to_string(), stays.to_string()]);
        // The first endpoint left its Service.
        let mut fewer = b.clone();
        fewer.endpoints = b.endpoints[1..].to_vec().into();
        prune_ejection_series(Some(&snapshot(fewer)), &metrics);
        assert_eq!(series(&metrics), [stays.to_string()]);
        // The same address under another Service is not this series.
        let mut other = b.clone();
        other.key.service = "other".into();
        prune_ejection_series(Some(&snapshot(other)), &metrics);
        assert!(series(&metrics).is_empty());
        // Ejections after a prune are tracked, and pruned, the same way.
        let third = b.endpoints[2].addr;
        for _ in 0..EJECT_AFTER_FAILURES {
            u.record_failure(&b, third);
        }
        assert_eq!(series(&metrics), [third.to_string()]);
        prune_ejection_series(None, &metrics);
        assert!(series(&metrics).is_empty());
    }

    /// An endpoint that leaves the snapshot loses its passive-health record: when its address
    /// is listed again (ready again, or a new pod), it is not ejected, and its next ejection
    /// is the first (10 s), not a doubled one. Endpoints still listed keep theirs; cursors,
    /// budgets and idle in-flight counters of what left go too.
    #[tokio::test(start_paused = true)]
    async fn state_of_endpoints_and_backends_that_left_is_forgotten() {
        let u = Upstreams::new(Arc::new(Metrics::new()), 100);
        let b = backend(3);
        let (a0, a1) = (b.endpoints[0].addr, b.endpoints[1].addr);
        let retained = u.retained_state();
        let snapshot = |backends: Vec<Backend>| Snapshot {
            backends: Arc::new(crate::model::BackendTable { backends }),
            ..Snapshot::default()
        };
        let eject = |addr| {
            for _ in 0..EJECT_AFTER_FAILURES {
                u.record_failure(&b, addr);
            }
        };
        // a0 ejected twice (the second ejection lasts 20 s), a1 once.
        eject(a0);
        tokio::time::advance(EJECT_BASE + Duration::from_secs(1)).await;
        eject(a0);
        eject(a1);
        let _ = u.cursor(&b.key);
        let _ = u.in_flight_counter(a0);
        retained.prune(Some(&snapshot(vec![b.clone()])));
        assert!(u.is_ejected(a0) && u.is_ejected(a1), "listed: kept");
        // a0's pod went away.
        let mut fewer = b.clone();
        fewer.endpoints = b.endpoints[1..].to_vec().into();
        retained.prune(Some(&snapshot(vec![fewer])));
        assert!(!u.is_ejected(a0), "its record went with it");
        assert!(u.is_ejected(a1));
        // Back: five failures eject it for the first period again.
        retained.prune(Some(&snapshot(vec![b.clone()])));
        eject(a0);
        assert!(u.is_ejected(a0));
        tokio::time::advance(EJECT_BASE + Duration::from_millis(1)).await;
        assert!(!u.is_ejected(a0), "a first ejection, not a third");
        // The Service left: its cursor and a0's idle in-flight counter go.
        assert_eq!((read(&u.cursors).len(), read(&u.in_flight).len()), (1, 1));
        retained.prune(Some(&snapshot(Vec::new())));
        assert_eq!((read(&u.cursors).len(), read(&u.in_flight).len()), (0, 0));
        assert!(read(&u.health).is_empty());
    }

    /// An idle pooled HTTP/1.1 connection is reused until [`POOL_IDLE_TIMEOUT`] (60 s), and
    /// not after: by then an nginx upstream (75 s `keepalive_timeout`) has not closed it yet,
    /// so portico never sends on a connection such a server is closing.
    #[tokio::test(start_paused = true)]
    async fn an_idle_pooled_connection_is_reused_until_the_idle_timeout() {
        assert!(POOL_IDLE_TIMEOUT < Duration::from_secs(75));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Holds each accepted socket open (an upstream that never closes idle connections).
        let held = tokio::spawn(async move {
            let mut socks = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                socks.push(s);
            }
        });
        let pool = Pool::default();
        for _ in 0..2 {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let (tx, conn) = http1::handshake::<_, ProxyBody>(TokioIo::new(tcp))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            pool.put(addr, tx);
        }
        tokio::time::advance(POOL_IDLE_TIMEOUT - Duration::from_secs(1)).await;
        assert!(pool.take_h1(addr).is_some(), "59 s idle: reused");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(pool.take_h1(addr).is_none(), "61 s idle: dropped");
        held.abort();
    }

    /// An h2c connection is idle from when its last stream ended, not from when it began: a
    /// watch that ran for hours does not leave its connection reaped the moment it ends.
    #[tokio::test(start_paused = true)]
    async fn an_h2c_connection_is_idle_from_its_last_streams_end() {
        let load = Arc::new(H2Load {
            open: AtomicUsize::new(0),
            base: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        });
        load.open.fetch_add(1, Ordering::AcqRel);
        let stream = H2Stream(load.clone());
        tokio::time::advance(Duration::from_secs(7200)).await;
        assert!(!load.idle_expired(), "a stream is open");
        drop(stream);
        tokio::time::advance(POOL_IDLE_TIMEOUT - Duration::from_secs(1)).await;
        assert!(!load.idle_expired());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(load.idle_expired());
    }

    /// A Service the snapshot no longer routes to takes its connect-error, retry and (once
    /// idle) in-flight series with it.
    #[test]
    fn per_service_series_leave_with_their_service() {
        let metrics = Arc::new(Metrics::new());
        let b = backend(1);
        let labels = [&*b.key.namespace, &*b.key.service];
        metrics
            .upstream_connect_errors
            .with_label_values(&labels)
            .inc();
        metrics.upstream_retries.with_label_values(&labels).inc();
        let in_flight = metrics.upstream_in_flight.with_label_values(&labels);
        in_flight.inc();
        let count = |m: &Metrics| {
            m.registry
                .gather()
                .iter()
                .filter(|f| f.name().starts_with("portico_upstream_"))
                .map(|f| f.get_metric().len())
                .sum::<usize>()
        };
        let snapshot = |b: Backend| Snapshot {
            backends: Arc::new(crate::model::BackendTable { backends: vec![b] }),
            ..Snapshot::default()
        };
        prune_upstream_series(Some(&snapshot(b.clone())), &metrics);
        assert_eq!(count(&metrics), 3);
        let mut other = b.clone();
        other.key.service = "other".into();
        // Gone, but a request is still in flight: its gauge stays until it ends.
        prune_upstream_series(Some(&snapshot(other.clone())), &metrics);
        assert_eq!(count(&metrics), 1);
        in_flight.dec();
        prune_upstream_series(Some(&snapshot(other)), &metrics);
        assert_eq!(count(&metrics), 0);
    }

    #[test]
    fn least_request_prefers_the_endpoint_with_fewer_in_flight() {
        let u = Upstreams::new(Arc::new(Metrics::new()), 50);
        let b = backend(2);
        let (busy, idle) = (b.endpoints[0].addr, b.endpoints[1].addr);
        let gauge = u
            .metrics
            .upstream_in_flight
            .with_label_values(&["ns", "svc"]);
        let held: Vec<InFlight> = (0..3)
            .map(|_| InFlight::new(u.in_flight_counter(busy), gauge.clone()))
            .collect();
        assert_eq!(u.endpoint_in_flight(busy), 3);
        assert_eq!(gauge.get(), 3);
        for _ in 0..200 {
            assert_eq!(u.pick(&b, Choice::LeastRequest, &[]), Some(idle));
        }
        // A retry never returns to a tried endpoint, however idle.
        assert_eq!(u.pick(&b, Choice::LeastRequest, &[idle]), Some(busy));
        drop(held);
        assert_eq!(u.endpoint_in_flight(busy), 0);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn consistent_hash_retries_walk_to_the_next_highest_score() {
        let u = Upstreams::new(Arc::new(Metrics::new()), 50);
        let b = backend(5);
        let all: Vec<SocketAddr> = b.endpoints.iter().map(|e| e.addr).collect();
        for key in 0..50u64 {
            let mut ranked = all.clone();
            ranked.sort_by_key(|a| std::cmp::Reverse(balance::score(key, *a)));
            let mut tried = Vec::new();
            for want in &ranked {
                let got = u.pick(&b, Choice::Hash(key), &tried).expect("pick");
                assert_eq!(got, *want, "key {key}");
                tried.push(got);
            }
            assert_eq!(u.pick(&b, Choice::Hash(key), &tried), None);
        }
    }

    #[test]
    fn actively_down_endpoints_are_skipped_and_all_down_is_panic_mode() {
        let u = Upstreams::new(Arc::new(Metrics::new()), 50);
        let check = Arc::new(crate::model::HealthCheck {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        });
        let mut b = backend(3);
        b.health_check = Some(check.clone());
        let down = b.endpoints[1].addr;
        u.active.set(down, &check, true);
        for choice in [
            Choice::RoundRobin(1),
            Choice::LeastRequest,
            Choice::Random,
            Choice::Hash(7),
        ] {
            for _ in 0..50 {
                assert_ne!(u.pick(&b, choice, &[]), Some(down), "{choice:?}");
            }
        }
        // A backend without that check ignores the mark.
        let plain = backend(3);
        assert_eq!(u.pick(&plain, Choice::RoundRobin(1), &[]), Some(down));
        // Every endpoint down: pick among all rather than fail (panic mode).
        for e in b.endpoints.iter() {
            u.active.set(e.addr, &check, true);
        }
        for choice in [Choice::RoundRobin(0), Choice::LeastRequest, Choice::Hash(7)] {
            assert!(u.pick(&b, choice, &[]).is_some(), "{choice:?}");
        }
    }

    fn down_check() -> Arc<crate::model::HealthCheck> {
        Arc::new(crate::model::HealthCheck {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        })
    }

    /// The share of an endpoint round robin skips goes to all the others in turn, not to its
    /// next neighbour: with one of four down, each of the other three serves exactly a third.
    #[test]
    fn round_robin_spreads_a_skipped_endpoints_share_over_the_others() {
        let u = Upstreams::new(Arc::new(Metrics::new()), 50);
        let check = down_check();
        for down in [0, 2] {
            let mut b = backend(4);
            b.health_check = Some(check.clone());
            for e in b.endpoints.iter() {
                u.active.set(e.addr, &check, false);
            }
            u.active.set(b.endpoints[down].addr, &check, true);
            let mut served = HashMap::new();
            for start in 0..1200 {
                let got = u.pick(&b, Choice::RoundRobin(start), &[]).expect("pick");
                *served.entry(got).or_insert(0) += 1;
            }
            assert_eq!(served.len(), 3, "{served:?}");
            assert!(served.values().all(|n| *n == 400), "{served:?}");
        }
    }

    /// Health marks protect retries: once a usable endpoint was tried, an ejected or down one
    /// is no retry target. Only when the whole backend is unusable (panic mode) are they tried.
    #[test]
    fn a_retry_goes_to_an_unhealthy_endpoint_only_in_panic_mode() {
        let u = Upstreams::new(Arc::new(Metrics::new()), 50);
        let check = down_check();
        let mut b = backend(3);
        b.health_check = Some(check.clone());
        let [a, bb, c] = [0, 1, 2].map(|i| b.endpoints[i].addr);
        u.active.set(bb, &check, true);
        u.active.set(c, &check, true);
        for choice in [
            Choice::RoundRobin(0),
            Choice::RoundRobin(1),
            Choice::LeastRequest,
            Choice::Random,
            Choice::Hash(7),
        ] {
            assert_eq!(u.pick(&b, choice, &[]), Some(a), "{choice:?}");
            assert_eq!(u.pick(&b, choice, &[a]), None, "{choice:?}");
        }
        assert!(!u.has_retry_target(&b, &[a]));
        assert!(u.has_retry_target(&b, &[]));
        // All down: every untried endpoint is a target again.
        u.active.set(a, &check, true);
        assert!(u.has_retry_target(&b, &[a]));
        assert!(u.pick(&b, Choice::RoundRobin(0), &[a]).is_some());
        assert!(u.pick(&b, Choice::Random, &[a, bb]) == Some(c));
        assert!(!u.has_retry_target(&b, &[a, bb, c]));
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoint_is_skipped_by_every_strategy_and_restored_after_backoff() {
        let u = Upstreams::new(Arc::new(Metrics::new()), 50);
        let b = backend(2);
        let (bad, good) = (b.endpoints[0].addr, b.endpoints[1].addr);
        for _ in 0..EJECT_AFTER_FAILURES {
            u.record_failure(&b, bad);
        }
        for choice in [
            Choice::LeastRequest,
            Choice::Random,
            Choice::Hash(1),
            Choice::Hash(2),
        ] {
            for _ in 0..20 {
                assert_eq!(u.pick(&b, choice, &[]), Some(good), "{choice:?}");
            }
        }
        tokio::time::advance(EJECT_BASE + Duration::from_millis(1)).await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.extend(u.pick(&b, Choice::Random, &[]));
        }
        assert!(seen.contains(&bad), "restored after the ejection period");
    }

    #[test]
    fn single_endpoint_is_never_ejected() {
        let u = Upstreams::new(Arc::new(Metrics::new()), DEFAULT_MAX_EJECTION_PERCENT);
        let b = backend(1);
        for _ in 0..20 {
            u.record_failure(&b, b.endpoints[0].addr);
        }
        assert!(!u.is_ejected(b.endpoints[0].addr));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_has_floor_and_ratio() {
        let u = Upstreams::new(Arc::new(Metrics::new()), DEFAULT_MAX_EJECTION_PERCENT);
        let k = backend(1).key;
        u.budget_deposit(&k, Instant::now());
        // Floor: 3 per second.
        assert!(u.budget_withdraw(&k));
        assert!(u.budget_withdraw(&k));
        assert!(u.budget_withdraw(&k));
        assert!(!u.budget_withdraw(&k));
        // Ratio: 10 requests earn 2 retries.
        for _ in 0..10 {
            u.budget_deposit(&k, Instant::now());
        }
        assert!(u.budget_withdraw(&k));
        assert!(u.budget_withdraw(&k));
        assert!(!u.budget_withdraw(&k));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(u.budget_withdraw(&k));
    }

    /// Retries earned long ago fade: after a quiet minute, a bank of 100 is worth nothing
    /// and only the floor (3) remains, not 3 + 100.
    #[tokio::test(start_paused = true)]
    async fn retry_budget_earned_long_ago_fades() {
        let u = Upstreams::new(Arc::new(Metrics::new()), DEFAULT_MAX_EJECTION_PERCENT);
        let k = backend(1).key;
        for _ in 0..1000 {
            u.budget_deposit(&k, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        let granted = (0..200).take_while(|_| u.budget_withdraw(&k)).count();
        assert_eq!(granted, 3);
        // Fresh traffic earns again at once (52 requests: 10.4 retries).
        for _ in 0..52 {
            u.budget_deposit(&k, Instant::now());
        }
        assert_eq!((0..200).take_while(|_| u.budget_withdraw(&k)).count(), 10);
    }

    /// What was earned in the last seconds is there when the first failure comes, however
    /// long ago the last retry was: a busy minute without retries (100 requests a second)
    /// banks about the cap of 100, on top of the floor.
    #[tokio::test(start_paused = true)]
    async fn retry_budget_keeps_what_recent_traffic_earned() {
        let u = Upstreams::new(Arc::new(Metrics::new()), DEFAULT_MAX_EJECTION_PERCENT);
        let k = backend(1).key;
        assert!(u.budget_withdraw(&k));
        for _ in 0..6000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            u.budget_deposit(&k, Instant::now());
        }
        // About the cap (fading goes in 100 ms steps): without the fade at deposits, a minute
        // since the last withdrawal would leave 3.
        let granted = (0..200).take_while(|_| u.budget_withdraw(&k)).count();
        assert!((100..=103).contains(&granted), "{granted}");
    }

    #[test]
    fn idempotent_methods() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&m));
        }
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
