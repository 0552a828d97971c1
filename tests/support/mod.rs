//! Test harness for the request pipeline: serves [`Handler`] through the real listeners (plain
//! and TLS with an rcgen certificate), builds snapshots directly from model types, and provides real
//! hyper backends that misbehave on purpose. Only 127.0.0.1:0 is ever bound.
//!
//! The proxy under test is the product's own listener ([`Proxy`]) around the real handler.

#![allow(dead_code)] // Each test binary uses a different subset of the helpers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

use portico::metrics::Metrics;
use portico::model::{
    Backend, BackendId, BackendKey, BackendTable, Endpoint, HostRoutes, HostTable, IngressRef,
    PathKind, Route, RoutePolicy, RouteTarget, ServicePortRef, Snapshot,
};
use portico::model::{CertKey, HealthCheck, TlsTable};
use portico::proxy::handler::Handler;
use portico::proxy::{Proxy, ProxyConfig, ShutdownTrigger};
use portico::publish::{self, Publisher};

/// Upper bound for any wait in these tests.
pub const DEADLINE: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------
// Proxy under test
// ------------------------------------------------------------------------------------------

/// The product's real listeners ([`Proxy`]) serving the real [`Handler`], on 127.0.0.1:0.
/// Stops (shutdown trigger fired) when dropped.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    /// Root certificate clients must trust for `tls_addr` (SAN `localhost`): every snapshot
    /// built by [`snapshot`] carries it as the default certificate.
    pub tls_root: Option<rustls_pki_types::CertificateDer<'static>>,
    pub publisher: Publisher,
    pub handler: Arc<Handler>,
    pub metrics: Arc<Metrics>,
    pub cfg: Arc<ProxyConfig>,
    _stop: ShutdownTrigger,
}

/// Start the real listeners with `cfg` (addresses forced to 127.0.0.1:0). The HTTPS listener
/// always runs; `tls` only says whether the test wants its address and root.
pub async fn start_proxy(cfg: ProxyConfig, tls: bool) -> TestProxy {
    start_proxy_at(cfg, SocketAddr::from(([127, 0, 0, 1], 0)), tls).await
}

/// [`start_proxy`] with both listeners on `addr` (a loopback address, port 0).
pub async fn start_proxy_at(cfg: ProxyConfig, addr: SocketAddr, tls: bool) -> TestProxy {
    let cfg = ProxyConfig {
        http_addr: addr,
        https_addr: addr,
        ..cfg
    };
    let metrics = Arc::new(Metrics::new());
    let (publisher, reader) = publish::channel();
    let handler = Arc::new(Handler::new(
        Arc::new(cfg.clone()),
        reader.clone(),
        metrics.clone(),
    ));
    let proxy = Proxy::bind_with(cfg.clone(), reader, metrics.clone(), handler.clone())
        .await
        .expect("bind proxy");
    let (addr, https) = (proxy.http_addr(), proxy.https_addr());
    let stop = ShutdownTrigger::new();
    tokio::spawn(proxy.serve(stop.signal()));
    TestProxy {
        addr,
        tls_addr: tls.then_some(https),
        tls_root: tls.then(|| test_cert().1.clone()),
        publisher,
        handler,
        metrics,
        cfg: Arc::new(cfg),
        _stop: stop,
    }
}

