//! Listeners: the HTTP and HTTPS accept loops, the connection cap, per-connection protocol
//! serving (h1, h2 over TLS by ALPN, h2c prior knowledge on the plain port), the client header
//! and idle keep-alive timers, and the shutdown sequence of brief §4.4.
//!
//! Owns: sockets, connection lifetimes and the order of shutdown. Every request is handed to a
//! [`ServeRequest`] (the real one is [`Handler`]) with its [`ConnInfo`]; this module never looks
//! inside requests. Must not import kube, k8s-openapi, translate or the controller.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::framing::FramingIo;
use super::handler::Handler;
use super::health::HealthChecker;
use super::sniff::{self, H2_PREFACE};
use super::tls::{self, SniResolver};
use super::{BoxError, ConnInfo, ProxyBody, ProxyConfig, StreamProgress};
use crate::metrics::Metrics;
use crate::publish::Reader;

/// First pause after an accept error that is not about one connection (EMFILE, ENFILE,
/// ENOBUFS...): the process is out of something, spinning would only burn the CPU.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts while errors persist.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Interval of HTTP/2 keep-alive PINGs to clients (RFC 9113 §6.7).
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// A client that does not answer a PING within this is gone.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// After the grace period connections are cut; this bounds the wait for their tasks to notice.
const CUT_WAIT: Duration = Duration::from_secs(2);
/// Room above request line + header block in hyper's h1 read buffer (CRLFs, a first body
/// chunk), so oversize requests reach the handler and get 414/431 from it.
const H1_BUF_SLACK: usize = 4096;
/// hyper's minimum for `max_buf_size`.
const H1_MIN_BUF: usize = 8192;

// ---------------------------------------------------------------------------------------------
// Shutdown trigger

/// Fires the shutdown of every [`Proxy`] and admin server that holds one of its [`Shutdown`]s.
///
/// The app fires it after readiness went to 503 and `--shutdown-delay` passed; `serve` then
/// closes its listeners, drains connections for up to `shutdown_grace`, cuts the rest and
/// returns. Dropping every trigger counts as firing, so a lost trigger never leaves a server
/// that cannot stop.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(pub watch::Sender<bool>);

impl ShutdownTrigger {
    pub fn new() -> Self {
        ShutdownTrigger(watch::channel(false).0)
    }

    /// A signal to hand to `serve`.
    pub fn signal(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }

    /// Start the shutdown. Idempotent.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }
}

impl Default for ShutdownTrigger {
    fn default() -> Self {
        Self::new()
    }
}

/// The receiving side of a [`ShutdownTrigger`].
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves once the trigger fired (at once if it already has, or if it was dropped).
    pub async fn fired(&mut self) {
        // Err means every sender is gone: treated as fired (see ShutdownTrigger).
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    pub fn is_fired(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }
}

// ---------------------------------------------------------------------------------------------
// The request seam

/// Future of one served request.
pub type ServeFuture<'a> = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send + 'a>>;

/// What the listener calls for every request. [`Handler`] is the product's implementation;
/// [`Proxy::bind_with`] takes any other, which keeps the listener testable on its own (e.g.
/// with a request that stays in flight until the test lets it go).
pub trait ServeRequest: Send + Sync + 'static {
    fn serve<'a>(&'a self, req: Request<Incoming>, conn: &'a ConnInfo) -> ServeFuture<'a>;

    /// The active health checker to run beside the listeners, if the service has one.
    fn health_checker(&self) -> Option<HealthChecker> {
        None
    }
}

impl ServeRequest for Handler {
    fn serve<'a>(&'a self, req: Request<Incoming>, conn: &'a ConnInfo) -> ServeFuture<'a> {
        Box::pin(self.handle(req, conn))
    }

    fn health_checker(&self) -> Option<HealthChecker> {
        Some(Handler::health_checker(self))
    }
}

// ---------------------------------------------------------------------------------------------
// Per-connection activity: header timer and idle keep-alive timer

/// What a connection is doing, for its timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in flight and no bytes of a next one since this instant.
    Idle(Instant),
    /// Bytes of a request head arrived (or the connection opened) at this instant and the
    /// head is not complete yet.
    Head(Instant),
    /// At least one request in flight (handler running or response body streaming).
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Plain port: h1 unless the first bytes are the h2 preface.
    Sniff,
    H1,
    H2,
}

#[derive(Debug)]
struct ActState {
    in_flight: usize,
    phase: Phase,
    protocol: Protocol,
    /// Bytes of the h2 preface matched so far while sniffing.
    sniffed: usize,
}

/// Which timer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Idle,
    Header,
    /// Requests in flight, but no byte moved either way for the stream idle timeout.
    Stalled,
}

/// The connection's timeouts, as [`Activity::expired`] applies them.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    idle: Duration,
    header: Duration,
    /// Busy with no IO progress (brief §4.4 "streams idle 1 h") once every handler has its
    /// response head: a client that does not read its response, or a response the upstream
    /// stopped sending, cannot hold the connection and its request slots for ever. (Before the
    /// head, the route's read timeout bounds the upstream and the client's body.)
    stalled: Duration,
    /// Off while draining: the graceful close is already under way.
    idle_enabled: bool,
}

/// Shared between the IO wrapper (reads), the service (request start/end) and the connection
/// task (timers). Phase changes wake nobody: the timer re-reads the phase when it fires (see
/// [`Activity::expired`]), so a keep-alive request costs no timer re-arm and no wake-up.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActState>,
    /// Reads and writes that moved bytes: an atomic, not the lock, so a write costs one add.
    /// The timer compares it between its wake-ups to find a stalled busy connection.
    progress: AtomicU64,
    /// Requests whose handler has not produced a response head yet: the upstream's read
    /// timeout (and the client-body timeout) bound those, per route, so the stall timer waits.
    handling: AtomicUsize,
    /// HTTP/2 responses being sent, each with its own idle timer (see [`StreamWatch`]).
    streams: Mutex<Vec<WatchEntry>>,
    /// The shutdown came while an HTTP/1.1 head was arriving: its answer says
    /// `Connection: close` (the graceful close, asked for only once it started, may come
    /// after hyper wrote a quick answer's head).
    close_after_head: AtomicBool,
}

/// One HTTP/2 response in [`Activity::streams`]: its frame count when last seen moving.
#[derive(Debug)]
struct WatchEntry {
    watch: std::sync::Weak<StreamWatch>,
    seen: u64,
    /// Since when `seen` is the count; `None` until a sweep first saw the stream (the
    /// clock is not read per request: the stall is noticed up to one more step late).
    since: Option<Instant>,
}

