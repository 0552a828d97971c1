//! Test support: runs the real `portico` binary on OS-chosen 127.0.0.1 ports (read back from
//! its `listening` log line), plus a plain HTTP client, a counting backend and bounded polling.
//! Include with `#[path = "support/process.rs"] mod process;`.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub const BIN: &str = env!("CARGO_BIN_EXE_portico");
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running portico process; killed (by PID, via Child) when dropped.
pub struct Portico {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    /// Whether the thread reading portico's stdout is held ([`Portico::stop_reading`]).
    held: Arc<(Mutex<bool>, Condvar)>,
}

impl Drop for Portico {
    fn drop(&mut self) {
        // Let the reader run to EOF, so its thread ends with the process.
        self.resume_reading();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what portico logged, so a failure that does not reproduce
        // can still be read.
        if std::thread::panicking()
            && let Ok(lines) = self.lines.lock()
        {
            eprintln!("--- portico's log ({} lines) ---", lines.len());
            for line in lines.iter() {
                eprintln!("{line}");
            }
        }
    }
}

impl Portico {
    /// `portico run --manifests DIR` plus `extra`.
    pub fn start(dir: &Path, extra: &[&str]) -> Portico {
        let mut args: Vec<std::ffi::OsString> = vec!["--manifests".into(), dir.into()];
        args.extend(extra.iter().map(Into::into));
        Portico::run(&args)
    }

    /// `portico run` with `args`, on OS-chosen 127.0.0.1 ports read back from its log.
    pub fn run(args: &[std::ffi::OsString]) -> Portico {
        let child = Command::new(BIN)
            .arg("run")
            .args(["--http-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn portico");
        // Owned by `Portico` at once, so its Drop kills and reaps the child on every path.
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut p = Portico {
            child,
            lines: Arc::new(Mutex::new(Vec::new())),
            http: unknown,
            https: unknown,
            admin: unknown,
            held: Arc::new((Mutex::new(false), Condvar::new())),
        };
        let stdout = p.child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let sink = p.lines.clone();
        let held = p.held.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lock").push(line.clone());
                let _ = tx.send(line);
                // Bounded: `resume_reading` (called by Drop at the latest) opens the gate.
                let (lock, cv) = &*held;
                let mut g = lock.lock().expect("lock");
                while *g {
                    g = cv.wait(g).expect("wait");
                }
            }
        });
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("portico logged `listening` in time");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["message"] == "listening" {
                let addr = |k: &str| {
                    v[k].as_str()
                        .and_then(|s| s.parse().ok())
                        .expect("address field")
                };
                p.http = addr("http_addr");
                p.https = addr("https_addr");
                p.admin = addr("admin_addr");
                return p;
            }
        }
    }

    /// Stop reading portico's stdout (after at most the line being read): its pipe fills, as
    /// behind a log collector that is stuck. Until [`Portico::resume_reading`] or drop.
    pub fn stop_reading(&self) {
        *self.held.0.lock().expect("lock") = true;
    }

    pub fn resume_reading(&self) {
        let (lock, cv) = &*self.held;
        *lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
        cv.notify_all();
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains(needle))
    }
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn get(
    c: &HttpClient,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = c.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Poll `f` until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A backend that answers `name` and counts requests per listener address.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

pub async fn backend(name: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    h.fetch_add(1, Ordering::Relaxed);
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from(name)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Backend { addr, hits }
}

/// A self-signed certificate for `host` as (PEM cert, PEM key, DER cert).
pub fn cert_for(host: &str) -> (String, String, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_string()]).expect("rcgen");
    (
        ck.cert.pem(),
        ck.signing_key.serialize_pem(),
        ck.cert.der().to_vec(),
    )
}

pub fn tls_secret_yaml(ns: &str, name: &str, cert: &str, key: &str) -> String {
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(cert),
        indent(key)
    )
}

/// TLS handshake with `sni`, trusting `roots`; the negotiated ALPN and the leaf DER, or `None`
/// when the handshake fails (e.g. an untrusted certificate before the Secret is loaded).
pub async fn handshake(
    addr: SocketAddr,
    sni: &str,
    roots: &[Vec<u8>],
) -> Option<(Option<Vec<u8>>, Vec<u8>)> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(rustls_pki_types::CertificateDer::from(r.clone()))
            .expect("root");
    }
    let mut cc = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    cc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
        .connect(name, tcp)
        .await
        .ok()?;
    let conn = tls.get_ref().1;
    let leaf = conn.peer_certificates()?.first()?.to_vec();
    Some((conn.alpn_protocol().map(<[u8]>::to_vec), leaf))
}

/// Accepts any server certificate: only for looking at which certificate the server sent.
#[derive(Debug)]
pub struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
