//! A tiny echo backend for the quick start and manual testing: answers every request with the
//! backend's name, the request line and the forwarding headers portico added.
//!
//! `cargo run --example echo -- --name blue --listen 127.0.0.1:9001 [--listen ...]`

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

fn usage() -> ! {
    eprintln!("usage: echo --name NAME --listen ADDR [--listen ADDR ...]");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut name = String::from("echo");
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => name = args.next().unwrap_or_else(|| usage()),
            "--listen" => match args.next().and_then(|a| a.parse().ok()) {
                Some(a) => addrs.push(a),
                None => usage(),
            },
            _ => usage(),
        }
    }
    if addrs.is_empty() {
        usage();
    }
    let mut tasks = Vec::new();
    for addr in addrs {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("echo {name}: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        println!("echo {name}: listening on {addr}");
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let name = name.clone();
                        async move { Ok::<_, Infallible>(echo(&name, addr, &req)) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn echo(name: &str, addr: SocketAddr, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut out = format!(
        "backend: {name} ({addr})\nrequest: {} {} {:?}\n",
        req.method(),
        req.uri(),
        req.version()
    );
    for (k, v) in req.headers() {
        let k = k.as_str();
        if k == "host" || k.starts_with("x-") {
            out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
    }
    let mut resp = Response::new(Full::new(Bytes::from(out)));
    resp.headers_mut()
        .insert("content-type", http::HeaderValue::from_static("text/plain"));
    resp
}
