//! Listener behaviour over real sockets: h1 keep-alive, h2c prior knowledge, the connection
//! cap, idle and header timeouts, and the shutdown sequence (drain, refuse, cut, return).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico::metrics::Metrics;
use portico::proxy::listener::{ServeFuture, ServeRequest};
use portico::proxy::{ConnInfo, Proxy, ProxyBody, ProxyConfig, ShutdownTrigger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const DEADLINE: Duration = Duration::from_secs(5);

/// Test service: answers 200 with what the listener told it; `/hold` stays in flight until
/// the test adds a permit to `release`.
struct TestService {
    started: mpsc::UnboundedSender<String>,
    release: Semaphore,
    seen: Mutex<Vec<ConnInfo>>,
}

impl ServeRequest for TestService {
    fn serve<'a>(&'a self, req: Request<Incoming>, conn: &'a ConnInfo) -> ServeFuture<'a> {
        Box::pin(async move {
            self.seen.lock().expect("lock").push(conn.clone());
            let path = req.uri().path().to_string();
            let _ = self.started.send(path.clone());
            if path == "/upgrade" || path == "/upgrade-hold" {
                // Answer 101 and echo what the client writes on the upgraded stream; with
                // `-hold`, keep echoing until the stream ends and report how it ended.
                let upgrade = hyper::upgrade::on(req);
                let report = self.started.clone();
                let hold = path == "/upgrade-hold";
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 64];
                    for _ in 0..1000 {
                        match io.read(&mut buf).await {
                            Ok(0) => {
                                let _ = report.send("upgrade ended: eof".into());
                                return;
                            }
                            Ok(n) => {
                                let _ = io.write_all(&buf[..n]).await;
                            }
                            Err(e) => {
                                let _ = report.send(format!("upgrade ended: {:?}", e.kind()));
                                return;
                            }
                        }
                        if !hold {
                            return;
                        }
                    }
                });
                let mut resp: Response<ProxyBody> =
                    Response::new(Empty::new().map_err(|never| match never {}).boxed());
                *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                resp.headers_mut()
                    .insert(http::header::UPGRADE, "echo".parse().expect("hv"));
                resp.headers_mut()
                    .insert(http::header::CONNECTION, "upgrade".parse().expect("hv"));
                return resp;
            }
            if path == "/hold" {
                let permit = self.release.acquire().await.expect("semaphore open");
                permit.forget();
            }
            let body = Full::new(Bytes::from(format!("{path}\n")))
                .map_err(|never| match never {})
                .boxed();
            let mut resp: Response<ProxyBody> = Response::new(body);
            resp.headers_mut().insert(
                "x-version",
                format!("{:?}", req.version()).parse().expect("header"),
            );
            resp
        })
    }
}

struct Running {
    http: SocketAddr,
    trigger: ShutdownTrigger,
    serve: JoinHandle<()>,
    service: Arc<TestService>,
    started: mpsc::UnboundedReceiver<String>,
    metrics: Arc<Metrics>,
}

async fn start(cfg: ProxyConfig) -> Running {
    let (tx, rx) = mpsc::unbounded_channel();
    let service = Arc::new(TestService {
        started: tx,
        release: Semaphore::new(0),
        seen: Mutex::new(Vec::new()),
    });
    let metrics = Arc::new(Metrics::new());
    let (_publisher, reader) = portico::publish::channel();
    let proxy = Proxy::bind_with(cfg, reader, metrics.clone(), service.clone())
        .await
        .expect("bind");
    let http = proxy.http_addr;
    let trigger = ShutdownTrigger::new();
    let serve = tokio::spawn(proxy.serve(trigger.signal()));
    Running {
        http,
        trigger,
        serve,
        service,
        started: rx,
        metrics,
    }
}

fn cfg() -> ProxyConfig {
    ProxyConfig {
        shutdown_grace: Duration::from_secs(5),
        ..ProxyConfig::default()
    }
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1.1 client connection; the handle resolves when the server closes it.
async fn h1(addr: SocketAddr) -> (H1, JoinHandle<Result<(), hyper::Error>>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1 handshake");
    (send, tokio::spawn(conn))
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(path)
        .header(http::header::HOST, "example.com")
        .body(Empty::new())
        .expect("request")
}

async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf8")
}

