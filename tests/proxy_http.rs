//! Request pipeline end to end: a real hyper server running `Handler`, real hyper backends,
//! real sockets on 127.0.0.1:0. Brief §4.3/§4.4 rules, one topic per test.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use portico::model::{RoutePolicy, SslRedirect, UpstreamProtocol};
use portico::proxy::ProxyConfig;
use support::*;

fn cfg() -> ProxyConfig {
    quiet_config()
}

// ---------------------------------------------------------------- routing and status codes

#[tokio::test]
async fn before_first_snapshot_every_request_is_503() {
    let p = start_proxy(cfg(), false).await;
    let got = get(p.addr, "a.example", "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.headers["content-type"], "text/plain; charset=utf-8");
}

#[tokio::test]
async fn routes_by_host_and_path_precedence() {
    let exact_host = echo_backend("exact-host").await;
    let api = echo_backend("api").await;
    let api_exact = echo_backend("api-exact").await;
    let wild = echo_backend("wild").await;
    let catch = echo_backend("catch").await;
    let p = proxy_with(&[
        RouteSpec::prefix(Some("a.example"), "/", &[exact_host.addr]),
        RouteSpec::prefix(Some("a.example"), "/api", &[api.addr]),
        RouteSpec::exact(Some("a.example"), "/api", &[api_exact.addr]),
        RouteSpec::prefix(Some("*.wild.example"), "/", &[wild.addr]),
        RouteSpec::prefix(None, "/", &[catch.addr]),
    ])
    .await;
    let cases = [
        ("a.example", "/", "exact-host"),
        ("A.EXAMPLE:8080", "/x", "exact-host"),
        ("a.example", "/api", "api-exact"),
        ("a.example", "/api/", "api"),
        ("a.example", "/api/v1", "api"),
        ("a.example", "/apix", "exact-host"),
        ("x.wild.example", "/", "wild"),
        ("x.y.wild.example", "/", "catch"),
        ("wild.example", "/", "catch"),
        ("other.example", "/q", "catch"),
    ];
    for (host, path, want) in cases {
        let got = get(p.addr, host, path).await;
        assert_eq!(got.status, StatusCode::OK, "{host}{path}");
        assert_eq!(got.echo().name, want, "{host}{path}");
    }
}

#[tokio::test]
async fn unknown_host_is_404_or_default_backend() {
    let a = echo_backend("a").await;
    let p = proxy_with(&[RouteSpec::prefix(Some("a.example"), "/app", &[a.addr])]).await;
    assert_eq!(get(p.addr, "b.example", "/").await.status, 404);
    assert_eq!(get(p.addr, "a.example", "/other").await.status, 404);
    let got = get(p.addr, "b.example", "/").await;
    assert_eq!(got.text(), "Not Found\n");

    let d = echo_backend("default").await;
    let mut default = RouteSpec::prefix(None, "/", &[d.addr]);
    default.default_backend = true;
    p.publisher.publish(snapshot(&[
        RouteSpec::prefix(Some("a.example"), "/app", &[a.addr]),
        default,
    ]));
    assert_eq!(get(p.addr, "b.example", "/").await.echo().name, "default");
    assert_eq!(
        get(p.addr, "a.example", "/other").await.echo().name,
        "default"
    );
}

#[tokio::test]
async fn missing_service_or_no_endpoints_is_503() {
    let mut gone = RouteSpec::prefix(Some("gone.example"), "/", &[]);
    gone.unavailable = true;
    let p = proxy_with(&[
        gone,
        RouteSpec::prefix(Some("empty.example"), "/", &[]).service("empty"),
    ])
    .await;
    assert_eq!(get(p.addr, "gone.example", "/").await.status, 503);
    let got = get(p.addr, "empty.example", "/").await;
    assert_eq!(got.status, 503);
    assert_eq!(got.text(), "Service Unavailable\n");
}

#[tokio::test]
async fn refused_on_every_endpoint_is_502_without_leaking_addresses() {
    let dead1 = refusing_addr().await;
    let dead2 = refusing_addr().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[dead1, dead2])]).await;
    let got = get(p.addr, "x", "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let text = got.text();
    assert_eq!(text, "Bad Gateway\n");
    assert!(!text.contains("127.0.0.1"));
    let errors = p
        .metrics
        .upstream_connect_errors
        .with_label_values(&["default", &format!("svc-{}", dead1.port())])
        .get();
    assert_eq!(errors, 2, "both endpoints tried once");
}

#[tokio::test]
async fn no_response_headers_within_read_timeout_is_504() {
    let release = Arc::new(Notify::new());
    let silent = silent_backend(release.clone()).await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[silent.addr])
        .policy(|p| p.read_timeout = Duration::from_millis(200))])
    .await;
    let got = get(p.addr, "x", "/").await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    release.notify_waiters();
}

/// The read timeout counts from the end of the upload: a client sending its body more slowly
/// than the timeout in all, but never idle that long, is answered; an upstream that answers
/// nothing once the body is in still gets 504.
#[tokio::test]
async fn a_slow_upload_is_not_an_upstream_timeout() {
    let b = echo_backend("b").await;
    let timeout = Duration::from_millis(300);
    let p =
        proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr]).policy(|p| p.read_timeout = timeout)])
            .await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n")
        .await
        .expect("write");
    // The property under test is a duration: one byte every third of the timeout, so the
    // upload takes three timeouts and more.
    for byte in b"0123456789" {
        tokio::time::sleep(timeout / 3).await;
        s.write_all(&[*byte]).await.expect("write");
    }
    let reply = read_one_response(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"body_len\":10"), "{reply}");

    let release = Arc::new(Notify::new());
    let silent = silent_backend(release.clone()).await;
    let p = proxy_with(&[
        RouteSpec::prefix(None, "/", &[silent.addr]).policy(|p| p.read_timeout = timeout)
    ])
    .await;
    let got = send(p.addr, request("POST", "/", &[("host", "x")], "body"))
        .await
        .expect("response");
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    release.notify_waiters();
}

/// A client that stops sending its body for the read timeout gets 408 (nginx's
/// `client_body_timeout`), and it does not count against the upstream: more stalled uploads
/// than the passive-health threshold leave both endpoints serving.
#[tokio::test]
async fn a_stalled_upload_is_408_and_not_the_upstreams_fault() {
    let a = echo_backend("a").await;
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[a.addr, b.addr])
        .policy(|p| p.read_timeout = Duration::from_millis(200))])
    .await;
    for i in 0..6 {
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n01234")
            .await
            .expect("write");
        let reply = read_one_response(&mut s).await;
        assert!(reply.starts_with("HTTP/1.1 408"), "upload {i}: {reply}");
    }
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..4 {
        names.insert(get(p.addr, "x", "/").await.echo().name);
    }
    assert_eq!(names.len(), 2, "an endpoint was ejected: {names:?}");
}

/// An upstream that stops reading the request body (its socket buffers full) is timed out
/// like one that does not answer: the upload cannot be the client's fault then.
#[tokio::test]
async fn an_upstream_that_stops_reading_the_body_is_504() {
    // A backend with a tiny receive buffer that reads the head and then nothing.
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    sock.set_nonblocking(true).expect("nonblocking");
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .expect("addr")
            .into(),
    )
    .expect("bind");
    sock.listen(16).expect("listen");
    let listener = tokio::net::TcpListener::from_std(sock.into()).expect("listener");
    let addr = listener.local_addr().expect("addr");
    let release = Arc::new(Notify::new());
    let hold = release.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = read_head(&mut s).await;
            held.push(s);
            let hold = hold.clone();
            tokio::spawn(async move { hold.notified().await });
        }
    });
    let timeout = Duration::from_millis(300);
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[addr]).policy(|p| {
        p.read_timeout = timeout;
        p.body_limit = 0;
    })])
    .await;
    let s = TcpStream::connect(p.addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    const BODY: usize = 64 << 20;
    let writer = tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {BODY}\r\n\r\n");
        wr.write_all(head.as_bytes()).await.expect("head");
        let chunk = vec![b'x'; 64 << 10];
        let mut sent = 0;
        // Bounded: stops at the body's length, or when portico stops reading.
        while sent < BODY {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
    });
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(DEADLINE, rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => reply.extend_from_slice(&buf[..n]),
            other => panic!("no response head: {other:?}"),
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 504"), "{reply}");
    writer.abort();
    release.notify_waiters();
}

#[tokio::test]
async fn content_length_over_limit_is_413_before_upstream() {
    let b = echo_backend("b").await;
    let p =
        proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr]).policy(|p| p.body_limit = 10)]).await;
    let got = send(
        p.addr,
        request("POST", "/", &[("host", "x")], vec![b'a'; 11]),
    )
    .await
    .expect("response");
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        0,
        "upstream never contacted"
    );
    // At the limit is fine.
    let got = send(
        p.addr,
        request("POST", "/", &[("host", "x")], vec![b'a'; 10]),
    )
    .await
    .expect("response");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.echo().body_len, 10);
}

#[tokio::test]
async fn chunked_body_crossing_limit_is_413() {
    let b = echo_backend("b").await;
    let p =
        proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr]).policy(|p| p.body_limit = 16)]).await;
    let reply = raw(
        p.addr,
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
          a\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&reply), 413, "{reply}");
    // Under the limit the same framing passes with its body.
    let reply = raw(
        p.addr,
        b"POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n\
          a\r\n0123456789\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert!(reply.contains("\"body_len\":10"), "{reply}");
}