/// One self-signed `localhost` certificate per test binary.
fn test_cert() -> &'static (CertKey, rustls_pki_types::CertificateDer<'static>) {
    static CERT: OnceLock<(CertKey, rustls_pki_types::CertificateDer<'static>)> = OnceLock::new();
    CERT.get_or_init(|| {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let der = ck.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let certified = portico::proxy::tls::certified_key(vec![der.clone()], &key).expect("key");
        let cert_key = CertKey {
            key: certified,
            source: Arc::from("test/localhost"),
            material: Arc::from(der.as_ref()),
            validity: None,
        };
        (cert_key, der)
    })
}

// ------------------------------------------------------------------------------------------
// Snapshots
// ------------------------------------------------------------------------------------------

/// One route of a test snapshot.
#[derive(Clone)]
pub struct RouteSpec {
    /// `None` = host-less rule (catch-all); `*.x` = wildcard.
    pub host: Option<String>,
    pub kind: PathKind,
    pub path: String,
    pub ingress: String,
    /// Service name: routes with the same service share one backend.
    pub service: String,
    pub endpoints: Vec<SocketAddr>,
    pub policy: RoutePolicy,
    /// Route exists but its Service is missing.
    pub unavailable: bool,
    /// This is the default backend instead of a path rule.
    pub default_backend: bool,
    /// Active health check of the backend (the first route of a service decides).
    pub health_check: Option<Arc<HealthCheck>>,
}

impl RouteSpec {
    pub fn prefix(host: Option<&str>, path: &str, endpoints: &[SocketAddr]) -> RouteSpec {
        RouteSpec {
            host: host.map(str::to_string),
            kind: PathKind::Prefix,
            path: path.to_string(),
            ingress: "ing".to_string(),
            service: format!("svc-{}", endpoints.first().map_or(0, |a| a.port())),
            endpoints: endpoints.to_vec(),
            policy: RoutePolicy::default(),
            unavailable: false,
            default_backend: false,
            health_check: None,
        }
    }

    pub fn exact(host: Option<&str>, path: &str, endpoints: &[SocketAddr]) -> RouteSpec {
        RouteSpec {
            kind: PathKind::Exact,
            ..RouteSpec::prefix(host, path, endpoints)
        }
    }

    pub fn service(mut self, s: &str) -> Self {
        self.service = s.to_string();
        self
    }

    pub fn ingress(mut self, s: &str) -> Self {
        self.ingress = s.to_string();
        self
    }

    pub fn policy(mut self, f: impl FnOnce(&mut RoutePolicy)) -> Self {
        f(&mut self.policy);
        self
    }

    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.health_check = Some(Arc::new(check));
        self
    }
}

/// Build a snapshot the way translate would: per-host routes in precedence order (longest
/// path first, Exact before Prefix at equal length).
pub fn snapshot(routes: &[RouteSpec]) -> Snapshot {
    let mut backends: Vec<Backend> = Vec::new();
    let mut by_service: HashMap<String, BackendId> = HashMap::new();
    let mut hosts = HostTable::default();
    // Routes per host, collected first: `HostRoutes` is built once, from the sorted list.
    let mut exact: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
    let mut wildcard: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
    let mut catch_all: Vec<Arc<Route>> = Vec::new();
    for spec in routes {
        let target = if spec.unavailable {
            RouteTarget::Unavailable {
                reason: "service missing".to_string(),
            }
        } else {
            let id = *by_service.entry(spec.service.clone()).or_insert_with(|| {
                let mut eps: Vec<Endpoint> = spec
                    .endpoints
                    .iter()
                    .map(|&addr| Endpoint { addr })
                    .collect();
                eps.sort();
                backends.push(Backend {
                    key: BackendKey {
                        namespace: "default".into(),
                        service: spec.service.as_str().into(),
                        port: ServicePortRef::Number(80),
                    },
                    endpoints: eps.into(),
                    draining_fallback: false,
                    health_check: spec.health_check.clone(),
                });
                BackendId(backends.len() as u32 - 1)
            });
            RouteTarget::Backend(id)
        };
        let route = Arc::new(Route {
            kind: spec.kind,
            path: spec.path.clone(),
            ingress: IngressRef {
                namespace: "default".into(),
                name: spec.ingress.as_str().into(),
            },
            target,
            policy: Arc::new(spec.policy.clone()),
        });
        if spec.default_backend {
            hosts.default_route = Some(route);
            continue;
        }
        let entry: &mut Vec<Arc<Route>> = match spec.host.as_deref() {
            None => &mut catch_all,
            Some(h) => match h.strip_prefix("*.") {
                Some(suffix) => wildcard.entry(suffix.to_string()).or_default(),
                None => exact.entry(h.to_string()).or_default(),
            },
        };
        entry.push(route);
    }
    let order = |mut routes: Vec<Arc<Route>>| {
        routes.sort_by(|a, b| {
            b.path
                .len()
                .cmp(&a.path.len())
                .then_with(|| a.kind.cmp(&b.kind))
        });
        HostRoutes::new(routes)
    };
    hosts.exact = exact.into_iter().map(|(h, r)| (h, order(r))).collect();
    hosts.wildcard = wildcard.into_iter().map(|(h, r)| (h, order(r))).collect();
    if !catch_all.is_empty() {
        hosts.catch_all = Some(order(catch_all));
    }
    Snapshot {
        hosts: Arc::new(hosts),
        backends: Arc::new(BackendTable { backends }),
        tls: Arc::new(TlsTable {
            default: Some(test_cert().0.clone()),
            ..TlsTable::default()
        }),
    }
}