/// Bounded wait for `handle` to finish.
async fn finishes<T>(handle: JoinHandle<T>) -> T {
    timeout(DEADLINE, handle)
        .await
        .expect("finished before the deadline")
        .expect("task did not panic")
}

fn open_connections(metrics: &Metrics, listener: &str) -> i64 {
    metrics
        .open_connections
        .with_label_values(&[listener])
        .get()
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_as_http2() {
    let run = start(cfg()).await;
    let tcp = TcpStream::connect(run.http).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://example.com/h2c")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.headers()["x-version"], "HTTP/2.0");
    let seen = run.service.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].tls);
    assert!(seen[0].sni.is_none());
}

#[tokio::test]
async fn h1_keep_alive_serves_many_requests_on_one_connection() {
    let run = start(cfg()).await;
    let (mut send, conn) = h1(run.http).await;
    for i in 0..3 {
        send.ready().await.expect("ready");
        let resp = send
            .send_request(get(&format!("/r{i}")))
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), Version::HTTP_11);
        assert_eq!(body_text(resp).await, format!("/r{i}\n"));
    }
    assert!(!conn.is_finished(), "keep-alive connection stays open");
    let seen = run.service.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|c| c.peer == seen[0].peer),
        "one connection"
    );
    assert_eq!(seen[0].local, run.http);
    assert_eq!(open_connections(&run.metrics, "http"), 1);
}

#[tokio::test]
async fn http11_upgrade_is_handed_to_the_service() {
    // WebSockets need the connection served with upgrades (RFC 9110 §7.8).
    let run = start(cfg()).await;
    let tcp = TcpStream::connect(run.http).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn.with_upgrades());
    let req = Request::builder()
        .uri("/upgrade")
        .header(http::header::HOST, "example.com")
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "echo")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = timeout(DEADLINE, hyper::upgrade::on(resp))
        .await
        .expect("in time")
        .expect("upgraded");
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    timeout(DEADLINE, io.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn upgraded_connection_keeps_its_slot_and_is_cut_after_the_grace() {
    let mut run = start(ProxyConfig {
        shutdown_grace: Duration::from_millis(300),
        ..cfg()
    })
    .await;
    let tcp = TcpStream::connect(run.http).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn.with_upgrades());
    let req = Request::builder()
        .uri("/upgrade-hold")
        .header(http::header::HOST, "example.com")
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "echo")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(run.started.recv().await.as_deref(), Some("/upgrade-hold"));
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"));
    // A round trip proves the upgraded stream is live (and hyper is done with it).
    io.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    timeout(DEADLINE, io.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(open_connections(&run.metrics, "http"), 1, "still counted");

    let from = Instant::now();
    run.trigger.fire();
    finishes(run.serve).await;
    assert!(
        from.elapsed() >= Duration::from_millis(250),
        "the upgraded stream got the grace"
    );
    let ended = timeout(DEADLINE, run.started.recv())
        .await
        .expect("in time");
    assert_eq!(ended.as_deref(), Some("upgrade ended: ConnectionAborted"));
    assert_eq!(open_connections(&run.metrics, "http"), 0);
}