#[tokio::test]
async fn long_target_is_414_and_large_header_block_is_431() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let long_path = format!("/{}", "a".repeat(p.cfg.max_request_line + 1));
    let got = get(p.addr, "x", &long_path).await;
    assert_eq!(got.status, StatusCode::URI_TOO_LONG);

    // 40 headers of 2 KiB each: 80 KiB > 64 KiB, but fewer than max_headers.
    let big = "v".repeat(2048);
    let names: Vec<String> = (0..40).map(|i| format!("x-h{i}")).collect();
    let mut headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), big.as_str())).collect();
    headers.push(("host", "x"));
    let got = send(p.addr, request("GET", "/", &headers, Bytes::new()))
        .await
        .expect("response");
    assert_eq!(got.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    // Over max_headers: hyper itself answers 431.
    let names: Vec<String> = (0..=p.cfg.max_headers).map(|i| format!("x-n{i}")).collect();
    let mut headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    headers.push(("host", "x"));
    let got = send(p.addr, request("GET", "/", &headers, Bytes::new()))
        .await
        .expect("response");
    assert_eq!(got.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn malformed_host_and_targets_are_400() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let cases: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: user@x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        b"GET http://user@x/ HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /a\\b HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /static/..%2Fsecret HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /x%5C..%5Cy HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /%zz HTTP/1.1\r\nhost: x\r\n\r\n",
        // Outside the URI grammar's authority (RFC 3986 §3.2, RFC 9112 §3.2).
        b"GET / HTTP/1.1\r\nhost: a{b}\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a|b\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a^b\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x:1:2\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x:port\r\n\r\n",
    ];
    for req in cases {
        let reply = raw(p.addr, req).await;
        assert_eq!(
            raw_status(&reply),
            400,
            "{:?} -> {reply}",
            String::from_utf8_lossy(req)
        );
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

/// Framing errors hyper rejects itself, before the handler runs (recorded for the lead):
/// with `max_buf_size` = request line + header limit + 16 KiB and `max_headers` = 100,
/// every case below is a 400 from hyper's parser. `Transfer-Encoding: gzip` is also a 400
/// from hyper (not 501): hyper refuses any request TE whose last coding is not chunked, so the
/// handler's 501 is reachable only for codings hyper lets through.
#[tokio::test]
async fn ambiguous_framing_is_400() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let cases: &[(&str, &[u8])] = &[
        (
            "duplicate differing content-length",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n  folded\r\n\r\n",
        ),
        (
            "whitespace before colon",
            b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
        ),
        (
            "chunked not last",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
        ),
        (
            "unknown transfer coding",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
        ),
        (
            "invalid content-length",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: +3\r\n\r\nabc",
        ),
    ];
    for (name, req) in cases {
        let reply = raw(p.addr, req).await;
        assert_eq!(raw_status(&reply), 400, "{name}: {reply}");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

/// Write `bytes`, read until the proxy closes; `closed` is false if the deadline came first.
async fn raw_until_closed<S>(s: &mut S, bytes: &[u8]) -> (String, bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Read exactly one response (Content-Length or chunked body) off a keep-alive connection.
async fn read_one_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let body = &text[end + 4..];
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let complete = match len {
                Some(n) => body.len() >= n,
                None => body.ends_with("0\r\n\r\n"),
            };
            if complete {
                return text;
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed before a full response: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// CL + TE (RFC 9112 §6.3 item 3), in either header order, is 400 and close (brief §4.4):
/// the backend never sees it and a request pipelined behind it is never answered.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_400_and_closes() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let cases: [&[u8]; 2] = [
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nhost: x\r\nContent-Length: 4\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    ];
    for req in cases {
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        let (reply, closed) = raw_until_closed(&mut s, req).await;
        assert_eq!(raw_status(&reply), 400, "{reply}");
        assert!(reply.contains("connection: close"), "{reply}");
        assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{reply}");
        assert!(closed, "connection left open: {reply}");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

/// The guard follows bodies on keep-alive connections, so CL + TE is caught as the *second*
/// request after a chunked POST and after a Content-Length POST, sent after the first
/// response or pipelined with it.
#[tokio::test]
async fn content_length_with_transfer_encoding_after_a_keep_alive_post_is_400() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let second: &[u8] = b"POST /second HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\
        transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let firsts: [(&str, &[u8]); 2] = [
        (
            "chunked",
            b"POST /first HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
              4;x=y\r\nbody\r\n2\r\n!!\r\n0\r\ntrailer: t\r\n\r\n",
        ),
        (
            "content-length",
            b"POST /first HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nbody!!",
        ),
    ];
    let mut expected_requests = 0;
    for (name, first) in firsts {
        for pipelined in [false, true] {
            let mut s = TcpStream::connect(p.addr).await.expect("connect");
            let (one, rest) = if pipelined {
                let (reply, closed) = raw_until_closed(&mut s, &[first, second].concat()).await;
                assert!(closed, "{name}: connection left open: {reply}");
                let at = reply.find("HTTP/1.1 400").unwrap_or(reply.len());
                (reply[..at].to_string(), reply[at..].to_string())
            } else {
                s.write_all(first).await.expect("write");
                let one = read_one_response(&mut s).await;
                let (rest, closed) = raw_until_closed(&mut s, second).await;
                assert!(closed, "{name}: connection left open: {rest}");
                (one, rest)
            };
            expected_requests += 1;
            assert_eq!(raw_status(&one), 200, "{name} pipelined={pipelined}: {one}");
            assert!(one.contains("\"body_len\":6"), "{name}: {one}");
            assert!(one.contains("\"uri\":\"/first\""), "{name}: {one}");
            assert_eq!(
                raw_status(&rest),
                400,
                "{name} pipelined={pipelined}: {rest}"
            );
            assert!(rest.contains("connection: close"), "{name}: {rest}");
            assert_eq!(
                b.requests.load(Ordering::SeqCst),
                expected_requests,
                "{name}"
            );
        }
    }
}

/// The guard wraps HTTP/1.1 over TLS too.
/// After a CONNECT or an Upgrade request the framing guard stops following the connection
/// (what follows a switch is not HTTP). When the answer does not switch, the connection closes
/// after it, so an ambiguous request pipelined behind cannot ride on it unchecked (it would
/// reach the upstream instead of getting 400). Requests without Upgrade keep their keep-alive.
#[tokio::test]
async fn a_request_after_an_unswitched_upgrade_or_connect_is_not_served() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let smuggled: &[u8] = b"POST /second HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\
        transfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    let unfollowed: [(&str, &[u8], u16); 3] = [
        (
            "websocket refused",
            b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            200,
        ),
        (
            "h2c offered",
            b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: upgrade, http2-settings\r\n\
              upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
            200,
        ),
        (
            "connect",
            b"CONNECT x:443 HTTP/1.1\r\nhost: x:443\r\n\r\n",
            501,
        ),
    ];
    for (name, first, status) in unfollowed {
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        let (reply, closed) = raw_until_closed(&mut s, &[first, smuggled].concat()).await;
        assert!(closed, "{name}: connection left open: {reply}");
        assert_eq!(raw_status(&reply), status, "{name}: {reply}");
        assert!(reply.contains("connection: close"), "{name}: {reply}");
        assert!(
            !reply.contains("/second"),
            "{name}: the second request was served: {reply}"
        );
        assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{name}: {reply}");
    }
}

#[tokio::test]
async fn content_length_with_transfer_encoding_over_tls_is_400() {
    let b = echo_backend("b").await;
    let p = start_proxy(cfg(), true).await;
    p.publisher
        .publish(snapshot(&[RouteSpec::prefix(None, "/", &[b.addr])]));
    let root = p.tls_root.clone().expect("tls root");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("add root");
    let mut cc = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
    let tcp = TcpStream::connect(p.tls_addr.expect("tls addr"))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let (reply, closed) = raw_until_closed(
        &mut tls,
        b"POST / HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1\r\n\
          transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&reply), 400, "{reply}");
    assert!(closed, "{reply}");
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------- redirects and HSTS

#[tokio::test]
async fn ssl_redirect_is_308_except_acme() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(Some("shop.example"), "/", &[b.addr])
        .policy(|p| p.ssl_redirect = SslRedirect::Yes)])
    .await;
    let got = get(p.addr, "Shop.Example:8080", "/cart/../pay?x=1&y").await;
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(got.headers["location"], "https://shop.example/pay?x=1&y");
    let got = get(p.addr, "shop.example", "/.well-known/acme-challenge/tok").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.echo().uri, "/.well-known/acme-challenge/tok");
}

/// Behind a load balancer that terminates TLS and is a trusted proxy, requests arrive on the
/// plain port with `X-Forwarded-Proto: https`: they are not redirected (that would loop for
/// ever) and get HSTS. The same header from an untrusted client changes nothing.
#[tokio::test]
async fn a_trusted_proxys_https_is_not_redirected_and_gets_hsts() {
    let b = echo_backend("b").await;
    let route = || {
        RouteSpec::prefix(Some("shop.example"), "/", &[b.addr]).policy(|p| {
            p.ssl_redirect = SslRedirect::Yes;
            p.hsts = Some("max-age=31536000".to_string());
        })
    };
    let trusted = ProxyConfig {
        trusted_proxies: vec!["127.0.0.0/8".parse().expect("cidr")],
        ..cfg()
    };
    let p = start_proxy(trusted, false).await;
    p.publisher.publish(snapshot(&[route()]));
    let forwarded = |proto: &'static str| {
        request(
            "GET",
            "/pay",
            &[("host", "shop.example"), ("x-forwarded-proto", proto)],
            Bytes::new(),
        )
    };
    let got = send(p.addr, forwarded("HTTPS")).await.expect("response");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["strict-transport-security"], "max-age=31536000");
    let got = send(p.addr, forwarded("http")).await.expect("response");
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
    // An appending proxy: the last entry is its own; a client's claim before it counts for
    // nothing.
    let got = send(p.addr, forwarded("https, http"))
        .await
        .expect("response");
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
    let got = send(p.addr, forwarded("http, https"))
        .await
        .expect("response");
    assert_eq!(got.status, StatusCode::OK);
    // Not trusted: the client's claim is ignored.
    let untrusted = proxy_with(&[route()]).await;
    let got = send(untrusted.addr, forwarded("https"))
        .await
        .expect("response");
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
}

