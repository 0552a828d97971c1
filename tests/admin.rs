//! The admin listener over real sockets: health, readiness (first snapshot, draining),
//! Prometheus metrics, 404/405, and stopping on the shutdown trigger.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portico::admin::{Admin, AdminLimits, Health, METRICS_CONTENT_TYPE};
use portico::metrics::Metrics;
use portico::model::Snapshot;
use portico::proxy::{Proxy, ProxyConfig, ShutdownTrigger};
use portico::publish::Publisher;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const DEADLINE: Duration = Duration::from_secs(5);

struct Running {
    addr: SocketAddr,
    publisher: Publisher,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    trigger: ShutdownTrigger,
    serve: JoinHandle<()>,
}

async fn start() -> Running {
    start_with(AdminLimits::default()).await
}

async fn start_with(limits: AdminLimits) -> Running {
    let (publisher, reader) = portico::publish::channel();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let admin = Admin::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        reader,
        metrics.clone(),
        health.clone(),
    )
    .await
    .expect("bind")
    .with_limits(limits);
    let addr = admin.addr();
    let trigger = ShutdownTrigger::new();
    let serve = tokio::spawn(admin.serve(trigger.signal()));
    Running {
        addr,
        publisher,
        health,
        metrics,
        trigger,
        serve,
    }
}

async fn call(addr: SocketAddr, method: Method, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "admin")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = timeout(DEADLINE, send.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

async fn status(addr: SocketAddr, path: &str) -> StatusCode {
    call(addr, Method::GET, path).await.0
}

#[tokio::test]
async fn healthz_and_readyz_follow_first_snapshot_and_draining() {
    let run = start().await;
    assert_eq!(status(run.addr, "/healthz").await, StatusCode::OK);
    assert_eq!(
        status(run.addr, "/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready before the first snapshot"
    );
    run.publisher.publish(Snapshot::default());
    assert_eq!(status(run.addr, "/readyz").await, StatusCode::OK);
    run.health.set_draining(true);
    assert_eq!(
        status(run.addr, "/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "draining"
    );
    assert_eq!(
        status(run.addr, "/healthz").await,
        StatusCode::OK,
        "still alive"
    );
    // Query strings do not change the endpoint.
    assert_eq!(status(run.addr, "/healthz?verbose=1").await, StatusCode::OK);
}

/// Clients that hold admin connections (silent from the start, or idle after a request)
/// cannot lock the kubelet's probes out: silent ones are closed at the header timeout, any
/// connection at the end of its lifetime, so a probe waiting behind a full set of slots is
/// answered well within its deadline.
#[tokio::test]
async fn held_admin_connections_cannot_lock_out_the_probes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limits = AdminLimits {
        max_connections: 4,
        max_connections_per_peer: 16,
        header_timeout: Duration::from_millis(300),
        connection_lifetime: Duration::from_millis(1500),
    };
    let run = start_with(limits).await;
    let mut silent = Vec::new();
    for _ in 0..limits.max_connections {
        silent.push(TcpStream::connect(run.addr).await.expect("connect"));
    }
    assert_eq!(status(run.addr, "/healthz").await, StatusCode::OK);
    drop(silent);

    // Keep-alive connections that asked once and then hold on.
    let mut idle = Vec::new();
    for _ in 0..limits.max_connections {
        let mut c = TcpStream::connect(run.addr).await.expect("connect");
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 12];
        timeout(DEADLINE, c.read_exact(&mut buf))
            .await
            .expect("answered in time")
            .expect("read");
        assert_eq!(&buf, b"HTTP/1.1 200");
        idle.push(c);
    }
    assert_eq!(status(run.addr, "/healthz").await, StatusCode::OK);
}

/// One client that opens connections and holds them gets at most its share of the slots; the
/// rest are closed at once, so a probe from another address is answered without waiting for
/// the held ones to time out.
#[tokio::test]
async fn one_client_cannot_take_every_admin_slot() {
    use tokio::io::AsyncReadExt;
    let limits = AdminLimits {
        max_connections: 8,
        max_connections_per_peer: 4,
        // Longer than the test waits: only the per-peer cap can let the probe in.
        header_timeout: Duration::from_secs(30),
        connection_lifetime: Duration::from_secs(60),
    };
    let run = start_with(limits).await;
    let mut held = Vec::new();
    for _ in 0..limits.max_connections {
        held.push(TcpStream::connect(run.addr).await.expect("connect"));
    }
    // Those over the cap are closed by the server (EOF); the first four stay open.
    let mut closed = 0;
    for c in &mut held[limits.max_connections_per_peer..] {
        let mut buf = [0u8; 1];
        let n = timeout(DEADLINE, c.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0);
        closed += 1;
    }
    assert_eq!(closed, 4);
    // The kubelet, from the node's address.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 2], 0)))
        .expect("bind 127.0.0.2");
    let stream = socket.connect(run.addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/healthz")
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = timeout(DEADLINE, tx.send_request(req))
        .await
        .expect("the probe is answered while the held connections stay open")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    drop(held);
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_open_connections() {
    let run = start().await;
    // A bound proxy on the same registry presents the connection gauges.
    let (_p, reader) = portico::publish::channel();
    let _proxy = Proxy::bind(ProxyConfig::default(), reader, run.metrics.clone())
        .await
        .expect("proxy bind");
    let (status, headers, body) = call(run.addr, Method::GET, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[http::header::CONTENT_TYPE], METRICS_CONTENT_TYPE);
    let text = String::from_utf8(body.to_vec()).expect("utf8");
    assert!(
        text.contains("# TYPE portico_open_connections gauge"),
        "{text}"
    );
    assert!(
        text.contains("portico_open_connections{listener=\"http\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("portico_open_connections{listener=\"https\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_paths_are_404_and_other_methods_405() {
    let run = start().await;
    assert_eq!(status(run.addr, "/").await, StatusCode::NOT_FOUND);
    assert_eq!(status(run.addr, "/healthz/x").await, StatusCode::NOT_FOUND);
    for method in [Method::POST, Method::PUT, Method::DELETE] {
        let (status, headers, _) = call(run.addr, method, "/readyz").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[http::header::ALLOW], "GET, HEAD");
    }
    let (status, _, body) = call(run.addr, Method::HEAD, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty(), "HEAD has no body");
    // Nothing changed state.
    assert!(!run.health.is_draining());
}

#[tokio::test]
async fn admin_stops_on_the_shutdown_trigger() {
    let run = start().await;
    assert_eq!(status(run.addr, "/healthz").await, StatusCode::OK);
    run.trigger.fire();
    timeout(DEADLINE, run.serve)
        .await
        .expect("serve returns")
        .expect("no panic");
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpStream::connect(run.addr).await {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "admin listener closed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