/// The stream idle timer of one HTTP/2 response (brief §4.4 "streams idle"). On HTTP/1.1 the
/// connection is the stream, and bytes moving on it are the stream's; an HTTP/2 connection
/// carries the server's keep-alive PINGs (answered by any live client) and its other streams,
/// so a response whose upstream hung, or whose client stopped reading it, would never count
/// as stalled. Here each response counts its own frames, and the client's request body frames
/// ([`StreamProgress`]); the connection task's timer sweeps them ([`Activity::sweep_streams`]).
///
/// A stream that stalls loses its response body at once: the upstream exchange ends and its
/// concurrency slots come back, even while hyper cannot poll the body (it holds a chunk for a
/// client whose flow-control window stays shut). The next poll then fails the body, and hyper
/// resets the stream (RST_STREAM); its siblings go on.
pub(super) struct StreamWatch {
    /// Frames moved either way (the request's through its [`StreamProgress`]).
    moved: AtomicU64,
    /// The response body until the stream ends or stalls.
    body: Mutex<Option<ProxyBody>>,
    /// The stream's task, woken when the body is taken.
    waker: AtomicWaker,
}

/// The error a stalled HTTP/2 response ends with (hyper resets the stream).
#[derive(Debug, thiserror::Error)]
#[error("no frame moved for the stream idle timeout")]
struct StreamStalled;