#[tokio::test]
async fn hsts_only_over_tls() {
    let b = echo_backend("b").await;
    let p = start_proxy(cfg(), true).await;
    p.publisher
        .publish(snapshot(&[RouteSpec::prefix(None, "/", &[b.addr])
            .policy(|p| p.hsts = Some("max-age=31536000".to_string()))]));
    let plain = get(p.addr, "localhost", "/").await;
    assert_eq!(plain.status, 200);
    assert!(plain.headers.get("strict-transport-security").is_none());

    let root = p.tls_root.clone().expect("tls root");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("add root");
    let cc = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
    let tcp = TcpStream::connect(p.tls_addr.expect("tls addr"))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let resp = tx
        .send_request(request("GET", "/", &[("host", "localhost")], Bytes::new()))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let echo: Echo = serde_json::from_slice(&body).expect("echo");
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
}

// ---------------------------------------------------------------- upstream failures

#[tokio::test]
async fn upstream_dying_mid_body_aborts_the_client_response() {
    let b = mid_body_close_backend().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let err = send(p.addr, request("GET", "/", &[("host", "x")], Bytes::new()))
        .await
        .err()
        .expect("client must see an error, not a complete body");
    assert!(err.contains("body error"), "{err}");
}

/// The same on a multi-threaded runtime, as portico runs, 50 times over HTTP/1.1 and 50 over
/// h2: however the upstream's head, bytes and close interleave with the client side, the
/// client never gets what looks like a complete response. (It gets the head and the bytes
/// before the abort, or, when all of it was read before the client response was first
/// written, an abort with no head: hyper drops unwritten bytes at a body error, and h2 drops a
/// reset stream's queued frames.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dying_mid_body_never_reaches_the_client_as_complete() {
    let b = mid_body_close_backend().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    for i in 0..50 {
        let got = send(p.addr, request("GET", "/", &[("host", "x")], Bytes::new())).await;
        assert!(got.is_err(), "HTTP/1.1 request {i}: completed");
    }
    let mut h2 = h2_client(p.addr).await;
    for i in 0..50 {
        let req = Request::get("http://x/")
            .body(http_body_util::Empty::new().boxed())
            .expect("req");
        // A reset before the head is an error here; after it, the body must fail.
        if let Ok(resp) = h2.send_request(req).await {
            assert_eq!(resp.status(), 200);
            let res = tokio::time::timeout(DEADLINE, resp.into_body().collect())
                .await
                .expect("in time");
            assert!(res.is_err(), "h2 request {i}: the body completed");
        }
    }
}

/// An HTTP/1.0 upstream does not downgrade the client's HTTP/1.1 keep-alive connection: the
/// version is per hop (RFC 9110 §6.2).
#[tokio::test]
async fn http10_upstream_answers_as_http11_on_a_kept_alive_connection() {
    let b = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
    })
    .await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let reply = read_one_response(&mut s).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("ok"), "{reply}");
    }
}

/// An upstream response whose length is ambiguous is refused with 502, never forwarded: with
/// both Content-Length and chunked, hyper decodes the chunks but keeps the Content-Length, which
/// would cut the client's body short on a response that looks complete; with a coding other
/// than chunked, the coding would reach the client undeclared. A plainly chunked response
/// passes (re-framed for the client).
#[tokio::test]
async fn upstream_response_with_ambiguous_framing_is_502() {
    let cases: [(&str, &[u8]); 4] = [
        (
            "Content-Length and chunked",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n",
        ),
        (
            "gzip alone (read to close)",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\nconnection: close\r\n\r\nnot really gzip",
        ),
        (
            "gzip then chunked",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        ),
        (
            "chunked named twice",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        ),
    ];
    for (what, reply) in cases {
        let b = raw_backend(move |mut s| async move {
            let _ = read_head(&mut s).await;
            let _ = s.write_all(reply).await;
            let _ = s.shutdown().await;
        })
        .await;
        let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
        let got = send(p.addr, request("GET", "/", &[("host", "x")], Bytes::new()))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.status, 502, "{what}: {:?}", got.text());
        assert!(!got.text().contains("abcde"), "{what}: {:?}", got.text());
    }
    let b = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
            )
            .await;
    })
    .await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let got = send(p.addr, request("GET", "/", &[("host", "x")], Bytes::new()))
        .await
        .expect("chunked response");
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "abcd");
}

#[tokio::test]
async fn dead_endpoint_beside_live_one_never_fails_a_request() {
    let live = echo_backend("live").await;
    let dead = refusing_addr().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[dead, live.addr])]).await;
    for i in 0..20 {
        let got = get(p.addr, "x", "/").await;
        assert_eq!(got.status, 200, "GET {i}");
        let got = send(
            p.addr,
            request("POST", "/", &[("host", "x")], format!("payload-{i}")),
        )
        .await
        .expect("response");
        assert_eq!(got.status, 200, "POST {i}");
        assert_eq!(got.echo().body_len, format!("payload-{i}").len());
    }
    // Passive health ejected the dead endpoint after 5 consecutive connect failures, so it
    // was tried exactly 5 times (each followed by a retry on the live one).
    assert!(p.handler.upstreams().is_ejected(dead));
    // RouteSpec names the service after its first endpoint.
    let service = format!("svc-{}", dead.port());
    let labels = ["default", service.as_str()];
    assert_eq!(
        p.metrics
            .upstream_connect_errors
            .with_label_values(&labels)
            .get(),
        5
    );
    assert_eq!(
        p.metrics.upstream_retries.with_label_values(&labels).get(),
        5
    );
}

#[tokio::test]
async fn idempotent_requests_retry_on_5xx_and_reset_others_do_not() {
    let bad = status_backend(503).await;
    let good = echo_backend("good").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[bad.addr, good.addr])]).await;
    for _ in 0..4 {
        let got = get(p.addr, "x", "/").await;
        assert_eq!(got.status, 200);
    }
    // POST is never replayed: whichever endpoint it hits answers.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let got = send(p.addr, request("POST", "/", &[("host", "x")], "b"))
            .await
            .expect("response");
        statuses.push(got.status.as_u16());
    }
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");

    let closing = closing_backend().await;
    let good2 = echo_backend("good2").await;
    p.publisher.publish(snapshot(&[RouteSpec::prefix(
        None,
        "/",
        &[closing.addr, good2.addr],
    )
    .service("reset")]));
    for _ in 0..4 {
        assert_eq!(get(p.addr, "x", "/").await.status, 200);
    }
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let got = send(p.addr, request("POST", "/", &[("host", "x")], "b"))
            .await
            .expect("response");
        statuses.push(got.status.as_u16());
    }
    assert!(statuses.contains(&502), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
}

#[tokio::test]
async fn upstream_5xx_passes_through_unchanged_when_no_retry_is_possible() {
    let bad = status_backend(503).await;
    let teapot = status_backend(418).await;
    let p = proxy_with(&[
        RouteSpec::prefix(Some("bad"), "/", &[bad.addr]),
        RouteSpec::prefix(Some("teapot"), "/", &[teapot.addr]),
    ])
    .await;
    let got = get(p.addr, "bad", "/").await;
    assert_eq!(got.status, 503);
    assert_eq!(got.text(), "from status backend\n");
    assert_eq!(get(p.addr, "teapot", "/").await.status, 418);
}

// ---------------------------------------------------------------- balancing and pooling

#[tokio::test]
async fn round_robin_spreads_across_endpoints() {
    let a = echo_backend("a").await;
    let b = echo_backend("b").await;
    let c = echo_backend("c").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[a.addr, b.addr, c.addr])]).await;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..9 {
        *counts
            .entry(get(p.addr, "x", "/").await.echo().name)
            .or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 3), "{counts:?}");
}

#[tokio::test]
async fn keep_alive_connections_are_reused_across_requests_and_swaps() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let h = p.handler.clone();
    for _ in 0..5 {
        assert_eq!(get(p.addr, "x", "/").await.status, 200);
        wait_until(|| h.upstreams().idle_connections(b.addr) == 1).await;
    }
    // A new snapshot with the same endpoint keeps the pool (keyed by address).
    p.publisher.publish(snapshot(&[
        RouteSpec::prefix(None, "/", &[b.addr]),
        RouteSpec::prefix(Some("new.example"), "/", &[b.addr]).service("other"),
    ]));
    for _ in 0..5 {
        assert_eq!(get(p.addr, "new.example", "/").await.status, 200);
        wait_until(|| h.upstreams().idle_connections(b.addr) == 1).await;
    }
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        1,
        "one connection for 10 requests"
    );
}