// ------------------------------------------------------------------------------------------
// Backends
// ------------------------------------------------------------------------------------------

/// A backend task and what it observed.
pub struct TestBackend {
    pub addr: SocketAddr,
    /// TCP connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// TCP connections open now.
    pub open: Arc<AtomicUsize>,
    /// Requests whose head arrived.
    pub requests: Arc<AtomicUsize>,
    /// Release gated requests (gated backend only).
    pub gate: Arc<Semaphore>,
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).boxed()
}

/// What the echo backend reports, as JSON.
#[derive(Debug, serde::Deserialize)]
pub struct Echo {
    pub name: String,
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: HashMap<String, Vec<String>>,
    pub body_len: usize,
}

impl Echo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// Serve `f` for every request with hyper (h1 + h2c auto-detected), counting connections.
pub async fn serve_backend<F, Fut>(f: F) -> TestBackend
where
    F: Fn(Request<Incoming>, Arc<Semaphore>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Response<BoxBody>> + Send + 'static,
{
    // hyper's default SETTINGS_MAX_CONCURRENT_STREAMS.
    serve_backend_with_stream_limit(200, f).await
}

/// [`serve_backend`] whose HTTP/2 connections allow `streams` concurrent streams.
pub async fn serve_backend_with_stream_limit<F, Fut>(streams: u32, f: F) -> TestBackend
where
    F: Fn(Request<Incoming>, Arc<Semaphore>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Response<BoxBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (acc, live, reqs, g) = (
        accepted.clone(),
        open.clone(),
        requests.clone(),
        gate.clone(),
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            let f = f.clone();
            let reqs = reqs.clone();
            let g = g.clone();
            let live = OpenConn::new(&live);
            tokio::spawn(async move {
                let _live = live;
                let svc = service_fn(move |req| {
                    reqs.fetch_add(1, Ordering::SeqCst);
                    let fut = f(req, g.clone());
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http2().max_concurrent_streams(streams);
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    TestBackend {
        addr,
        accepted,
        open,
        requests,
        gate,
    }
}

/// Counts a backend connection as open until dropped.
struct OpenConn(Arc<AtomicUsize>);

impl OpenConn {
    fn new(count: &Arc<AtomicUsize>) -> OpenConn {
        count.fetch_add(1, Ordering::SeqCst);
        OpenConn(count.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Echo backend: answers 200 with JSON describing the request it received.
pub async fn echo_backend(name: &str) -> TestBackend {
    let name = name.to_string();
    serve_backend(move |req, _| {
        let name = name.clone();
        async move { echo_response(&name, req).await }
    })
    .await
}

async fn echo_response(name: &str, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body_len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for (n, v) in &parts.headers {
        headers
            .entry(n.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let json = serde_json::json!({
        "name": name,
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body_len,
    });
    let mut resp = Response::new(full(json.to_string()));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("hv"));
    resp
}

/// Gated echo backend: each request waits for one permit on `gate` before answering.
pub async fn gated_backend() -> TestBackend {
    serve_backend(|req, gate: Arc<Semaphore>| async move {
        if let Ok(p) = gate.acquire().await {
            p.forget();
        }
        echo_response("gated", req).await
    })
    .await
}

/// Always answers `status` (for retry-on-5xx tests).
pub async fn status_backend(status: u16) -> TestBackend {
    serve_backend(move |_req, _| async move {
        let mut r = Response::new(full("from status backend\n"));
        *r.status_mut() = StatusCode::from_u16(status).expect("status");
        r
    })
    .await
}

/// Switches of a [`switch_backend`], flipped by the test while it runs.
#[derive(Clone, Default)]
pub struct Switches {
    /// Data requests answer 503 while set.
    pub failing: Arc<AtomicBool>,
    /// `GET /healthz` answers 200 while set (the default), else 503.
    pub unhealthy: Arc<AtomicBool>,
    /// `/healthz` requests seen.
    pub probes: Arc<AtomicUsize>,
}

/// Echo backend named `name` whose data answers and `/healthz` can be flipped.
pub async fn switch_backend(name: &str) -> (TestBackend, Switches) {
    let sw = Switches::default();
    let name = name.to_string();
    let s = sw.clone();
    let backend = serve_backend(move |req, _| {
        let name = name.clone();
        let s = s.clone();
        async move {
            let status = if req.uri().path() == "/healthz" {
                s.probes.fetch_add(1, Ordering::SeqCst);
                if s.unhealthy.load(Ordering::SeqCst) {
                    503
                } else {
                    200
                }
            } else if s.failing.load(Ordering::SeqCst) {
                503
            } else {
                return echo_response(&name, req).await;
            };
            let mut r = Response::new(full("switch\n"));
            *r.status_mut() = StatusCode::from_u16(status).expect("status");
            r
        }
    })
    .await;
    (backend, sw)
}

/// Sends response headers that announce extra hop-by-hop headers.
pub async fn hop_by_hop_backend() -> TestBackend {
    serve_backend(|_req, _| async move {
        let mut r = Response::new(full("ok"));
        let h = r.headers_mut();
        h.insert("connection", "x-upstream-private".parse().expect("hv"));
        h.insert("x-upstream-private", "1".parse().expect("hv"));
        h.insert("keep-alive", "timeout=5".parse().expect("hv"));
        h.insert("proxy-connection", "keep-alive".parse().expect("hv"));
        h.insert("upgrade", "h2c".parse().expect("hv"));
        h.insert("x-end-to-end", "1".parse().expect("hv"));
        r
    })
    .await
}

/// An address nothing listens on: connects are refused.
pub async fn refusing_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

/// Raw TCP backend: `on_conn` gets each accepted socket.
pub async fn raw_backend<F, Fut>(on_conn: F) -> TestBackend
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (acc, live) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            let conn = on_conn(stream);
            let live = OpenConn::new(&live);
            tokio::spawn(async move {
                let _live = live;
                conn.await;
            });
        }
    });
    TestBackend {
        addr,
        accepted,
        open,
        requests: Arc::new(AtomicUsize::new(0)),
        gate: Arc::new(Semaphore::new(0)),
    }
}

/// Read until the end of a request head (bounded by size and the deadline).
pub async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 1 << 20 {
        match tokio::time::timeout(DEADLINE, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    buf
}

/// Accepts and reads the request but never answers; holds sockets open until `release`.
pub async fn silent_backend(release: Arc<Notify>) -> TestBackend {
    raw_backend(move |mut s| {
        let release = release.clone();
        async move {
            let _ = read_head(&mut s).await;
            release.notified().await;
        }
    })
    .await
}

/// Reads the request head, then closes without a response (reset before headers).
pub async fn closing_backend() -> TestBackend {
    raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        drop(s);
    })
    .await
}

/// Announces 100 bytes, sends 10, then closes.
pub async fn mid_body_close_backend() -> TestBackend {
    mid_body_backend(Duration::ZERO).await
}

/// Sends a head and part of the body, then nothing, holding the connection open (bounded by
/// the test deadline).
pub async fn mid_body_stall_backend() -> TestBackend {
    mid_body_backend(DEADLINE).await
}

/// Announces 100 bytes, sends 10, holds the connection for `hold`, then closes.
async fn mid_body_backend(hold: Duration) -> TestBackend {
    raw_backend(move |mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
            .await;
        let _ = s.flush().await;
        tokio::time::sleep(hold).await;
        drop(s);
    })
    .await
}

/// h2c backend answering with a body and trailers (gRPC-like).
pub async fn h2c_trailers_backend() -> TestBackend {
    serve_backend(|req, _| async move {
        let version = format!("{:?}", req.version());
        let te = req
            .headers()
            .get("te")
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_default();
        // Request trailers, if the client sent any, are reported back in the body.
        let req_trailer = match req.into_body().collect().await {
            Ok(c) => c
                .trailers()
                .and_then(|t| t.get("x-req-trailer"))
                .map(|v| v.to_str().unwrap_or("").to_string())
                .unwrap_or_default(),
            Err(_) => "body-error".to_string(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(http_body::Frame::data(Bytes::from(format!(
                    "version={version} te={te} trailer={req_trailer}"
                )))))
                .await;
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().expect("hv"));
            trailers.insert("grpc-message", "fine".parse().expect("hv"));
            let _ = tx.send(Ok(http_body::Frame::trailers(trailers))).await;
        });
        let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
        let mut r = Response::new(BodyExt::boxed(body));
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().expect("hv"));
        r
    })
    .await
}

/// Minimal `Stream` over an mpsc receiver (no tokio-stream dependency).
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// WebSocket-style echo: answers the upgrade with 101 and echoes raw bytes afterwards.
pub async fn websocket_backend() -> TestBackend {
    serve_backend(|mut req, _| async move {
        let wants = req
            .headers()
            .get("upgrade")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if !wants {
            let mut r = Response::new(full("not an upgrade"));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        }
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                // Bounded: ends when the peer closes.
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("connection", "upgrade".parse().expect("hv"));
        r.headers_mut()
            .insert("upgrade", "websocket".parse().expect("hv"));
        r
    })
    .await
}

// ------------------------------------------------------------------------------------------
// Clients
// ------------------------------------------------------------------------------------------

/// A collected response.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn echo(&self) -> Echo {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not an echo body ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Send one request over a fresh HTTP/1.1 connection and collect the response.
pub async fn send(addr: SocketAddr, req: Request<BoxBody>) -> Result<Got, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tokio::time::timeout(DEADLINE, tx.send_request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .map_err(|_| "body timeout".to_string())?
        .map_err(|e| format!("body error: {e}"))?
        .to_bytes();
    Ok(Got {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// `GET path` with `Host: host`.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Got {
    let req = Request::get(path)
        .header("host", host)
        .body(full(Bytes::new()))
        .expect("request");
    send(addr, req).await.expect("response")
}

/// Build a request with headers and body.
pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<BoxBody> {
    let mut b = Request::builder().method(method).uri(path);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(full(body)).expect("request")
}

/// Write raw bytes and read the whole reply until the server closes or the deadline passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Status code of the first response in a raw reply (0 when none).
pub fn raw_status(reply: &str) -> u16 {
    reply
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Bounded polling until `cond` holds.
pub async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Shared list collector for tests that record values from backends.
pub type Shared<T> = Arc<Mutex<Vec<T>>>;

/// Proxy settings for tests: defaults without the access log.
pub fn quiet_config() -> ProxyConfig {
    ProxyConfig {
        access_log: false,
        ..ProxyConfig::default()
    }
}

/// A plain-HTTP proxy with [`quiet_config`] serving a snapshot of `routes`.
pub async fn proxy_with(routes: &[RouteSpec]) -> TestProxy {
    let p = start_proxy(quiet_config(), false).await;
    p.publisher.publish(snapshot(routes));
    p
}

/// Start `n` GETs of `host` + `path` that `gate` holds; returns once all reached the backend.
pub async fn hold(
    p: &TestProxy,
    host: &str,
    path: &str,
    n: usize,
    gate: &TestBackend,
) -> Vec<tokio::task::JoinHandle<u16>> {
    let before = gate.requests.load(Ordering::SeqCst);
    let mut held = Vec::new();
    for _ in 0..n {
        let (addr, host, path) = (p.addr, host.to_string(), path.to_string());
        held.push(tokio::spawn(async move {
            get(addr, &host, &path).await.status.as_u16()
        }));
    }
    let requests = gate.requests.clone();
    wait_until(|| requests.load(Ordering::SeqCst) >= before + n).await;
    held
}
