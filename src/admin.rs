//! Admin listener: `GET /healthz`, `GET /readyz`, `GET /metrics` (brief §4.1), and the
//! [`Health`] draining flag the shutdown sequence flips.
//!
//! Owns: the admin address and its three read-only endpoints; nothing here changes state.
//! May import: publish (readiness), metrics, proxy::listener (the shutdown signal), hyper.
//! Must not import kube, k8s-openapi, translate or the request pipeline.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::proxy::listener::Shutdown;
use crate::publish::Reader;

/// Concurrent admin connections (probes and scrapers are few); more wait in the backlog.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;
/// Concurrent admin connections from one address; more are closed at once. The kubelet (the
/// node's address) holds at most one per probe, a Prometheus replica one: one client that
/// opens connections and holds them cannot take every slot from the probes.
pub const ADMIN_MAX_CONNECTIONS_PER_PEER: usize = 16;
/// An admin client must send its request head within this of connecting.
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an admin connection lives, however it is used (idle keep-alive, a response it
/// does not read): its slot comes back, so clients that hold connections cannot lock the
/// kubelet's probes out for longer than this.
pub const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// After shutdown, open admin connections get this long to finish.
pub const ADMIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after an accept error that is not about one connection (EMFILE...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Content type of the Prometheus text exposition format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Process health shared by the app (which flips it) and the admin server (which reports it).
#[derive(Debug, Default)]
pub struct Health {
    draining: AtomicBool,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set at the start of shutdown: `/readyz` answers 503 from then on so endpoints are
    /// removed before the listeners close (brief §4.4).
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
struct State {
    reader: Reader,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// How many admin connections, and for how long (defaults: the `ADMIN_*` constants).
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub header_timeout: Duration,
    pub connection_lifetime: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            max_connections_per_peer: ADMIN_MAX_CONNECTIONS_PER_PEER,
            header_timeout: ADMIN_HEADER_TIMEOUT,
            connection_lifetime: ADMIN_CONNECTION_LIFETIME,
        }
    }
}

/// The bound admin listener.
pub struct Admin {
    /// Bound address (the real port when asked for 0).
    pub addr: SocketAddr,
    listener: TcpListener,
    state: State,
    limits: AdminLimits,
}

impl Admin {
    pub async fn bind(
        addr: SocketAddr,
        reader: Reader,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> io::Result<Admin> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Admin {
            addr: listener.local_addr()?,
            listener,
            state: State {
                reader,
                metrics,
                health,
            },
            limits: AdminLimits::default(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Other connection limits (tests use short ones).
    pub fn with_limits(mut self, limits: AdminLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Serve until `shutdown` fires; then close the listener, let open connections finish
    /// for up to [`ADMIN_SHUTDOWN_GRACE`] and return.
    pub async fn serve(self, mut shutdown: Shutdown) {
        let Admin {
            listener,
            state,
            limits,
            ..
        } = self;
        // HTTP/1.1 only (kubelet probes and Prometheus speak it): hyper's header timer then
        // runs from the moment the connection opens, where the protocol sniffing of an
        // HTTP/1-or-2 server would wait for a first byte for ever.
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let builder = Arc::new(builder);
        let sem = Arc::new(Semaphore::new(limits.max_connections));
        let peers = Arc::new(Peers::default());
        // Runs until shutdown; each turn accepts one connection or backs off after an error.
        loop {
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = shutdown.fired() => break,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        drop(permit);
                        tokio::select! {
                            _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                            _ = shutdown.fired() => break,
                        }
                        continue;
                    }
                },
                _ = shutdown.fired() => break,
            };
            let Some(peer_slot) = Peers::admit(&peers, peer.ip(), limits.max_connections_per_peer)
            else {
                debug!(%peer, "admin connection refused: too many from this address");
                continue;
            };
            let state = state.clone();
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            let builder = builder.clone();
            let mut conn_shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _peer_slot = peer_slot;
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                let mut conn = std::pin::pin!(conn);
                let res = tokio::select! {
                    res = conn.as_mut() => res,
                    // Dropped at the end of its lifetime, whatever it was doing.
                    () = tokio::time::sleep(limits.connection_lifetime) => Ok(()),
                    _ = conn_shutdown.fired() => {
                        // Idle keep-alives close at once; a request being answered finishes.
                        conn.as_mut().graceful_shutdown();
                        match tokio::time::timeout(ADMIN_SHUTDOWN_GRACE, conn.as_mut()).await {
                            Ok(res) => res,
                            Err(_) => Ok(()),
                        }
                    }
                };
                if let Err(e) = res {
                    debug!(%peer, error = %e, "admin connection error");
                }
            });
        }
        drop(listener);
        // Each connection task holds a permit until it ends; they end within the grace.
        let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(ADMIN_SHUTDOWN_GRACE * 2, sem.acquire_many(all))
            .await
            .is_err()
        {
            debug!("admin connections still open after the grace");
        }
        info!("admin server stopped");
    }
}

/// Open admin connections per client address.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

impl Peers {
    /// A slot for one more connection from `ip`, unless it has `max` open already.
    fn admit(peers: &Arc<Peers>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut open = peers.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: peers.clone(),
            ip,
        })
    }
}

/// One connection's place in [`Peers`], given back when dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The whole admin API. Read-only by construction: it only loads the snapshot pointer, the
/// draining flag and the metrics registry.
fn respond(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    // HEAD is GET without a body (RFC 9110 §9.3.2); hyper drops the body for HEAD.
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        // RFC 9110 §15.5.6: a 405 carries Allow.
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.health.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if !state.reader.is_ready() {
                text(StatusCode::SERVICE_UNAVAILABLE, "no snapshot yet\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        _ => {
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(METRICS_CONTENT_TYPE),
            );
            resp
        }
    }
}