/// A response body the upstream sends in parts, the second only after the client has read
/// the first, reaches the client whole: the upstream connection is read whenever its data
/// arrives, not only when the response starts.
#[tokio::test]
async fn a_response_body_sent_in_parts_over_time_reaches_the_client() {
    let next = Arc::new(Notify::new());
    let go = next.clone();
    let b = raw_backend(move |mut s| {
        let go = go.clone();
        async move {
            let _ = read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                .await;
            go.notified().await;
            let _ = s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await;
            // Keep the connection open: the end of the body is the chunked terminator.
            let mut rest = [0u8; 64];
            let _ = s.read(&mut rest).await;
        }
    })
    .await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let stream = TcpStream::connect(p.addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = request("GET", "/", &[("host", "x")], Bytes::new());
    let resp = tokio::time::timeout(DEADLINE, tx.send_request(req))
        .await
        .expect("head in time")
        .expect("head");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("first part in time")
        .expect("a frame")
        .expect("no error");
    assert_eq!(first.into_data().ok().as_deref(), Some(&b"first"[..]));
    next.notify_one();
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("second part in time")
        .expect("no error")
        .to_bytes();
    assert_eq!(&rest[..], b"second");
}

/// A request body much larger than the socket buffers streams to the upstream while the
/// request waits for the response head.
#[tokio::test]
async fn a_large_upload_streams_to_the_upstream() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    // Under the default 1 MiB body limit.
    let payload = vec![b'x'; 1_000_000];
    let got = send(
        p.addr,
        request("POST", "/", &[("host", "x")], payload.clone()),
    )
    .await
    .expect("response");
    assert_eq!(got.status, 200);
    assert_eq!(got.echo().body_len, payload.len());
}

/// A burst of concurrent requests leaves its upstream connections in the pool (well past
/// the 32 a smaller cap would keep), so the next burst of the same size opens none.
#[tokio::test]
async fn a_burst_of_64_concurrent_requests_reuses_its_upstream_connections_next_time() {
    const N: usize = 64;
    let gate = gated_backend().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[gate.addr])]).await;
    let h = p.handler.clone();
    for _ in 0..2 {
        let held = hold(&p, "x", "/", N, &gate).await;
        gate.gate.add_permits(N);
        for t in held {
            assert_eq!(t.await.expect("request task"), 200);
        }
        wait_until(|| h.upstreams().idle_connections(gate.addr) == N).await;
    }
    assert_eq!(
        gate.accepted.load(Ordering::SeqCst),
        N,
        "the second burst ran on the first burst's connections"
    );
}

// ---------------------------------------------------------------- headers

#[tokio::test]
async fn forwarding_headers_from_untrusted_peers_are_replaced() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let got = send(
        p.addr,
        request(
            "GET",
            "/",
            &[
                ("host", "app.example:8080"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil"),
                ("x-real-ip", "6.6.6.6"),
                ("forwarded", "for=6.6.6.6"),
                // URL overrides and the other forwarding fields a backend may believe.
                ("x-original-url", "/admin"),
                ("X-Original-URI", "/admin"),
                ("x-rewrite-url", "/admin"),
                ("x-forwarded-prefix", "/evil"),
                ("x-forwarded-scheme", "https"),
                ("x-scheme", "https"),
                ("x-originality", "kept"),
            ],
            Bytes::new(),
        ),
    )
    .await
    .expect("response");
    let e = got.echo();
    for gone in [
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-forwarded-prefix",
        "x-forwarded-scheme",
        "x-scheme",
    ] {
        assert_eq!(e.header(gone), None, "{gone} from an untrusted peer");
    }
    assert_eq!(e.header("x-originality"), Some("kept"));
    assert_eq!(e.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(e.header("x-forwarded-proto"), Some("http"));
    assert_eq!(e.header("x-forwarded-host"), Some("app.example:8080"));
    assert_eq!(
        e.header("x-forwarded-port"),
        Some(p.addr.port().to_string().as_str())
    );
    assert_eq!(e.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(e.header("forwarded"), None);
    assert_eq!(e.header("host"), Some("app.example:8080"));
    let id = e.header("x-request-id").expect("generated id").to_string();
    assert!(!id.is_empty());
    let again = get(p.addr, "x", "/").await.echo();
    assert_ne!(again.header("x-request-id"), Some(id.as_str()));
}

#[tokio::test]
async fn forwarding_headers_from_trusted_proxies_are_appended() {
    let b = echo_backend("b").await;
    let p = start_proxy(
        ProxyConfig {
            trusted_proxies: vec!["127.0.0.0/8".parse().expect("cidr")],
            ..cfg()
        },
        false,
    )
    .await;
    p.publisher
        .publish(snapshot(&[RouteSpec::prefix(None, "/", &[b.addr])]));
    let got = send(
        p.addr,
        request(
            "GET",
            "/",
            &[
                ("host", "x"),
                ("x-forwarded-for", "6.6.6.6, 203.0.113.7"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "public.example"),
                ("x-request-id", "client-id-42"),
                // Spoofed by the client, passed on by the load balancer.
                ("x-real-ip", "6.6.6.6"),
                ("x-forwarded-prefix", "/shop"),
                ("x-original-url", "/orig"),
            ],
            Bytes::new(),
        ),
    )
    .await
    .expect("response");
    let e = got.echo();
    assert_eq!(
        e.header("x-forwarded-for"),
        Some("6.6.6.6, 203.0.113.7, 127.0.0.1")
    );
    // The client portico decided on: the right-most entry that is not a trusted proxy.
    assert_eq!(e.header("x-real-ip"), Some("203.0.113.7"));
    assert_eq!(e.header("x-forwarded-proto"), Some("https"));
    assert_eq!(e.header("x-forwarded-host"), Some("public.example"));
    assert_eq!(e.header("x-forwarded-prefix"), Some("/shop"));
    assert_eq!(e.header("x-original-url"), Some("/orig"));
    assert_eq!(e.header("x-request-id"), Some("client-id-42"));
    // A repeated X-Request-ID reaches the backend once: the first.
    let got = send(
        p.addr,
        request(
            "GET",
            "/",
            &[
                ("host", "x"),
                ("x-request-id", "abc"),
                ("x-request-id", "def"),
            ],
            Bytes::new(),
        ),
    )
    .await
    .expect("response");
    assert_eq!(
        got.echo().headers.get("x-request-id"),
        Some(&vec!["abc".to_string()])
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let b = echo_backend("b").await;
    let h = hop_by_hop_backend().await;
    let p = proxy_with(&[
        RouteSpec::prefix(Some("echo"), "/", &[b.addr]),
        RouteSpec::prefix(Some("hop"), "/", &[h.addr]),
    ])
    .await;
    let got = send(
        p.addr,
        request(
            "GET",
            "/",
            &[
                ("host", "echo"),
                ("connection", "x-client-private"),
                ("x-client-private", "1"),
                ("keep-alive", "timeout=1"),
                ("proxy-connection", "keep-alive"),
                ("te", "trailers, deflate"),
                ("upgrade", "h2c"),
                ("x-end-to-end", "1"),
            ],
            Bytes::new(),
        ),
    )
    .await
    .expect("response");
    let e = got.echo();
    for gone in [
        "x-client-private",
        "keep-alive",
        "proxy-connection",
        "upgrade",
    ] {
        assert_eq!(e.header(gone), None, "{gone} forwarded");
    }
    assert_eq!(e.header("te"), Some("trailers"));
    assert_eq!(e.header("x-end-to-end"), Some("1"));

    let got = get(p.addr, "hop", "/").await;
    for gone in [
        "x-upstream-private",
        "keep-alive",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(got.headers.get(gone).is_none(), "{gone} returned");
    }
    assert_eq!(got.headers["x-end-to-end"], "1");
}

// ---------------------------------------------------------------- paths

#[tokio::test]
async fn traversal_never_escapes_the_normalised_prefix() {
    let public = echo_backend("public").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/public", &[public.addr])]).await;
    let not_found = [
        "/public/../secret",
        "/public/%2e%2e/secret",
        "/public/.%2E/secret",
        "/public/./../secret",
    ];
    for path in not_found {
        let got = get(p.addr, "x", path).await;
        assert_eq!(got.status, 404, "{path}");
    }
    for path in [
        "/public/..%2Fsecret",
        "/public/x%5C..%5Csecret",
        "/public/..;/secret",
    ] {
        let got = get(p.addr, "x", path).await;
        assert_eq!(got.status, 400, "{path}");
    }
    // What matched is exactly what the backend receives.
    let cases = [
        ("/public/a/../b", "/public/b"),
        ("//public//%61", "/public/a"),
        ("/public/a%2fb?q=%2e%2e/x", "/public/a%2Fb?q=%2e%2e/x"),
    ];
    for (sent, received) in cases {
        let got = get(p.addr, "x", sent).await;
        assert_eq!(got.status, 200, "{sent}");
        assert_eq!(got.echo().uri, received, "{sent}");
    }
    assert_eq!(public.requests.load(Ordering::SeqCst), cases.len());
}

/// Absolute-form http(s) wins over Host (RFC 9112 §3.2.2). Authority-form targets belong to
/// CONNECT only, and absolute-form ones with another scheme are refused: taken as the
/// authority, `GET b.example:80` would reach another Ingress than its Host says.
#[tokio::test]
async fn absolute_form_authority_wins_over_host() {
    let a = echo_backend("a").await;
    let b = echo_backend("b").await;
    let p = proxy_with(&[
        RouteSpec::prefix(Some("a.example"), "/", &[a.addr]),
        RouteSpec::prefix(Some("b.example"), "/", &[b.addr]),
    ])
    .await;
    for req in [
        &b"GET b.example:80 HTTP/1.1\r\nhost: a.example\r\n\r\n"[..],
        b"OPTIONS b.example:80 HTTP/1.1\r\nhost: a.example\r\n\r\n",
        b"GET ftp://b.example/x HTTP/1.1\r\nhost: a.example\r\n\r\n",
    ] {
        let reply = raw(p.addr, req).await;
        let shown = String::from_utf8_lossy(req);
        assert_eq!(raw_status(&reply), 400, "{shown}: {reply}");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
    let reply = raw(
        p.addr,
        b"GET http://b.example/x HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert!(reply.contains("\"name\":\"b\""), "{reply}");
    assert!(reply.contains("\"host\":[\"b.example\"]"), "{reply}");
}

// ---------------------------------------------------------------- upgrades and h2c

/// Open a connection to `addr` and send a WebSocket upgrade request for `/chat` on host `x`.
async fn websocket_handshake(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    s
}

#[tokio::test]
async fn websocket_upgrade_echoes_both_ways() {
    let ws = websocket_backend().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[ws.addr])]).await;
    let mut s = websocket_handshake(p.addr).await;
    let head = read_head(&mut s).await;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"hello"[..], b"second frame"] {
        s.write_all(msg).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(buf, msg);
    }
}