impl StreamWatch {
    fn new() -> Arc<StreamWatch> {
        Arc::new(StreamWatch {
            moved: AtomicU64::new(0),
            body: Mutex::new(None),
            waker: AtomicWaker::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<ProxyBody>> {
        // Only ever replaced whole: a panic elsewhere cannot leave it half-written.
        self.body.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One frame moved.
    pub(super) fn moved(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
    }

    /// Drop the body (outside the lock) and wake the stream so hyper learns of it.
    fn expire(&self) {
        let body = self.lock().take();
        drop(body);
        self.waker.wake();
    }

    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut body = self.lock();
        let Some(inner) = body.as_mut() else {
            return Poll::Ready(Some(Err(StreamStalled.into())));
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.moved();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                // Under the lock: an expiry either came first (the body is gone and this
                // branch is not reached) or wakes the waker registered here.
                self.waker.register(cx.waker());
                Poll::Pending
            }
            done => done,
        }
    }
}

impl Activity {
    fn new(protocol: Protocol) -> Arc<Self> {
        let now = Instant::now();
        // The first request head (HTTP/1.1), or the connection preface (HTTP/2, known from
        // ALPN or still to be sniffed), must arrive within the header timeout of the connection
        // opening: a connection that never sends anything is a slowloris too. After its preface
        // an HTTP/2 connection idles until its first stream.
        let phase = Phase::Head(now);
        Arc::new(Activity {
            state: Mutex::new(ActState {
                in_flight: 0,
                phase,
                protocol,
                sniffed: 0,
            }),
            progress: AtomicU64::new(0),
            handling: AtomicUsize::new(0),
            streams: Mutex::new(Vec::new()),
            close_after_head: AtomicBool::new(false),
        })
    }

    fn lock_streams(&self) -> MutexGuard<'_, Vec<WatchEntry>> {
        // Entries are pushed and removed whole.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start the idle timer of an HTTP/2 response.
    fn watch_stream(&self, watch: &Arc<StreamWatch>) {
        let mut streams = self.lock_streams();
        // Ended streams leave their entries until the next sweep (one timer step); a
        // connection serving thousands of requests per step drops them here too, amortised.
        if streams.len() >= 64 && streams.len().is_power_of_two() {
            streams.retain(|e| e.watch.strong_count() > 0);
        }
        streams.push(WatchEntry {
            watch: Arc::downgrade(watch),
            seen: 0,
            since: None,
        });
    }

    /// Expire the HTTP/2 responses on which no frame moved for `stalled`; forget ended ones.
    fn sweep_streams(&self, now: Instant, stalled: Duration) {
        let mut expired = Vec::new();
        self.lock_streams().retain_mut(|e| {
            let Some(watch) = e.watch.upgrade() else {
                return false;
            };
            let moved = watch.moved.load(Ordering::Relaxed);
            let since = match e.since {
                Some(since) if moved == e.seen => since,
                _ => {
                    e.seen = moved;
                    e.since = Some(now);
                    return true;
                }
            };
            if now.saturating_duration_since(since) < stalled {
                return true;
            }
            expired.push(watch);
            false
        });
        for watch in expired {
            debug!(timeout = ?stalled, "no frame moved on an HTTP/2 stream; resetting it");
            watch.expire();
        }
    }

    fn lock(&self) -> MutexGuard<'_, ActState> {
        // The state is a few plain fields updated atomically under the lock, so a panic
        // elsewhere cannot leave it inconsistent: take it back instead of propagating.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called with every chunk of bytes read from the client.
    fn on_read(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.moved();
        let mut s = self.lock();
        if s.protocol == Protocol::H2 {
            // HTTP/2 by ALPN: the preface's bytes end the head phase (hyper checks them).
            if let Phase::Head(t) = s.phase {
                s.sniffed = s.sniffed.saturating_add(bytes.len());
                if s.sniffed >= H2_PREFACE.len() {
                    s.phase = Phase::Idle(t);
                }
            }
            return;
        }
        if s.protocol == Protocol::Sniff {
            let want = &H2_PREFACE[s.sniffed..];
            let n = want.len().min(bytes.len());
            if bytes[..n] == want[..n] {
                s.sniffed += n;
                if s.sniffed == H2_PREFACE.len() {
                    s.protocol = Protocol::H2;
                    if let Phase::Head(t) = s.phase {
                        s.phase = Phase::Idle(t);
                    }
                }
                return;
            }
            s.protocol = Protocol::H1;
        }
        if s.protocol == Protocol::H1 && s.in_flight == 0 && matches!(s.phase, Phase::Idle(_)) {
            // First byte of the next request on a keep-alive connection: from now on the
            // header timer runs, not the idle timer.
            s.phase = Phase::Head(Instant::now());
        }
    }

    /// An HTTP/1.1 request head is on its way (or the connection's first, which is due):
    /// closing now would lose a request the client has started to send, so the graceful
    /// shutdown waits for it (bounded by the header timeout).
    fn receiving_h1_head(&self) -> bool {
        let s = self.lock();
        matches!(s.phase, Phase::Head(_)) && s.protocol != Protocol::H2
    }

    /// Bytes moved to or from the client.
    fn moved(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// A handler started; the stall timer waits until the guard drops (its response head is
    /// ready, or it was cancelled).
    fn begin_handling(self: &Arc<Self>) -> HandlingGuard {
        self.handling.fetch_add(1, Ordering::Relaxed);
        HandlingGuard(self.clone())
    }

    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        let mut s = self.lock();
        s.in_flight += 1;
        s.phase = Phase::Busy;
        RequestGuard(self.clone())
    }

    /// An idle connection's idle time starts again now (the close it was asked for).
    fn idle_from_now(&self) {
        let mut s = self.lock();
        if let Phase::Idle(_) = s.phase {
            s.phase = Phase::Idle(Instant::now());
        }
    }

    fn end_request(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.phase = Phase::Idle(Instant::now());
        }
    }

    /// Resolves when a timer runs out: the header timer in [`Phase::Head`], the idle timer in
    /// [`Phase::Idle`] (only when `idle_enabled`), the stall timer in [`Phase::Busy`]. Ends
    /// when the connection task drops it.
    ///
    /// Lazy: nothing wakes this future when the phase changes or bytes move. It sleeps until
    /// the current deadline, but never longer than the shortest timeout, then re-reads the
    /// phase. That is never late: a phase that starts after the sleep began expires at least
    /// one shortest timeout later, i.e. after the wake-up; and a phase that ended early is
    /// seen on waking. The price is one wake-up per shortest timeout on a busy connection.
    /// A stall counts from the first wake-up that saw no progress, so it is noticed up to one
    /// such step late.
    ///
    /// The flags take any duration: a stall timeout of zero turns the stall check off, a
    /// deadline past what the clock can represent never comes, and the wake-up step is at
    /// least a millisecond, so no setting can make this loop spin or panic.
    async fn expired(&self, t: Timeouts) -> Expiry {
        let Timeouts {
            idle,
            header,
            stalled,
            idle_enabled,
        } = t;
        let stall_enabled = !stalled.is_zero();
        let mut step = header;
        if stall_enabled {
            step = step.min(stalled);
        }
        if idle_enabled {
            step = step.min(idle);
        }
        let step = step.clamp(MIN_TIMER_STEP, MAX_TIMER_STEP);
        let mut seen = self.progress.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        loop {
            let now = Instant::now();
            let progress = self.progress.load(Ordering::Relaxed);
            if progress != seen || self.handling.load(Ordering::Relaxed) > 0 {
                seen = progress;
                quiet_since = now;
            }
            let (phase, protocol) = {
                let s = self.lock();
                (s.phase, s.protocol)
            };
            // HTTP/2: each stream has its own idle timer (the connection's bytes include
            // keep-alive PINGs and other streams); its streams are swept on every wake-up.
            let h2 = protocol == Protocol::H2;
            if h2 && stall_enabled {
                self.sweep_streams(now, stalled);
            }
            let deadline = match phase {
                Phase::Idle(t) if idle_enabled => t.checked_add(idle).map(|at| (at, Expiry::Idle)),
                Phase::Head(t) => t.checked_add(header).map(|at| (at, Expiry::Header)),
                Phase::Busy if stall_enabled && !h2 => quiet_since
                    .checked_add(stalled)
                    .map(|at| (at, Expiry::Stalled)),
                Phase::Idle(_) | Phase::Busy => None,
            };
            let wake = match deadline {
                Some((at, kind)) if at <= now => return kind,
                Some((at, _)) => at.min(now + step),
                None => now + step,
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// Bounds of the connection timer's wake-up step: never a spin (a zero timeout), never past
/// what the clock can add (a huge one).
const MIN_TIMER_STEP: Duration = Duration::from_millis(1);
const MAX_TIMER_STEP: Duration = Duration::from_secs(24 * 3600);

/// Marks one handler as producing its response head until dropped.
struct HandlingGuard(Arc<Activity>);

impl Drop for HandlingGuard {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks one request in flight until dropped (with the response body, or with the handler
/// future if the client went away first).
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

/// The response body, carrying the request's [`RequestGuard`] so a streaming response keeps
/// the connection busy until its last byte.
struct TrackedBody {
    inner: ProxyBody,
    _guard: RequestGuard,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP/2 response body held by its [`StreamWatch`] until it stalls (boxed into the
/// [`TrackedBody`], so HTTP/1.1 responses pay nothing for it).
struct WatchedBody(Arc<StreamWatch>);

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        // A stalled stream still has its error to deliver.
        self.0.lock().as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .lock()
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint)
    }
}

/// Resolves when the shutdown grace ran out.
type CutFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The end of the shutdown grace, as seen by connections: a flag read on every IO call (an
/// atomic load) and a watch that wakes IO calls that are waiting.
#[derive(Debug, Clone)]
struct Cut {
    flag: Arc<AtomicBool>,
    rx: watch::Receiver<bool>,
}

/// Polls a connection task's side future (shutdown signal, cut, timers) only when that
/// future's own waker fired, not on every wake-up of the task. The IO wakes a connection task
/// several times per request; re-polling the watch and timer futures each time cost about a
/// tenth of a keep-alive request (callgrind, docs/benchmarks.md).
struct Gate {
    state: Arc<GateState>,
    waker: Waker,
}

struct GateState {
    /// The side future asked to be polled (starts true: it has never been polled).
    pending: AtomicBool,
    /// The task to wake when it does.
    task: AtomicWaker,
}

impl Wake for GateState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.pending.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Gate {
    fn new() -> Gate {
        let state = Arc::new(GateState {
            pending: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Gate {
            waker: Waker::from(state.clone()),
            state,
        }
    }

    fn poll<F: Future + ?Sized>(&self, fut: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.state.task.register(cx.waker());
        if !self.state.pending.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        fut.poll(&mut Context::from_waker(&self.waker))
    }
}

/// Client IO that reports what it reads to the connection's [`Activity`], owns the
/// connection's [`ConnSlot`] and fails once the shutdown grace is over.
///
/// Living in the IO rather than in the connection task matters for upgrades: an upgraded
/// connection (WebSocket) leaves hyper with this IO inside, so it keeps its slot under
/// `--max-connections` and in `open_connections` until the handler drops it, and it is
/// still cut when the grace runs out.
struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
    _slot: ConnSlot,
    flag: Arc<AtomicBool>,
    cut: CutFuture,
    /// The cut future is polled only when its own waker fired: an IO call waits (and comes
    /// here) about twice per keep-alive request.
    cut_gate: Gate,
}

fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection cut at the end of the shutdown grace",
    )
}

impl<T> ActivityIo<T> {
    fn new(inner: T, activity: Arc<Activity>, slot: ConnSlot, cut: Cut) -> Self {
        let Cut { flag, mut rx } = cut;
        ActivityIo {
            inner,
            activity,
            _slot: slot,
            flag,
            cut: Box::pin(async move {
                // Err: the proxy is gone altogether, which is a cut too.
                let _ = rx.wait_for(|c| *c).await;
            }),
            cut_gate: Gate::new(),
        }
    }

    /// Every IO call fails once the grace ran out (an atomic load on the fast path).
    fn check_cut(&self) -> io::Result<()> {
        if self.flag.load(Ordering::Acquire) {
            return Err(cut_error());
        }
        Ok(())
    }

    /// An IO call that is about to wait also waits for the cut (registering the caller's
    /// waker), so it is woken, and fails, when the grace runs out.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if self.cut_gate.poll(self.cut.as_mut(), cx).is_ready() {
            return Poll::Ready(Err(cut_error()));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut()?;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.activity.on_read(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.pending(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut()?;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.pending(cx),
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.activity.moved();
                }
                Poll::Ready(Ok(n))
            }
            ready => ready,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut()?;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.pending(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut()?;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.pending(cx),
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.activity.moved();
                }
                Poll::Ready(Ok(n))
            }
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListenerKind {
    Http,
    Https,
}

impl ListenerKind {
    fn label(self) -> &'static str {
        match self {
            ListenerKind::Http => "http",
            ListenerKind::Https => "https",
        }
    }
}

/// Everything a connection task needs, shared by all of them.
struct Shared {
    cfg: Arc<ProxyConfig>,
    service: Arc<dyn ServeRequest>,
    /// TLS with ALPN `http/1.1` or no ALPN (RFC 9113 §3.2: h2 over TLS needs ALPN), and the
    /// plain port unless [`sniff`] saw the h2 preface.
    h1: hyper::server::conn::http1::Builder,
    /// TLS with ALPN `h2`, and h2c on the plain port (prior knowledge, RFC 9113 §3.3).
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    acceptor: TlsAcceptor,
}

/// Bound proxy listeners, ready to [`serve`](Proxy::serve).
pub struct Proxy {
    /// Address the plain HTTP listener is bound to (the real port when the flag said 0).
    pub http_addr: SocketAddr,
    /// Address the HTTPS listener is bound to.
    pub https_addr: SocketAddr,
    http: TcpListener,
    https: TcpListener,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    /// Active health checks (brief §4.6), run by `serve` until shutdown.
    health: Option<HealthChecker>,
}

impl Proxy {
    /// Bind the HTTP and HTTPS listeners, serving every request through [`Handler`]. Generates
    /// the fallback certificate for handshakes no snapshot certificate answers.
    pub async fn bind(
        cfg: ProxyConfig,
        reader: Reader,
        metrics: Arc<Metrics>,
    ) -> io::Result<Proxy> {
        let handler = Handler::new(Arc::new(cfg.clone()), reader.clone(), metrics.clone());
        Self::bind_with(cfg, reader, metrics, Arc::new(handler)).await
    }

    /// Like [`bind`](Proxy::bind) with another request service (tests, embedding).
    pub async fn bind_with(
        cfg: ProxyConfig,
        reader: Reader,
        metrics: Arc<Metrics>,
        service: Arc<dyn ServeRequest>,
    ) -> io::Result<Proxy> {
        let fallback = tls::generate_fallback().map_err(io::Error::other)?;
        let tls_cfg = tls::server_config(Arc::new(SniResolver::new(reader, fallback)))
            .map_err(io::Error::other)?;
        let http = TcpListener::bind(cfg.http_addr).await?;
        let https = TcpListener::bind(cfg.https_addr).await?;
        let http_addr = http.local_addr()?;
        let https_addr = https.local_addr()?;
        // Present both series from the start, so dashboards see 0 rather than nothing.
        for kind in [ListenerKind::Http, ListenerKind::Https] {
            metrics
                .open_connections
                .with_label_values(&[kind.label()])
                .add(0);
        }
        let health = service.health_checker();
        let shared = Shared {
            h1: h1_builder(&cfg),
            h2: h2_builder(&cfg),
            acceptor: TlsAcceptor::from(tls_cfg),
            service,
            cfg: Arc::new(cfg),
        };
        Ok(Proxy {
            http_addr,
            https_addr,
            http,
            https,
            shared: Arc::new(shared),
            metrics,
            health,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// Serve both listeners until `shutdown` fires, then run the shutdown sequence (brief
    /// §4.4): close the listeners, ask every connection to finish gracefully (idle keep-alive
    /// connections close, h2 gets GOAWAY, in-flight requests complete), wait up to
    /// `shutdown_grace`, cut whatever is still open, and return.
    ///
    /// Upgraded connections (WebSockets) belong to the handler once upgraded: they keep their
    /// connection slot while open, get the grace like everything else, and their IO fails
    /// when it runs out (there is no protocol-level way for the listener to close them
    /// gracefully).
    pub async fn serve(self, shutdown: Shutdown) {
        let Proxy {
            http,
            https,
            shared,
            metrics,
            health,
            ..
        } = self;
        // Probes stop with the listeners (the same signal): requests still draining finish
        // with the health marks as they stand. The task ends by itself on that signal.
        if let Some(h) = health {
            tokio::spawn(h.run(shutdown.clone()));
        }
        // One cap across both listeners: `--max-connections` is about the process' sockets.
        let permits = shared.cfg.max_connections.clamp(1, u32::MAX as usize);
        let sem = Arc::new(Semaphore::new(permits));
        let (cut_tx, cut_rx) = watch::channel(false);
        let cut = Cut {
            flag: Arc::new(AtomicBool::new(false)),
            rx: cut_rx,
        };
        let gauges = Gauges {
            http: metrics
                .open_connections
                .with_label_values(&[ListenerKind::Http.label()]),
            https: metrics
                .open_connections
                .with_label_values(&[ListenerKind::Https.label()]),
        };
        // Returns on shutdown, dropping (closing) both listeners.
        accept_loop(
            [(http, ListenerKind::Http), (https, ListenerKind::Https)],
            shared.clone(),
            sem.clone(),
            gauges,
            shutdown,
            cut.clone(),
        )
        .await;
        let grace = shared.cfg.shutdown_grace;
        let open = permits - sem.available_permits();
        info!(open, ?grace, "listeners closed; draining connections");
        // Every connection holds one permit until its task ends: all permits back = drained.
        let all = permits as u32;
        if tokio::time::timeout(grace, sem.acquire_many(all))
            .await
            .is_ok()
        {
            info!("all connections drained");
            return;
        }
        let open = permits - sem.available_permits();
        warn!(
            open,
            "shutdown grace elapsed; cutting remaining connections"
        );
        cut.flag.store(true, Ordering::Release);
        cut_tx.send_replace(true);
        if tokio::time::timeout(CUT_WAIT, sem.acquire_many(all))
            .await
            .is_err()
        {
            warn!("some connection tasks did not stop after the cut");
        }
    }
}

/// The h1 framing guard (brief §4.4 "Framing is strict"), holding at most the head hyper
/// itself would buffer: beyond that hyper answers 431 on its own.
fn framing_io<T>(io: T, cfg: &ProxyConfig, stopped: Arc<AtomicBool>) -> FramingIo<T> {
    FramingIo::new(io, h1_buf_size(cfg), cfg.max_headers, stopped)
}

fn h1_buf_size(cfg: &ProxyConfig) -> usize {
    cfg.max_request_line
        .saturating_add(cfg.max_header_bytes)
        .saturating_add(H1_BUF_SLACK)
        .max(H1_MIN_BUF)
}

/// HPACK counts 32 bytes of overhead per field (RFC 7541 §4.1); allow that on top of the
/// header byte limit so the handler, not h2, judges header size.
fn h2_header_list_size(cfg: &ProxyConfig) -> u32 {
    let size = cfg
        .max_header_bytes
        .saturating_add(cfg.max_headers.saturating_mul(32));
    u32::try_from(size).unwrap_or(u32::MAX)
}

// hyper's own `header_read_timeout` is deliberately left off: hyper 1.x restarts it whenever a
// keep-alive connection waits for its next request, which would cap idle keep-alive at the
// header timeout (10 s) instead of §4.4's 60 s. The header and idle timers live in
// [`Activity`] instead.

fn h1_builder(cfg: &ProxyConfig) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(h1_buf_size(cfg))
        .max_headers(cfg.max_headers);
    b
}

/// Response data queued per HTTP/2 stream beyond what the socket took (hyper's default: 400
/// KiB). A client may grant any flow-control window and then stop reading; what it can make
/// the proxy hold is this times its streams (100 per connection by default). nginx holds a
/// stream's `proxy_buffers` (32-64 KiB). The socket's own send buffer, not this, keeps a
/// distant client's stream at full speed.
const H2_MAX_SEND_BUF: usize = 64 * 1024;

fn h2_builder(cfg: &ProxyConfig) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(h2_header_list_size(cfg))
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    b
}

/// Accept errors that concern one connection only (it died before we took it): retry at once.
/// Anything else (EMFILE, ENFILE, ENOBUFS, ENOMEM) is backed off.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// One accepted connection's share of the cap and of the gauge; released on drop.
struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The open-connections gauge of each listener.
struct Gauges {
    http: IntGauge,
    https: IntGauge,
}

impl Gauges {
    fn get(&self, kind: ListenerKind) -> &IntGauge {
        match kind {
            ListenerKind::Http => &self.http,
            ListenerKind::Https => &self.https,
        }
    }
}

/// Accept on both listeners until shutdown. One loop for both, so exactly one permit is held
/// while waiting: two loops would each hold one and shrink the cap.
async fn accept_loop(
    listeners: [(TcpListener, ListenerKind); 2],
    shared: Arc<Shared>,
    sem: Arc<Semaphore>,
    gauges: Gauges,
    mut shutdown: Shutdown,
    cut: Cut,
) {
    let [(l0, k0), (l1, k1)] = listeners;
    let (side0, side1) = (LocalSide::of(&l0), LocalSide::of(&l1));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    // Runs until shutdown; each turn accepts one connection or backs off after an error.
    loop {
        // The permit comes first: at the cap we stop calling accept(), so new clients wait in
        // the kernel backlog (backpressure) instead of being accepted and refused.
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.fired() => return,
        };
        let (accepted, kind, side) = tokio::select! {
            r = l0.accept() => (r, k0, &side0),
            r = l1.accept() => (r, k1, &side1),
            _ = shutdown.fired() => return,
        };
        let (stream, peer) = match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                // On a dual-stack `[::]` listener an IPv4 client arrives as `::ffff:a.b.c.d`;
                // everything downstream (`--trusted-proxies`, X-Forwarded-For, X-Real-IP, rate
                // limit keys, hashing, logs) sees the plain IPv4 address.
                (
                    stream,
                    SocketAddr::new(peer.ip().to_canonical(), peer.port()),
                )
            }
            Err(e) if is_per_connection(&e) => {
                debug!(listener = kind.label(), error = %e, "accept: connection lost before accept");
                continue;
            }
            Err(e) => {
                warn!(listener = kind.label(), error = %e, ?backoff, "accept failed; backing off");
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.fired() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let gauge = gauges.get(kind);
        gauge.inc();
        let slot = ConnSlot {
            _permit: permit,
            gauge: gauge.clone(),
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set TCP_NODELAY failed");
        }
        let local = match side.fixed.map_or_else(|| stream.local_addr(), Ok) {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "accepted socket has no local address; dropping it");
                continue;
            }
        };
        let accepted = Accepted {
            stream,
            kind,
            peer,
            local,
            port_value: side.port_value.clone(),
            slot,
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let cut = cut.clone();
        tokio::spawn(async move {
            let mut task_cut = cut.rx.clone();
            let flag = cut.flag.clone();
            // The IO fails on cut too, but a request stuck in the handler does no IO: this
            // drops it (and with it the connection) at the cut.
            // Boxed: held inline, the whole connection future would be the task's size,
            // which tokio copies while spawning and again when the task finishes.
            let mut conn = Box::pin(serve_conn(&shared, accepted, shutdown, cut));
            let mut cut_fired = pin!(async move {
                let _ = task_cut.wait_for(|c| *c).await;
            });
            let gate = Gate::new();
            let was_cut = std::future::poll_fn(|cx| {
                if conn.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                gate.poll(cut_fired.as_mut(), cx).map(|()| true)
            })
            .await;
            if was_cut || flag.load(Ordering::Acquire) {
                debug!(%peer, "connection cut at end of shutdown grace");
            }
        });
    }
}

/// One accepted connection, before any protocol.
struct Accepted {
    stream: TcpStream,
    kind: ListenerKind,
    peer: SocketAddr,
    local: SocketAddr,
    /// The listener's port as a header value (X-Forwarded-Port), formatted once.
    port_value: http::HeaderValue,
    slot: ConnSlot,
}

/// What a listener knows of its connections' local side without asking the kernel.
struct LocalSide {
    /// The local address of every accepted socket when the listener is bound to one
    /// address; None for a wildcard bind (0.0.0.0, ::), where each socket is asked
    /// (getsockname) which address the client reached.
    fixed: Option<SocketAddr>,
    port_value: http::HeaderValue,
}

impl LocalSide {
    fn of(l: &TcpListener) -> Self {
        let addr = l.local_addr().ok();
        LocalSide {
            fixed: addr.filter(|a| !a.ip().is_unspecified()),
            port_value: http::HeaderValue::from(addr.map_or(0, |a| a.port())),
        }
    }
}

async fn serve_conn(shared: &Shared, accepted: Accepted, mut shutdown: Shutdown, cut: Cut) {
    let Accepted {
        stream,
        kind,
        peer,
        local,
        port_value,
        slot,
    } = accepted;
    let cfg = &shared.cfg;
    match kind {
        ListenerKind::Http => {
            let activity = Activity::new(Protocol::Sniff);
            let info = ConnInfo::new(peer, local, port_value, false, None);
            let mut io = ActivityIo::new(stream, activity.clone(), slot, cut);
            // h1 and h2c (prior knowledge) share this port: the first bytes decide. Reading
            // them shares the header timeout (a client that connects and sends nothing is a
            // slowloris too); a shutdown meanwhile just closes (no request has begun).
            let first = {
                let fired = shutdown.fired();
                tokio::select! {
                    biased;
                    r = tokio::time::timeout(cfg.client_header_timeout, sniff::sniff(&mut io)) => Some(r),
                    _ = fired => None,
                }
            };
            let (version, prefix) = match first {
                Some(Ok(Ok(first))) => first,
                Some(Ok(Err(e))) => {
                    debug!(%peer, error = %e, "reading the first bytes failed");
                    return;
                }
                Some(Err(_)) => {
                    debug!(%peer, "client header timeout before any request; closing");
                    return;
                }
                None => return,
            };
            let io = sniff::Prefixed::new(prefix, io);
            let h2 = version == sniff::Version::H2;
            serve_http(shared, io, h2, info, activity, shutdown, peer).await;
        }
        ListenerKind::Https => {
            // The handshake shares the header timeout: a client that opens a socket and
            // stalls the handshake is the TLS flavour of slowloris.
            // Boxed, like the connections below (see `drive`): rustls' state is over 1 KiB.
            let handshake = Box::pin(tokio::time::timeout(
                cfg.client_header_timeout,
                shared.acceptor.accept(stream),
            ))
            .await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let (_, session) = tls.get_ref();
            let sni = session
                .server_name()
                .map(|s| Arc::<str>::from(s.to_ascii_lowercase()));
            let h2 = session.alpn_protocol() == Some(tls::ALPN_H2);
            let info = ConnInfo::new(peer, local, port_value, true, sni);
            let activity = Activity::new(if h2 { Protocol::H2 } else { Protocol::H1 });
            let io = ActivityIo::new(tls, activity.clone(), slot, cut);
            serve_http(shared, io, h2, info, activity, shutdown, peer).await;
        }
    }
}

/// One connection once its protocol is known: hyper's h2, or its h1 behind the framing guard,
/// driven to the end by [`drive`].
async fn serve_http<I>(
    shared: &Shared,
    io: I,
    h2: bool,
    info: ConnInfo,
    activity: Arc<Activity>,
    shutdown: Shutdown,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &shared.cfg;
    // Set by the h1 framing guard when it stops following the connection (a CONNECT or
    // WebSocket head): the service then ends the connection after any answer but a 101.
    let unfollowed = (!h2).then(|| Arc::new(AtomicBool::new(false)));
    let svc = make_service(
        shared.service.clone(),
        info,
        activity.clone(),
        unfollowed.clone(),
        !cfg.stream_idle_timeout.is_zero(),
    );
    if h2 {
        // HTTP/2 framing is hyper's h2 codec's business (RFC 9113 §8.2.2 forbids
        // Transfer-Encoding there; the handler refuses it): no h1 guard.
        let conn = Box::pin(shared.h2.serve_connection(TokioIo::new(io), svc));
        drive(
            conn,
            |c| c.graceful_shutdown(),
            &activity,
            cfg,
            shutdown,
            peer,
        )
        .await;
    } else {
        let io = TokioIo::new(framing_io(io, cfg, unfollowed.unwrap_or_default()));
        let conn = Box::pin(shared.h1.serve_connection(io, svc).with_upgrades());
        drive(
            conn,
            |c| c.graceful_shutdown(),
            &activity,
            cfg,
            shutdown,
            peer,
        )
        .await;
    }
}

/// The hyper service of one connection: marks the request in flight and calls the seam.
fn make_service(
    service: Arc<dyn ServeRequest>,
    info: ConnInfo,
    activity: Arc<Activity>,
    unfollowed: Option<Arc<AtomicBool>>,
    stream_idle: bool,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<TrackedBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<TrackedBody>, Infallible>> + Send + 'static,
> + Clone {
    let info = Arc::new(info);
    service_fn(move |mut req: Request<Incoming>| {
        let guard = activity.begin_request();
        let handling = activity.begin_handling();
        let service = service.clone();
        let info = info.clone();
        let unfollowed = unfollowed.clone();
        let h2 = req.version() == http::Version::HTTP_2;
        let watch = (stream_idle && h2).then(|| {
            let watch = StreamWatch::new();
            // Only a request body has frames to count (a size hint, unlike `is_end_stream`,
            // does not lock the h2 stream).
            if req.body().size_hint().exact() != Some(0) {
                req.extensions_mut().insert(StreamProgress(watch.clone()));
            }
            watch
        });
        async move {
            let mut resp = service.serve(req, &info).await;
            drop(handling);
            // The framing guard no longer checks this connection's requests: nothing may
            // follow an answer that did not switch protocols (brief §4.4 framing). Nor may
            // anything follow the answer to a head that was arriving at shutdown.
            let closing = unfollowed.is_some_and(|u| u.load(Ordering::Acquire))
                || (!h2 && guard.0.close_after_head.load(Ordering::Acquire));
            if closing && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            let inner = match watch {
                // A response that is whole with its head (an error, a redirect, an empty
                // body) has nothing to stall.
                Some(watch) if !resp.body().is_end_stream() => {
                    let (parts, body) = resp.into_parts();
                    *watch.lock() = Some(body);
                    guard.0.watch_stream(&watch);
                    Response::from_parts(parts, http_body_util::BodyExt::boxed(WatchedBody(watch)))
                }
                _ => resp,
            };
            Ok::<_, Infallible>(inner.map(|inner| TrackedBody {
                inner,
                _guard: guard,
            }))
        }
    })
}

/// Poll one connection to its end, applying the timers and the graceful shutdown.
///
/// The connection comes boxed: hyper's connection state (and rustls' inside it) is several
/// KiB, and held inline it would make every connection task's future that large, which tokio
/// then moves (memcpy) several times while spawning it — callgrind showed those copies as
/// over half of the instructions of a new connection.
async fn drive<C, E>(
    mut conn: Pin<Box<C>>,
    graceful: impl Fn(Pin<&mut C>),
    activity: &Activity,
    cfg: &ProxyConfig,
    mut shutdown: Shutdown,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    enum Event<E> {
        Ended(Result<(), E>),
        Shutdown,
        Expired(Expiry),
    }
    let mut draining = false;
    // Set when the idle timeout or the shutdown asked the connection to close: an h2 client
    // that never acknowledges the GOAWAY's PING would otherwise keep an idle connection (and
    // its `--max-connections` slot) for ever, or a drain for its whole grace. From then on,
    // being idle for the header timeout ends it (requests in flight still get the grace).
    let mut closing_idle = false;
    // The shutdown came while an HTTP/1.1 head was arriving: hyper, asked to close then,
    // would drop it unanswered (it counts a connection idle until a whole head is parsed).
    // The graceful close waits until the request starts; the header timer bounds the wait.
    let mut graceful_after_head = false;
    let mut fired = pin!(shutdown.fired());
    let shutdown_gate = Gate::new();
    // At most four turns: graceful start (once, or deferred once past a head), then the end
    // or a header timeout.
    loop {
        let mut timer = pin!(activity.expired(Timeouts {
            idle: if closing_idle {
                cfg.client_header_timeout
            } else {
                cfg.client_idle_timeout
            },
            header: cfg.client_header_timeout,
            stalled: cfg.stream_idle_timeout,
            idle_enabled: !draining || closing_idle,
        }));
        let timer_gate = Gate::new();
        // The connection first; the side futures only when their own wakers fired (Gate).
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(res));
            }
            // The head completed in that poll (the request started) or the connection went
            // idle: the close can be asked for now.
            if graceful_after_head && !activity.receiving_h1_head() {
                return Poll::Ready(Event::Shutdown);
            }
            if !draining && shutdown_gate.poll(fired.as_mut(), cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            timer_gate.poll(timer.as_mut(), cx).map(Event::Expired)
        })
        .await;
        match event {
            Event::Ended(res) => {
                if let Err(e) = res {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            Event::Shutdown if !graceful_after_head && activity.receiving_h1_head() => {
                debug!(%peer, "shutdown while a request head arrives; closing after its answer");
                graceful_after_head = true;
                activity.close_after_head.store(true, Ordering::Release);
                draining = true;
            }
            Event::Shutdown => {
                graceful_after_head = false;
                graceful(conn.as_mut());
                draining = true;
                closing_idle = true;
                activity.idle_from_now();
            }
            Event::Expired(expiry) => {
                match expiry {
                    Expiry::Idle if closing_idle => {
                        debug!(%peer, "idle connection still open after GOAWAY or shutdown; closing");
                        return;
                    }
                    Expiry::Idle => {
                        debug!(%peer, "idle keep-alive timeout");
                        // Closes an idle h1 connection at once; h2 gets GOAWAY (RFC 9113 §6.8).
                        graceful(conn.as_mut());
                        draining = true;
                        closing_idle = true;
                        activity.idle_from_now();
                    }
                    Expiry::Header => {
                        // RFC 9112 §9.5 lets a server close a connection whose request does not
                        // arrive in time; §4.4 allows "408 or close": we close.
                        debug!(%peer, "client header timeout; closing");
                        return;
                    }
                    Expiry::Stalled => {
                        // Dropping the connection drops its requests: their upstream
                        // exchanges end and their concurrency slots are released.
                        debug!(%peer, timeout = ?cfg.stream_idle_timeout, "no bytes moved with requests in flight; closing");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const HEADER: Duration = Duration::from_secs(10);
    const STALLED: Duration = Duration::from_secs(3600);

    async fn expiry_after(a: &Activity, idle_enabled: bool) -> (Expiry, Duration) {
        let from = Instant::now();
        let e = a
            .expired(Timeouts {
                idle: IDLE,
                header: HEADER,
                stalled: STALLED,
                idle_enabled,
            })
            .await;
        (e, from.elapsed())
    }

    #[tokio::test]
    async fn a_listener_on_one_address_knows_its_local_side_and_a_wildcard_one_asks() {
        let one = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = one.local_addr().expect("addr");
        let side = LocalSide::of(&one);
        assert_eq!(side.fixed, Some(addr));
        assert_eq!(side.port_value, addr.port().to_string().as_str());
        let any = TcpListener::bind("0.0.0.0:0").await.expect("bind");
        let side = LocalSide::of(&any);
        assert_eq!(
            side.fixed, None,
            "a wildcard bind asks each socket (getsockname)"
        );
        let port = any.local_addr().expect("addr").port();
        assert_eq!(side.port_value, port.to_string().as_str());
    }

    #[tokio::test(start_paused = true)]
    async fn h1_first_head_must_arrive_within_the_header_timeout() {
        let a = Activity::new(Protocol::Sniff);
        a.on_read(b"GET / HT");
        assert_eq!(expiry_after(&a, true).await, (Expiry::Header, HEADER));
    }

    #[tokio::test(start_paused = true)]
    async fn h1_keep_alive_idles_then_header_timer_starts_on_first_byte() {
        let a = Activity::new(Protocol::H1);
        drop(a.begin_request());
        assert_eq!(expiry_after(&a, true).await, (Expiry::Idle, IDLE));
        drop(a.begin_request());
        tokio::time::advance(Duration::from_secs(30)).await;
        a.on_read(b"G");
        assert_eq!(expiry_after(&a, true).await, (Expiry::Header, HEADER));
    }

    #[tokio::test(start_paused = true)]
    async fn busy_connection_has_no_timer_until_its_last_request_ends() {
        let a = Activity::new(Protocol::H2);
        let one = a.begin_request();
        let two = a.begin_request();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { expiry_after(&a, true).await })
        };
        // Bytes keep moving (the stall timer is the next test's).
        for _ in 0..3 {
            tokio::time::advance(IDLE).await;
            a.moved();
        }
        assert!(!waiter.is_finished());
        drop(one);
        for _ in 0..3 {
            tokio::time::advance(IDLE).await;
            a.moved();
        }
        assert!(!waiter.is_finished(), "one stream still open");
        drop(two);
        let (e, _) = waiter.await.expect("join");
        assert_eq!(e, Expiry::Idle);
    }

    /// Any flag value is safe: a zero stall timeout turns the check off (and zero or huge
    /// timeouts neither spin nor overflow the clock).
    #[tokio::test(start_paused = true)]
    async fn timer_extremes_neither_spin_nor_panic() {
        let a = Activity::new(Protocol::H1);
        let _req = a.begin_request();
        let t = |stalled| Timeouts {
            idle: Duration::MAX,
            header: Duration::MAX,
            stalled,
            idle_enabled: true,
        };
        for stalled in [Duration::ZERO, Duration::MAX] {
            let waiter = {
                let a = a.clone();
                tokio::spawn(async move { a.expired(t(stalled)).await })
            };
            tokio::time::advance(Duration::from_secs(10 * 365 * 24 * 3600)).await;
            assert!(!waiter.is_finished(), "{stalled:?}: expired");
            waiter.abort();
        }
        // Zero header timeout: a head phase expires at once, without spinning.
        let b = Activity::new(Protocol::H1);
        let e = b
            .expired(Timeouts {
                header: Duration::ZERO,
                ..t(Duration::ZERO)
            })
            .await;
        assert_eq!(e, Expiry::Header);
    }

    /// A busy connection on which no byte moves for the stall timeout expires (noticed at
    /// most one timer step late); bytes moving either way keep it alive.
    #[tokio::test(start_paused = true)]
    async fn busy_connection_without_progress_stalls() {
        let a = Activity::new(Protocol::H1);
        let _req = a.begin_request();
        let (e, after) = expiry_after(&a, true).await;
        assert_eq!(e, Expiry::Stalled);
        assert!(after >= STALLED && after <= STALLED + HEADER, "{after:?}");

        let start = Instant::now();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { expiry_after(&a, true).await })
        };
        // Progress every half stall, reads and writes alike, for three stall periods.
        for i in 0..6 {
            tokio::time::advance(STALLED / 2).await;
            if i % 2 == 0 {
                a.on_read(b"x");
            } else {
                a.moved();
            }
            assert!(!waiter.is_finished(), "stalled at step {i}");
        }
        let (e, _) = waiter.await.expect("join");
        assert_eq!(e, Expiry::Stalled);
        // The last bytes moved three stall periods in; the stall counts from there.
        let total = start.elapsed();
        assert!(
            total >= STALLED * 4 && total <= STALLED * 4 + HEADER * 2,
            "{total:?}"
        );
    }

    /// On HTTP/2 a stream stalls by its own frames: the connection's bytes (the server's
    /// keep-alive PINGs every 20 s and the client's ACKs) keep neither it nor the connection
    /// from timing out, and a frame of the stream restarts its timer.
    #[tokio::test(start_paused = true)]
    async fn an_h2_stream_stalls_by_its_own_frames_not_the_connections_bytes() {
        use http_body_util::BodyExt;
        let a = Activity::new(Protocol::H2);
        a.on_read(H2_PREFACE);
        let _req = a.begin_request();
        let watch = StreamWatch::new();
        *watch.lock() = Some(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        a.watch_stream(&watch);
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { expiry_after(&a, true).await })
        };
        let ping = Duration::from_secs(20);
        let mut elapsed = Duration::ZERO;
        // Half a stall, then one frame of the stream: its timer starts again.
        while elapsed < STALLED / 2 {
            tokio::time::advance(ping).await;
            elapsed += ping;
            a.on_read(b"ping ack");
            a.moved();
        }
        watch.moved();
        let moved_at = elapsed;
        while watch.lock().is_some() {
            assert!(elapsed < STALLED * 3, "the stream never stalled");
            tokio::time::advance(ping).await;
            elapsed += ping;
            a.on_read(b"ping ack");
            a.moved();
        }
        let stalled_after = elapsed - moved_at;
        assert!(
            stalled_after >= STALLED && stalled_after <= STALLED + 2 * HEADER + ping,
            "{stalled_after:?}"
        );
        // Its next poll fails (hyper resets the stream); the connection stays.
        let waker = std::task::Waker::noop();
        let polled = watch.poll_frame(&mut Context::from_waker(waker));
        assert!(matches!(polled, Poll::Ready(Some(Err(_)))));
        assert!(!waiter.is_finished());
        waiter.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn h2_preface_on_the_plain_port_switches_to_the_idle_timer() {
        let a = Activity::new(Protocol::Sniff);
        a.on_read(&H2_PREFACE[..10]);
        a.on_read(&H2_PREFACE[10..]);
        assert_eq!(a.lock().protocol, Protocol::H2);
        // Later frames are not request heads.
        a.on_read(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        assert_eq!(expiry_after(&a, true).await, (Expiry::Idle, IDLE));
    }

    /// HTTP/2 by ALPN: the preface is the first head; a connection that sends nothing (or
    /// part of it) is closed at the header timeout, one that sent it idles.
    #[tokio::test(start_paused = true)]
    async fn an_alpn_h2_connection_waits_for_its_preface_on_the_header_timer() {
        let a = Activity::new(Protocol::H2);
        assert_eq!(expiry_after(&a, true).await, (Expiry::Header, HEADER));
        let a = Activity::new(Protocol::H2);
        a.on_read(&H2_PREFACE[..10]);
        assert_eq!(expiry_after(&a, true).await, (Expiry::Header, HEADER));
        let a = Activity::new(Protocol::H2);
        a.on_read(&H2_PREFACE[..10]);
        a.on_read(&H2_PREFACE[10..]);
        assert_eq!(a.lock().protocol, Protocol::H2);
        assert_eq!(expiry_after(&a, true).await, (Expiry::Idle, IDLE));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timer_is_off_while_draining() {
        let a = Activity::new(Protocol::H2);
        a.on_read(H2_PREFACE);
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { expiry_after(&a, false).await })
        };
        tokio::time::advance(IDLE * 3).await;
        assert!(!waiter.is_finished());
        waiter.abort();
    }

    #[test]
    fn per_connection_accept_errors_are_retried_at_once() {
        assert!(is_per_connection(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        // EMFILE and friends surface as other kinds: backed off.
        assert!(!is_per_connection(&io::Error::from_raw_os_error(24)));
    }
}