#[tokio::test]
async fn max_connections_applies_backpressure_not_errors() {
    let run = start(ProxyConfig {
        max_connections: 2,
        ..cfg()
    })
    .await;
    let (mut a, a_conn) = h1(run.http).await;
    let (mut b, _b_conn) = h1(run.http).await;
    for s in [&mut a, &mut b] {
        let resp = s.send_request(get("/")).await.expect("served");
        assert_eq!(resp.status(), StatusCode::OK);
        // Read the body: an unread body makes the client close the connection.
        assert_eq!(body_text(resp).await, "/\n");
    }
    assert_eq!(open_connections(&run.metrics, "http"), 2);

    // The third TCP connection completes in the kernel backlog but is not accepted.
    let (mut c, _c_conn) = h1(run.http).await;
    let pending = tokio::spawn(async move { c.send_request(get("/third")).await });
    // A window in which the request must NOT be answered: asserting an absence needs time
    // to pass; nothing here waits for an event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "third connection not served while at the cap"
    );
    assert_eq!(open_connections(&run.metrics, "http"), 2);

    // Closing one connection lets the third one in, and it is served normally.
    drop(a);
    finishes(a_conn).await.expect("clean close");
    let resp = finishes(pending).await.expect("third served, no error");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "/third\n");
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let run = start(ProxyConfig {
        client_idle_timeout: Duration::from_millis(300),
        ..cfg()
    })
    .await;
    let (mut send, conn) = h1(run.http).await;
    let resp = send.send_request(get("/")).await.expect("response");
    assert_eq!(body_text(resp).await, "/\n");
    let idle_from = Instant::now();
    finishes(conn).await.expect("server closed cleanly");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(250),
        "closed too early: {idle:?}"
    );
    // The slot is given back.
    let deadline = Instant::now() + DEADLINE;
    while open_connections(&run.metrics, "http") != 0 {
        assert!(Instant::now() < deadline, "gauge back to 0");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn idle_h2c_connection_is_closed_after_idle_timeout() {
    let run = start(ProxyConfig {
        client_idle_timeout: Duration::from_millis(300),
        ..cfg()
    })
    .await;
    let tcp = TcpStream::connect(run.http).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://example.com/")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    // GOAWAY after the idle timeout ends the client connection.
    finishes(conn).await.expect("clean GOAWAY close");
}

/// A raw h2c connection that has sent the preface and an empty SETTINGS frame, nothing else.
async fn raw_h2c(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface and SETTINGS");
    tcp
}

/// An h2 client that acknowledges SETTINGS but never the PING that comes with the idle
/// GOAWAY would keep its connection (and slot) for ever: once asked to close, a connection that
/// stays idle for the header timeout is dropped.
#[tokio::test]
async fn an_idle_h2_client_that_ignores_goaway_is_dropped() {
    let run = start(ProxyConfig {
        client_idle_timeout: Duration::from_millis(300),
        client_header_timeout: Duration::from_millis(300),
        ..cfg()
    })
    .await;
    let mut tcp = raw_h2c(run.http).await;
    let from = Instant::now();
    // Read frames until the server closes: acknowledge SETTINGS, ignore everything else.
    let closed = timeout(DEADLINE, async {
        let mut head = [0u8; 9];
        loop {
            if tcp.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if tcp.read_exact(&mut payload).await.is_err() {
                return;
            }
            if head[3] == 0x4 && head[4] & 0x1 == 0 {
                let _ = tcp.write_all(b"\0\0\0\x04\x01\0\0\0\0").await;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection outlived the deadline");
    assert!(
        from.elapsed() >= Duration::from_millis(550),
        "{:?}",
        from.elapsed()
    );
}

/// At shutdown, an idle h2 client that never acknowledges the GOAWAY's PING is dropped after
/// the header timeout, not kept for the whole grace.
#[tokio::test]
async fn shutdown_drops_an_idle_h2_client_that_ignores_goaway_before_the_grace() {
    let run = start(ProxyConfig {
        client_header_timeout: Duration::from_millis(300),
        shutdown_grace: Duration::from_secs(30),
        ..cfg()
    })
    .await;
    let mut tcp = raw_h2c(run.http).await;
    // The server's SETTINGS arrived: the connection is established (and idle).
    let mut head = [0u8; 9];
    tcp.read_exact(&mut head).await.expect("server SETTINGS");
    assert_eq!(head[3], 0x4);
    let from = Instant::now();
    run.trigger.fire();
    timeout(DEADLINE, run.serve)
        .await
        .expect("serve returned well before the 30 s grace")
        .expect("serve task");
    assert!(
        from.elapsed() < Duration::from_secs(10),
        "{:?}",
        from.elapsed()
    );
    drop(tcp);
}

#[tokio::test]
async fn keep_alive_outlives_the_header_timeout() {
    // The header timer must not run while a keep-alive connection waits for its next
    // request (brief §4.4: header 10 s, idle 60 s).
    let run = start(ProxyConfig {
        client_header_timeout: Duration::from_millis(200),
        client_idle_timeout: Duration::from_secs(10),
        ..cfg()
    })
    .await;
    let (mut send, conn) = h1(run.http).await;
    let resp = send.send_request(get("/one")).await.expect("response");
    assert_eq!(body_text(resp).await, "/one\n");
    // Let three header timeouts pass while idle: this is the behaviour under test, not a
    // stand-in for synchronisation.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !conn.is_finished(),
        "idle keep-alive survived the header timeout"
    );
    send.ready().await.expect("still usable");
    let resp = send.send_request(get("/two")).await.expect("response");
    assert_eq!(body_text(resp).await, "/two\n");
}

#[tokio::test]
async fn header_timeout_closes_a_slowloris_client() {
    let run = start(ProxyConfig {
        client_header_timeout: Duration::from_millis(300),
        client_idle_timeout: Duration::from_secs(30),
        ..cfg()
    })
    .await;
    // A head that never completes.
    let mut slow = TcpStream::connect(run.http).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\n")
        .await
        .expect("write");
    // A connection that never sends anything.
    let mut silent = TcpStream::connect(run.http).await.expect("connect");
    let from = Instant::now();
    for sock in [&mut slow, &mut silent] {
        let mut buf = Vec::new();
        let read = timeout(DEADLINE, sock.read_to_end(&mut buf))
            .await
            .expect("closed before the deadline");
        // EOF or a reset: either way no response was sent.
        if read.is_ok() {
            assert!(
                buf.is_empty(),
                "no response: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
    }
    assert!(from.elapsed() >= Duration::from_millis(250));
    assert!(run.service.seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn shutdown_drains_in_flight_refuses_new_and_returns() {
    let mut run = start(cfg()).await;
    // An in-flight request.
    let (mut busy, busy_conn) = h1(run.http).await;
    let in_flight = tokio::spawn(async move { busy.send_request(get("/hold")).await });
    assert_eq!(run.started.recv().await.as_deref(), Some("/hold"));
    // An idle keep-alive h1 connection and an idle h2c connection.
    let (mut idle, idle_conn) = h1(run.http).await;
    let resp = idle.send_request(get("/")).await.expect("response");
    assert_eq!(body_text(resp).await, "/\n");
    let tcp = TcpStream::connect(run.http).await.expect("connect");
    let (_h2, h2_conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    let h2_conn = tokio::spawn(h2_conn);

    run.trigger.fire();

    // Idle connections close at once (h1: close; h2: GOAWAY).
    finishes(idle_conn).await.expect("idle h1 closed");
    // The h2 client may still be writing (e.g. its PING ack) when the server closes after
    // GOAWAY, so a broken pipe is as good an end as a clean one: what matters is the end.
    let _ = finishes(h2_conn).await;
    // The listener is closed: new connections are refused.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpStream::connect(run.http).await {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "listener closed after trigger");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // The in-flight request is still being waited for.
    assert!(
        !run.serve.is_finished(),
        "serve waits for the in-flight request"
    );
    run.service.release.add_permits(1);
    let resp = finishes(in_flight)
        .await
        .expect("in-flight request completes");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "/hold\n");
    finishes(busy_conn)
        .await
        .expect("closed after its last response");
    finishes(run.serve).await;
}

/// A shutdown that comes while a request head is arriving waits for it: the request is
/// answered, with `Connection: close`, instead of its connection being dropped unanswered
/// (hyper counts a connection idle until it has a whole head), on a new connection and on a
/// keep-alive one alike.
#[tokio::test]
async fn shutdown_answers_a_request_whose_head_was_arriving() {
    let mut run = start(cfg()).await;
    let mut fresh = TcpStream::connect(run.http).await.expect("connect");
    fresh
        .write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    let mut kept = TcpStream::connect(run.http).await.expect("connect");
    kept.write_all(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(run.started.recv().await.as_deref(), Some("/1"));
    let mut first = Vec::new();
    while !first.ends_with(b"/1\n") {
        let mut buf = [0u8; 512];
        let n = timeout(DEADLINE, kept.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&first));
        first.extend_from_slice(&buf[..n]);
    }
    kept.write_all(b"GET /b HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    // A whole exchange on a third connection, after the partial heads were written; its
    // connection, idle then, closes once the shutdown reached the connections.
    let (mut probe, probe_conn) = h1(run.http).await;
    let resp = probe.send_request(get("/")).await.expect("response");
    assert_eq!(body_text(resp).await, "/\n");
    run.trigger.fire();
    finishes(probe_conn).await.expect("idle connection closed");
    for (mut conn, path) in [(fresh, "/a"), (kept, "/b")] {
        conn.write_all(b"\r\n").await.expect("rest of the head");
        let mut reply = Vec::new();
        timeout(DEADLINE, conn.read_to_end(&mut reply))
            .await
            .expect("closed in time")
            .expect("read");
        let reply = String::from_utf8_lossy(&reply).to_ascii_lowercase();
        assert!(reply.starts_with("http/1.1 200"), "{path}: {reply:?}");
        assert!(reply.contains("connection: close"), "{path}: {reply:?}");
        assert!(reply.ends_with(&format!("{path}\n")), "{path}: {reply:?}");
    }
    finishes(run.serve).await;
}

#[tokio::test]
async fn shutdown_cuts_connections_still_open_after_the_grace() {
    let mut run = start(ProxyConfig {
        shutdown_grace: Duration::from_millis(300),
        ..cfg()
    })
    .await;
    let (mut busy, busy_conn) = h1(run.http).await;
    let in_flight = tokio::spawn(async move { busy.send_request(get("/hold")).await });
    assert_eq!(run.started.recv().await.as_deref(), Some("/hold"));
    let from = Instant::now();
    run.trigger.fire();
    finishes(run.serve).await;
    assert!(
        from.elapsed() >= Duration::from_millis(250),
        "grace was given"
    );
    // Never released: the request was cut, not completed.
    assert!(finishes(in_flight).await.is_err(), "cut request fails");
    let _ = finishes(busy_conn).await;
    assert_eq!(open_connections(&run.metrics, "http"), 0);
}

/// Send `head` raw and return the response status line.
async fn raw_status_line(addr: SocketAddr, head: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(head).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    // Bounded: at most 64 reads, each within the deadline.
    for _ in 0..64 {
        let n = timeout(DEADLINE, tcp.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        got.extend_from_slice(&buf[..n]);
        if n == 0 || got.windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn oversize_request_line_and_header_block_reach_the_handler() {
    // The handler answers 414/431 itself (brief §4.4), so hyper's buffer must let a request
    // line over 8 KiB and a header block near 64 KiB through.
    let run = start(cfg()).await;
    let mut head = format!(
        "GET /{} HTTP/1.1\r\nHost: example.com\r\n",
        "a".repeat(9000)
    );
    for i in 0..50 {
        head.push_str(&format!("X-Pad-{i}: {}\r\n", "v".repeat(1200)));
    }
    head.push_str("Connection: close\r\n\r\n");
    assert!(head.len() > 64 * 1024 - 4096);
    assert_eq!(
        raw_status_line(run.http, head.as_bytes()).await,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(run.service.seen.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn more_headers_than_the_limit_get_431() {
    let run = start(cfg()).await;
    let mut head = String::from("GET / HTTP/1.1\r\nHost: example.com\r\n");
    for i in 0..100 {
        head.push_str(&format!("X-H-{i}: v\r\n"));
    }
    head.push_str("\r\n");
    // 101 header fields with Host, over the default limit of 100 (RFC 6585 §5).
    assert_eq!(
        raw_status_line(run.http, head.as_bytes()).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert!(run.service.seen.lock().expect("lock").is_empty());
}