#[tokio::test]
async fn h2c_upstream_carries_trailers_to_an_h2_client() {
    let g = h2c_trailers_backend().await;
    let p = h2c_proxy(g.addr).await;
    let tcp = TcpStream::connect(p.addr).await.expect("connect");
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c prior knowledge");
    tokio::spawn(conn);
    // Request body with trailers (client streaming).
    let mut req_trailers = http::HeaderMap::new();
    req_trailers.insert("x-req-trailer", "sent".parse().expect("hv"));
    let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = vec![
        Ok(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
        Ok(http_body::Frame::trailers(req_trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let req = Request::post("http://grpc.example/pkg.Svc/Method")
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(BodyExt::boxed(body))
        .expect("req");
    let resp = tx.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers forwarded");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "fine");
    let body = collected.to_bytes();
    assert_eq!(&body[..], b"version=HTTP/2.0 te=trailers trailer=sent");
    // One multiplexed upstream connection for sequential streams.
    for _ in 0..3 {
        let req = Request::get("http://grpc.example/x")
            .body(http_body_util::Empty::new().boxed())
            .expect("req");
        let resp = tx.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await.expect("body");
    }
    assert_eq!(g.accepted.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------- concurrency caps

/// A WebSocket holds its concurrency slot for the life of the tunnel, not just until the 101
/// is written: with a per-Ingress cap of 1, a second request is refused while the tunnel is
/// open and admitted once it closed.
#[tokio::test]
async fn websocket_holds_its_concurrency_slot_until_the_tunnel_ends() {
    let ws = websocket_backend().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[ws.addr])
        .policy(|p: &mut RoutePolicy| p.max_concurrent_requests = Some(1))])
    .await;
    let mut s = websocket_handshake(p.addr).await;
    let head = String::from_utf8_lossy(&read_head(&mut s).await).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    // The tunnel works, so it is established.
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(get(p.addr, "x", "/").await.status, 503);
    drop(s);
    // Closing the client side ends the tunnel (bounded polling: the tunnel task notices EOF).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = get(p.addr, "x", "/").await.status;
        if status != 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A GET (or DELETE) whose body has no declared length (chunked from an HTTP/1.1 client, DATA
/// without content-length from h2) reaches an HTTP/1.1 upstream with its body, chunked:
/// hyper's client would otherwise send such a GET with no body at all (brief §4.4: never
/// repaired silently).
#[tokio::test]
async fn a_get_body_of_unknown_length_reaches_an_h1_upstream() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let reply = raw(
        p.addr,
        b"GET /_search HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert!(reply.contains("\"body_len\":5"), "{reply}");

    let mut tx = h2_client(p.addr).await;
    let body = http_body_util::StreamBody::new(futures_util::stream::iter([Ok::<
        _,
        std::convert::Infallible,
    >(
        hyper::body::Frame::data(Bytes::from_static(b"0123456789")),
    )]));
    let req = Request::get("http://x/_search")
        .body(body.boxed())
        .expect("req");
    let resp = tx.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let e: Echo = serde_json::from_slice(&body).expect("echo");
    assert_eq!(e.body_len, 10);
}

/// A TCP relay to `target` whose connections stop forwarding (without closing) once `freeze`
/// is set: a peer gone silent, as after a lost node or a dropped conntrack entry. Connections
/// made after the freeze forward normally.
async fn freezable_relay(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let freeze = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let frozen = freeze.clone();
    tokio::spawn(async move {
        // Ends with the test's runtime.
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            // Only connections that existed when the freeze came are frozen.
            let born_frozen = frozen.load(Ordering::SeqCst);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut r, mut w) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                ),
                (Box::new(sr), Box::new(cw)),
            ] {
                let frozen = frozen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if frozen.load(Ordering::SeqCst) && !born_frozen {
                            // Silent from now on, with both sockets held open.
                            std::future::pending::<()>().await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, freeze)
}

/// A pooled h2c upstream connection whose peer went silent (no FIN, no RST) costs one read
/// timeout, not one per request: the request that times out drops it from the pool, and the
/// next one is served on a new connection. (No keep-alive PINGs: gRPC servers answer frequent
/// ones with GOAWAY "too_many_pings".)
#[tokio::test]
async fn a_silent_h2c_upstream_connection_is_replaced_after_a_timeout() {
    let g = h2c_trailers_backend().await;
    let (relay, freeze) = freezable_relay(g.addr).await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[relay]).policy(|p| {
        p.upstream_protocol = UpstreamProtocol::H2c;
        p.read_timeout = Duration::from_millis(500);
    })])
    .await;
    assert_eq!(get(p.addr, "x", "/").await.status, 200);
    freeze.store(true, Ordering::SeqCst);
    assert_eq!(get(p.addr, "x", "/").await.status, 504);
    assert_eq!(get(p.addr, "x", "/").await.status, 200);
}

// ---------------------------------------------------------------- observability

#[tokio::test]
async fn requests_are_counted_with_route_labels() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(Some("a"), "/", &[b.addr]).service("svc-m")]).await;
    assert_eq!(get(p.addr, "a", "/").await.status, 200);
    assert_eq!(get(p.addr, "nope", "/").await.status, 404);
    // Counted when the response body finishes, which may trail the client by a moment.
    let m = p.metrics.clone();
    wait_until(|| {
        m.requests
            .with_label_values(&["default", "ing", "svc-m", "200", "GET"])
            .get()
            == 1
            && m.requests
                .with_label_values(&["", "", "", "404", "GET"])
                .get()
                == 1
    })
    .await;
}

/// A client that gives up before the response head (here: closes its connection while the
/// backend holds the request) is still counted, as 499 like nginx's "client closed request",
/// and its concurrency slot comes back.
#[tokio::test]
async fn a_request_the_client_abandons_is_counted_as_499() {
    let b = gated_backend().await;
    let p = proxy_with(&[RouteSpec::prefix(Some("a"), "/", &[b.addr]).service("svc-g")]).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .expect("write");
    wait_until(|| b.requests.load(Ordering::SeqCst) == 1).await;
    drop(s);
    let m = p.metrics.clone();
    wait_until(|| {
        m.requests
            .with_label_values(&["default", "ing", "svc-g", "499", "GET"])
            .get()
            == 1
    })
    .await;
    b.gate.add_permits(1);
}

// ---------------------------------------------------------------- h2 clients, CONNECT, logs

async fn h2_client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("h2c prior knowledge");
    tokio::spawn(conn);
    tx
}

#[tokio::test]
async fn h2_client_authority_becomes_host_for_an_h1_upstream() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(Some("api.example"), "/", &[b.addr])]).await;
    let mut tx = h2_client(p.addr).await;
    let req = Request::get("http://api.example:8080/v1/../v2?x=1")
        .body(http_body_util::Empty::new().boxed())
        .expect("req");
    let resp = tx.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let e: Echo = serde_json::from_slice(&body).expect("echo");
    assert_eq!(e.version, "HTTP/1.1");
    assert_eq!(e.uri, "/v2?x=1");
    assert_eq!(e.header("host"), Some("api.example:8080"));
}

/// Browsers split cookies over several h2 fields; an HTTP/1.1 upstream gets them joined into
/// one Cookie header with "; " (RFC 9113 §8.2.3).
#[tokio::test]
async fn split_h2_cookies_reach_an_h1_upstream_as_one_header() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let mut tx = h2_client(p.addr).await;
    let req = Request::get("http://x/")
        .header("cookie", "a=1")
        .header("cookie", "b=2; c=3")
        .body(http_body_util::Empty::new().boxed())
        .expect("req");
    let resp = tx.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let e: Echo = serde_json::from_slice(&body).expect("echo");
    assert_eq!(
        e.headers.get("cookie"),
        Some(&vec!["a=1; b=2; c=3".to_string()])
    );
}

#[tokio::test]
async fn h2_client_stream_is_reset_when_upstream_dies_mid_body() {
    let b = mid_body_close_backend().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let mut tx = h2_client(p.addr).await;
    let req = Request::get("http://x/")
        .body(http_body_util::Empty::new().boxed())
        .expect("req");
    let resp = tx.send_request(req).await.expect("response head");
    assert_eq!(resp.status(), 200);
    let res = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("in time");
    assert!(res.is_err(), "h2 body must end in a reset, not complete");
}

#[tokio::test]
async fn connect_method_is_501() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let reply = raw(
        p.addr,
        b"CONNECT b.example:443 HTTP/1.1\r\nhost: b.example:443\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&reply), 501, "{reply}");
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

/// A proxy with the given stream idle timeout, serving `routes`.
async fn proxy_with_stream_idle(idle: Duration, routes: &[RouteSpec]) -> TestProxy {
    let p = start_proxy(
        ProxyConfig {
            stream_idle_timeout: idle,
            ..cfg()
        },
        false,
    )
    .await;
    p.publisher.publish(snapshot(routes));
    p
}

#[tokio::test]
async fn websocket_is_cut_after_idle_timeout() {
    let ws = websocket_backend().await;
    let p = proxy_with_stream_idle(
        Duration::from_millis(300),
        &[RouteSpec::prefix(None, "/", &[ws.addr])],
    )
    .await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.expect("echo");
    // Then silence: the proxy closes the tunnel on its own.
    let started = tokio::time::Instant::now();
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut rest))
        .await
        .expect("closed before the test deadline")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

/// A response on which no byte moves for the stream idle timeout is dropped with its
/// connection (here: the upstream stops mid-body), and its concurrency slot comes back. The
/// wait for response headers is the route's read timeout's business, not this one's: an
/// upstream slower to answer than the stream idle timeout, within its read timeout, is served.
#[tokio::test]
async fn a_response_with_no_bytes_moving_is_cut_after_the_stream_idle_timeout() {
    let stalling = mid_body_stall_backend().await;
    let slow = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        // The property under test is a duration: headers come after three stall timeouts.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nslow")
            .await;
    })
    .await;
    let p = proxy_with_stream_idle(
        Duration::from_millis(300),
        &[
            RouteSpec::prefix(Some("stall"), "/", &[stalling.addr])
                .policy(|p| p.max_concurrent_requests = Some(1)),
            RouteSpec::prefix(Some("slow"), "/", &[slow.addr])
                .policy(|p| p.read_timeout = Duration::from_secs(5)),
        ],
    )
    .await;
    // The upstream stops sending its response: the client's response is aborted, twice: the
    // first one's slot (max-concurrent-requests 1) was released, or the second would be 503.
    for i in 0..2 {
        let got = send(
            p.addr,
            request("GET", "/", &[("host", "stall")], Bytes::new()),
        )
        .await;
        assert!(
            got.as_ref().err().is_some_and(|e| e.contains("body error")),
            "request {i}: {:?}",
            got.map(|g| g.status)
        );
    }
    let got = get(p.addr, "slow", "/").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "slow");
}

/// HTTP/2 streams time out one by one: on one connection, a response whose upstream hung and
/// a response the client stopped reading (its stream window full, so hyper no longer polls
/// the body) both lose their upstream exchange while a sibling stream keeps moving, and the
/// sibling is served to its end. Before, any byte on the connection (the sibling's, or the
/// server's keep-alive PINGs and their ACKs) kept every stream alive.
#[tokio::test]
async fn h2_streams_time_out_one_by_one_while_a_sibling_moves() {
    const DRIPS: usize = 30;
    let stalling = mid_body_stall_backend().await;
    // Announces a large body and writes until its connection is closed.
    let unread = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 67108864\r\n\r\n")
            .await;
        let chunk = vec![b'z'; 16 * 1024];
        for _ in 0..4096 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
    // One byte every 100 ms: the sibling stream that keeps the connection busy.
    let drip = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        for _ in 0..DRIPS {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b"1\r\nd\r\n").await.is_err() {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    })
    .await;
    let p = proxy_with_stream_idle(
        Duration::from_millis(300),
        &[
            RouteSpec::prefix(Some("stall"), "/", &[stalling.addr]),
            RouteSpec::prefix(Some("unread"), "/", &[unread.addr]),
            RouteSpec::prefix(Some("drip"), "/", &[drip.addr]),
        ],
    )
    .await;
    let tcp = TcpStream::connect(p.addr).await.expect("connect");
    // A 64 KiB window per stream, a wide one for the connection: the unread stream fills its
    // own window and blocks nothing else.
    let (mut tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(16 << 20)
        .handshake(TokioIo::new(tcp))
        .await
        .expect("h2c prior knowledge");
    tokio::spawn(conn);
    let get = |host: &str| {
        Request::get(format!("http://{host}/"))
            .body(http_body_util::Empty::<Bytes>::new().boxed())
            .expect("req")
    };
    let drip_resp = tx.send_request(get("drip")).await.expect("drip head");
    let dripped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let dripped = dripped.clone();
        tokio::spawn(async move {
            let mut body = drip_resp.into_body();
            let mut all = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.expect("drip frame").into_data() {
                    dripped.fetch_add(data.len(), Ordering::SeqCst);
                    all.extend_from_slice(&data);
                }
            }
            all
        })
    };
    let unread_resp = tx.send_request(get("unread")).await.expect("unread head");
    assert_eq!(unread_resp.status(), 200);
    let stalled = tx.send_request(get("stall")).await.expect("stall head");
    let res = tokio::time::timeout(DEADLINE, stalled.into_body().collect())
        .await
        .expect("the hung stream ends in time");
    assert!(res.is_err(), "a hung stream ends in a reset");
    // The unread stream's upstream connection is closed although the client still holds the
    // stream (its body unread).
    wait_until(|| {
        unread.accepted.load(Ordering::SeqCst) == 1 && unread.open.load(Ordering::SeqCst) == 0
    })
    .await;
    assert!(
        dripped.load(Ordering::SeqCst) < DRIPS,
        "the streams timed out only once the sibling ended"
    );
    let all = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("drip in time")
        .expect("join");
    assert_eq!(all, vec![b'd'; DRIPS]);
    drop(unread_resp);
}

/// The client's half counts as the stream moving: an upload slower than the stream idle
/// timeout in all, to an upstream that answered its head at once and then waits for the
/// whole body, is served to its end.
#[tokio::test]
async fn an_h2_upload_keeps_its_stream_alive_while_the_response_waits() {
    let b = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        let _ = s.flush().await;
        // The body arrives chunked (an h2 request without content-length); read to its end.
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"0\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(b"4\r\ndone\r\n0\r\n\r\n").await;
    })
    .await;
    let p = proxy_with_stream_idle(
        Duration::from_millis(300),
        &[RouteSpec::prefix(None, "/", &[b.addr])],
    )
    .await;
    let (body_tx, mut body_rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::convert::Infallible>>(4);
    let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        body_rx.poll_recv(cx)
    }));
    let mut tx = h2_client(p.addr).await;
    let req = Request::post("http://x/up")
        .body(body.boxed())
        .expect("req");
    let sending = tokio::spawn(async move {
        // Twelve frames 100 ms apart: four stall timeouts in all, never one without a frame.
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let frame = http_body::Frame::data(Bytes::from_static(b"u"));
            if body_tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
    });
    let resp = tx.send_request(req).await.expect("response head");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("in time")
        .expect("the stream was not reset while the client was sending")
        .to_bytes();
    assert_eq!(body, "done");
    sending.await.expect("join");
}

/// `--stream-idle-timeout 0s` turns the idle timeout off, it does not close every tunnel at
/// once.
#[tokio::test]
async fn a_zero_stream_idle_timeout_is_off() {
    let ws = websocket_backend().await;
    let p =
        proxy_with_stream_idle(Duration::ZERO, &[RouteSpec::prefix(None, "/", &[ws.addr])]).await;
    let mut s = websocket_handshake(p.addr).await;
    assert!(read_head(&mut s).await.starts_with(b"HTTP/1.1 101"));
    for _ in 0..3 {
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(&buf, b"ping");
    }
}

/// Collects formatted log output in memory.
#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    /// Capture this thread's logs as JSON lines (a current-thread runtime: every task of the
    /// test logs through this default) until the guard drops.
    fn capture() -> (LogBuf, tracing::subscriber::DefaultGuard) {
        let logs = LogBuf::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// The access-log lines so far.
    fn access_lines(&self) -> Vec<String> {
        let raw = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        String::from_utf8_lossy(&raw)
            .lines()
            .filter(|l| l.contains("portico::access"))
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test]
async fn one_access_log_line_per_request() {
    let (logs, _guard) = LogBuf::capture();

    let b = echo_backend("b").await;
    let p = start_proxy(ProxyConfig::default(), false).await;
    p.publisher.publish(snapshot(&[
        RouteSpec::prefix(Some("a"), "/", &[b.addr]).ingress("shop")
    ]));
    let got = send(
        p.addr,
        request(
            "POST",
            "/x/../y",
            &[("host", "a"), ("x-request-id", "rid-7")],
            "hello",
        ),
    )
    .await
    .expect("response");
    assert_eq!(got.status, 200);
    let _ = get(p.addr, "unknown", "/").await;
    wait_until(|| logs.access_lines().len() == 2).await;
    let lines = logs.access_lines();
    let first: serde_json::Value = serde_json::from_str(&lines[0]).expect("json line");
    let f = &first["fields"];
    assert_eq!(f["method"], "POST");
    assert_eq!(f["host"], "a");
    assert_eq!(f["path"], "/y");
    assert_eq!(f["status"], 200);
    assert_eq!(f["bytes_in"], 5);
    assert_eq!(f["bytes_out"], got.body.len() as u64);
    assert_eq!(f["route"], "default/shop");
    assert_eq!(f["request_id"], "rid-7");
    assert_eq!(f["upstream_addr"], b.addr.to_string());
    let second: serde_json::Value = serde_json::from_str(&lines[1]).expect("json line");
    assert_eq!(second["fields"]["status"], 404);
    assert_eq!(second["fields"]["route"], "");
}

#[tokio::test]
async fn client_aborting_its_upload_does_not_count_against_the_upstream() {
    let a = echo_backend("a").await;
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[a.addr, b.addr])]).await;
    for _ in 0..12 {
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
            .await
            .expect("write");
        // Wait until the request reached a backend, then vanish mid-body.
        let before = a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst);
        let (ra, rb) = (a.requests.clone(), b.requests.clone());
        wait_until(|| ra.load(Ordering::SeqCst) + rb.load(Ordering::SeqCst) > before).await;
        drop(s);
    }
    let m = p.metrics.clone();
    wait_until(|| {
        m.rejected_requests
            .with_label_values(&["client_body"])
            .get()
            == 12
    })
    .await;
    assert!(!p.handler.upstreams().is_ejected(a.addr));
    assert!(!p.handler.upstreams().is_ejected(b.addr));
    assert_eq!(get(p.addr, "x", "/").await.status, 200);
}

/// A listener whose accept queue is full: further SYNs are dropped, so connects hang.
async fn blackhole_addr() -> (std::net::SocketAddr, Vec<TcpStream>, socket2::Socket) {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    sock.listen(0).expect("listen");
    let addr = sock.local_addr().expect("addr").as_socket().expect("inet");
    let mut fillers = Vec::new();
    // Fill the queue until a connect no longer completes promptly (bounded).
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    (addr, fillers, sock)
}

#[tokio::test]
async fn connect_timeout_counts_as_connect_failure() {
    let (hole, _fillers, _sock) = blackhole_addr().await;
    let live = echo_backend("live").await;
    let p = proxy_with(&[
        RouteSpec::prefix(Some("only-hole"), "/", &[hole])
            .policy(|p| p.connect_timeout = Duration::from_millis(100)),
        RouteSpec::prefix(Some("mixed"), "/", &[hole, live.addr])
            .service("mixed")
            .policy(|p| p.connect_timeout = Duration::from_millis(100)),
    ])
    .await;
    assert_eq!(get(p.addr, "only-hole", "/").await.status, 502);
    for _ in 0..4 {
        let got = send(p.addr, request("POST", "/", &[("host", "mixed")], "x"))
            .await
            .expect("response");
        assert_eq!(got.status, 200);
    }
}

#[tokio::test]
async fn idle_pooled_connections_expire() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let h = p.handler.clone();
    for _ in 0..2 {
        assert_eq!(get(p.addr, "x", "/").await.status, 200);
        // The connection goes back to the pool just after the response body ends.
        wait_until(|| h.upstreams().idle_connections(b.addr) == 1).await;
    }
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    // Jump past the idle timeout (the reaper also runs on the way).
    tokio::time::pause();
    tokio::time::advance(portico::proxy::upstream::POOL_IDLE_TIMEOUT + Duration::from_secs(1))
        .await;
    tokio::time::resume();
    assert_eq!(get(p.addr, "x", "/").await.status, 200);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn h2_header_block_limit_matches_h1() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let big = "v".repeat(2048);
    let mut tx = h2_client(p.addr).await;
    for (count, want) in [(30, 200), (40, 431)] {
        let mut req = Request::get("http://x/");
        for i in 0..count {
            req = req.header(format!("x-h{i}"), big.as_str());
        }
        let req = req.body(http_body_util::Empty::new().boxed()).expect("req");
        let resp = tx.send_request(req).await.expect("response");
        assert_eq!(resp.status(), want, "{count} headers of 2 KiB");
    }
    // The header count too: h2 has no line limit of its own, so 101 short fields (well under
    // the byte limit) would otherwise pass where HTTP/1.1 answers 431 (brief §4.4). Behind a
    // backend that takes any number of fields (hyper's own stops at 100, which the forwarding
    // headers would cross), so every 431 here is portico's.
    let b = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .await;
    })
    .await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let mut tx = h2_client(p.addr).await;
    for (count, want) in [(100, 200), (101, 431)] {
        let mut req = Request::get("http://x/");
        for i in 0..count {
            req = req.header(format!("x-h{i}"), "v");
        }
        let req = req.body(http_body_util::Empty::new().boxed()).expect("req");
        let resp = tx.send_request(req).await.expect("response");
        assert_eq!(resp.status(), want, "h2, {count} short headers");
    }
    // HTTP/1.1 for comparison: the same 100 / 101 fields (Host and Connection among them).
    let raw_count = |n: usize| {
        let mut head = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
        for i in 2..n {
            head.push_str(&format!("x-h{i}: v\r\n"));
        }
        head + "connection: close\r\n\r\n"
    };
    assert_eq!(
        raw_status(&raw(p.addr, raw_count(100).as_bytes()).await),
        200
    );
    assert_eq!(
        raw_status(&raw(p.addr, raw_count(101).as_bytes()).await),
        431
    );
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        2,
        "only the 200s reached the backend"
    );
}

/// On a dual-stack (IPv6 wildcard) listener an IPv4 client's address arrives IPv4-mapped
/// (`::ffff:127.0.0.1`): the upstream is told the plain IPv4 address, which is also what
/// `--trusted-proxies` ranges and rate-limit keys see. The listener here is bound to the mapped
/// form of 127.0.0.1, which gives the same peer addresses as `[::]` without leaving loopback.
#[tokio::test]
async fn an_ipv4_client_of_a_dual_stack_listener_is_its_ipv4_address() {
    let b = echo_backend("b").await;
    let mapped: std::net::SocketAddr = "[::ffff:127.0.0.1]:0".parse().expect("addr");
    let p = start_proxy_at(quiet_config(), mapped, false).await;
    p.publisher
        .publish(snapshot(&[RouteSpec::prefix(None, "/", &[b.addr])]));
    let got = get(
        std::net::SocketAddr::from(([127, 0, 0, 1], p.addr.port())),
        "x",
        "/",
    )
    .await;
    let e = got.echo();
    assert_eq!(e.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(e.header("x-forwarded-for"), Some("127.0.0.1"));
}

/// Clients that stop reading large responses from an h2c (gRPC) backend must not stall the
/// other requests that share the proxy's one connection to it. Flow control on that
/// connection is shared: data a stream received but nobody consumed counts against the
/// connection's window too, so if that window is smaller than what stalled streams may hold,
/// a few slow clients stop every other client of the backend.
#[tokio::test]
async fn slow_readers_do_not_stall_other_streams_on_a_shared_h2c_upstream() {
    let produced = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = produced.clone();
    let g = serve_backend(move |req, _| {
        let counter = counter.clone();
        async move {
            if req.uri().path() != "/big" {
                return http::Response::new(support::full("small"));
            }
            // 64 MiB in 16 KiB chunks, produced as fast as it is taken.
            let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
            let frames = futures_util::stream::iter((0..4096).map(move |_| {
                counter.fetch_add(chunk.len(), Ordering::Relaxed);
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk.clone()))
            }));
            http::Response::new(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
        }
    })
    .await;
    let p = h2c_proxy(g.addr).await;
    // Slow clients: each reads its response head, then nothing.
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        s.write_all(b"GET /big HTTP/1.1\r\nhost: grpc.example\r\n\r\n")
            .await
            .expect("write");
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.expect("response head");
        assert_eq!(&head, b"HTTP/1.1 200");
        slow.push(s);
    }
    // Until the stalled streams hold all they can: the backend is no longer asked for more.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut last, mut still) = (produced.load(Ordering::Relaxed), 0);
    while still < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backend kept being read"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = produced.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    // Small requests on the same upstream connection: each must complete.
    for i in 0..20 {
        answers_in_time(
            p.addr,
            "/small",
            "small",
            &format!("small request {i} with 8 stalled streams"),
        )
        .await;
    }
    assert_eq!(
        g.accepted.load(Ordering::SeqCst),
        1,
        "one shared connection"
    );
    drop(slow);
}

/// Long-lived streams (gRPC watches, server streaming) that fill an h2c backend's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` must not make every other request to that endpoint wait
/// for one of them to end: the proxy opens another connection instead. When they end, later
/// requests share the connections already open.
#[tokio::test]
async fn streams_beyond_an_h2c_backends_limit_go_to_another_connection() {
    const LIMIT: usize = 4;
    let g = serve_backend_with_stream_limit(LIMIT as u32, |req, gate| async move {
        if req.uri().path() == "/watch" {
            // Held until the test releases it (bounded by the test's own end).
            let _permit = gate.acquire().await;
        }
        http::Response::new(support::full("done"))
    })
    .await;
    let p = h2c_proxy(g.addr).await;
    // One request first, so the backend's SETTINGS are known before the watches start.
    assert_eq!(get(p.addr, "grpc.example", "/first").await.status, 200);
    let watches = hold(&p, "grpc.example", "/watch", LIMIT, &g).await;
    assert_eq!(
        g.accepted.load(Ordering::SeqCst),
        1,
        "the watches share one connection"
    );
    for i in 0..5 {
        answers_in_time(
            p.addr,
            "/unary",
            "done",
            &format!("unary call {i} with {LIMIT} watches open"),
        )
        .await;
    }
    assert_eq!(g.accepted.load(Ordering::SeqCst), 2, "one more connection");
    g.gate.add_permits(LIMIT);
    for w in watches {
        assert_eq!(w.await.expect("watch task"), 200);
    }
    // With the watches gone both connections have room: no third one.
    for _ in 0..10 {
        assert_eq!(get(p.addr, "grpc.example", "/unary").await.status, 200);
    }
    assert_eq!(g.accepted.load(Ordering::SeqCst), 2);
}

/// Requests that all find no h2c connection with room at once each open one; only one of
/// those stays pooled, the others carry their request and close, so a burst leaves no
/// surplus connections open to the backend.
#[tokio::test]
async fn a_burst_of_first_h2c_requests_leaves_one_connection() {
    let g = serve_backend(|_, gate| async move {
        let _permit = gate.acquire().await;
        http::Response::new(support::full("done"))
    })
    .await;
    let p = h2c_proxy(g.addr).await;
    let burst = hold(&p, "grpc.example", "/", 16, &g).await;
    g.gate.add_permits(16);
    for r in burst {
        assert_eq!(r.await.expect("request task"), 200);
    }
    let open = g.open.clone();
    wait_until(|| open.load(Ordering::SeqCst) == 1).await;
    // The one left is the pooled one: later requests use it.
    let accepted = g.accepted.load(Ordering::SeqCst);
    g.gate.add_permits(4);
    for _ in 0..4 {
        assert_eq!(get(p.addr, "grpc.example", "/").await.status, 200);
    }
    assert_eq!(g.accepted.load(Ordering::SeqCst), accepted);
    assert_eq!(g.open.load(Ordering::SeqCst), 1);
}

/// A WebSocket's access-log line is written when its tunnel ends, with the bytes it carried
/// each way and how long the session lasted (as nginx logs it at close), not at the 101 with
/// nothing carried yet.
#[tokio::test]
async fn a_websocket_is_logged_when_it_closes_with_what_it_carried() {
    let (logs, _guard) = LogBuf::capture();
    let ws = websocket_backend().await;
    let p = start_proxy(ProxyConfig::default(), false).await;
    p.publisher.publish(snapshot(&[
        RouteSpec::prefix(None, "/", &[ws.addr]).ingress("chat")
    ]));
    let mut s = websocket_handshake(p.addr).await;
    let head = String::from_utf8_lossy(&read_head(&mut s).await).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    for msg in [&b"hello"[..], b"second frame"] {
        s.write_all(msg).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
    }
    assert!(
        logs.access_lines().is_empty(),
        "logged while open: {:?}",
        logs.access_lines()
    );
    drop(s);
    wait_until(|| logs.access_lines().len() == 1).await;
    let line: serde_json::Value = serde_json::from_str(&logs.access_lines()[0]).expect("json line");
    let f = &line["fields"];
    assert_eq!(f["status"], 101);
    assert_eq!(f["bytes_in"], 17);
    assert_eq!(f["bytes_out"], 17);
    assert_eq!(f["route"], "default/chat");
    assert_eq!(f["upstream_addr"], ws.addr.to_string());
}

/// `GET path` on `grpc.example` is answered 200 with `body` within 5 s.
async fn answers_in_time(addr: std::net::SocketAddr, path: &str, body: &str, what: &str) {
    let got = tokio::time::timeout(Duration::from_secs(5), get(addr, "grpc.example", path))
        .await
        .map(|r| (r.status, r.body));
    assert!(
        matches!(&got, Ok((s, b)) if *s == 200 && b == body.as_bytes()),
        "{what}: {got:?}"
    );
}

/// A backend that answers before the client finished its request body (bidirectional gRPC may)
/// leaves the stream open until the body ends: it still takes one of the backend's concurrent
/// streams, so the next request goes to another connection instead of waiting for it.
#[tokio::test]
async fn an_h2c_stream_counts_until_its_request_body_ends() {
    let g = serve_backend_with_stream_limit(1, |req, gate| async move {
        if req.uri().path() == "/upload" {
            // Answer at once, holding the request body unread until the test ends.
            let body = req.into_body();
            tokio::spawn(async move {
                let _permit = gate.acquire().await;
                drop(body);
            });
        }
        http::Response::new(support::full("done"))
    })
    .await;
    let p = h2c_proxy(g.addr).await;
    // The backend's SETTINGS (one stream) are read with the first request.
    answers_in_time(p.addr, "/first", "done", "first request").await;
    // An upload that never ends, answered before its end.
    let mut upload = TcpStream::connect(p.addr).await.expect("connect");
    upload
        .write_all(b"POST /upload HTTP/1.1\r\nhost: grpc.example\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 12];
    tokio::time::timeout(DEADLINE, upload.read_exact(&mut head))
        .await
        .expect("answered in time")
        .expect("read");
    assert_eq!(&head, b"HTTP/1.1 200");
    answers_in_time(p.addr, "/small", "done", "a request beside the open upload").await;
    assert_eq!(g.accepted.load(Ordering::SeqCst), 2, "one more connection");
    g.gate.add_permits(1);
}

/// A request hidden behind a bare LF in a chunked body's trailer is never served: the
/// connection closes after the response to the request that carried it.
#[tokio::test]
async fn a_request_hidden_in_a_trailer_is_never_served() {
    let b = echo_backend("b").await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    let (reply, closed) = raw_until_closed(
        &mut s,
        b"POST /public/1 HTTP/1.1\r\nHost: t.local\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\nX: 1\n\r\n\
          GET /admin/victim HTTP/1.1\r\nHost: t.local\r\n\r\n\
          GET /admin/after HTTP/1.1\r\nHost: t.local\r\n\r\n",
    )
    .await;
    assert!(closed, "{reply}");
    // At most the answer to the request that carried it (its body failed at the bare LF).
    assert!(reply.matches("HTTP/1.1 ").count() <= 1, "{reply}");
    assert!(!reply.contains("/admin"), "{reply}");
    // The carrying request may reach the backend (its body failing there) or not; none other.
    assert!(b.requests.load(Ordering::SeqCst) <= 1);
}

/// The same when the backend answers before the body ends: the framing guard stops following
/// after the response head left, and still nothing after the trailer is read as a request.
#[tokio::test]
async fn a_request_hidden_in_a_trailer_after_an_early_answer_is_never_served() {
    let seen: Shared<String> = Shared::default();
    let log = seen.clone();
    let b = serve_backend(move |req, _| {
        let log = log.clone();
        async move {
            if let Ok(mut l) = log.lock() {
                l.push(req.uri().path().to_string());
            }
            // Answer at once, and read the body after (to its end, bounded by the test).
            let body = req.into_body();
            tokio::spawn(async move {
                let _ = body.collect().await;
            });
            http::Response::new(support::full("early"))
        }
    })
    .await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[b.addr])]).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"POST /public/1 HTTP/1.1\r\nHost: t.local\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 12];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut head))
        .await
        .expect("answered in time")
        .expect("read");
    assert_eq!(&head, b"HTTP/1.1 200");
    let (rest, closed) = raw_until_closed(
        &mut s,
        b"0\r\nX: 1\n\r\nGET /admin/victim HTTP/1.1\r\nHost: t.local\r\n\r\n\
          GET /admin/after HTTP/1.1\r\nHost: t.local\r\n\r\n",
    )
    .await;
    assert!(closed, "{rest}");
    assert_eq!(rest.matches("HTTP/1.1 ").count(), 0, "{rest}");
    let paths = seen.lock().map(|l| l.clone()).unwrap_or_default();
    assert_eq!(paths, ["/public/1"]);
}

/// A proxy routing everything to `backend` over h2c.
/// An h2c backend (the h2 crate, driven by hand) that resets every other stream it receives
/// with REFUSED_STREAM, starting with the first, and answers the others 200 "ok".
async fn refusing_h2c_backend() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let head = http::Response::builder()
                        .status(200)
                        .body(())
                        .expect("head");
                    if let Ok(mut body) = respond.send_response(head, false) {
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    (addr, streams)
}

/// A stream the h2c upstream refused (REFUSED_STREAM: closed before any processing, RFC 9113
/// §8.7) is sent again, whatever the method when there is no body, and is no failure of the
/// endpoint. Before, every such request answered 502 and counted towards ejection; a
/// backend at its stream limit, or restarting, failed requests it never saw.
#[tokio::test]
async fn a_refused_h2c_stream_is_sent_again_and_is_no_endpoint_failure() {
    let (refusing, streams) = refusing_h2c_backend().await;
    // A lone endpoint may be ejected here: five failures in a row would show.
    let p = start_proxy(
        ProxyConfig {
            max_ejection_percent: 100,
            ..cfg()
        },
        false,
    )
    .await;
    p.publisher
        .publish(snapshot(&[RouteSpec::prefix(None, "/", &[refusing])
            .policy(|p| p.upstream_protocol = UpstreamProtocol::H2c)]));
    for method in ["POST", "GET", "DELETE", "POST", "PUT", "POST"] {
        let got = send(p.addr, request(method, "/", &[("host", "x")], Bytes::new()))
            .await
            .expect("response");
        assert_eq!(got.status, 200, "{method}");
        assert_eq!(got.text(), "ok");
    }
    assert_eq!(
        streams.load(Ordering::SeqCst),
        12,
        "each refused once, then served"
    );
    assert!(!p.handler.upstreams().is_ejected(refusing));
    // With a body, nothing can be sent again: 502, still no failure of the endpoint.
    for i in 0..6 {
        let got = send(p.addr, request("POST", "/", &[("host", "x")], "body"))
            .await
            .expect("response");
        if got.status == 502 {
            continue;
        }
        assert_eq!(got.status, 200, "POST with a body {i}");
    }
    assert!(!p.handler.upstreams().is_ejected(refusing));
}

/// A retry that meets a refused stream and is sent again is one retry, not two.
#[tokio::test]
async fn a_retry_sent_again_counts_once() {
    let (refusing, _) = refusing_h2c_backend().await;
    let dead = refusing_addr().await;
    let p = proxy_with(&[RouteSpec::prefix(None, "/", &[dead, refusing])
        .policy(|p| p.upstream_protocol = UpstreamProtocol::H2c)])
    .await;
    for i in 0..4 {
        assert_eq!(get(p.addr, "x", "/").await.status, 200, "GET {i}");
    }
    let service = format!("svc-{}", dead.port());
    let labels = ["default", service.as_str()];
    let connect_errors = p
        .metrics
        .upstream_connect_errors
        .with_label_values(&labels)
        .get();
    assert!(connect_errors >= 1, "the dead endpoint was tried");
    assert_eq!(
        p.metrics.upstream_retries.with_label_values(&labels).get(),
        connect_errors,
        "one retry per connect failure"
    );
}

async fn h2c_proxy(backend: std::net::SocketAddr) -> TestProxy {
    proxy_with(&[RouteSpec::prefix(None, "/", &[backend])
        .policy(|p| p.upstream_protocol = UpstreamProtocol::H2c)])
    .await
}
