//! TLS on the HTTPS listener with real handshakes: SNI certificate choice (exact, wildcard,
//! default, generated fallback), rotation without restart, ALPN h2 / http/1.1, protocol
//! versions, and robustness against garbage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico::metrics::Metrics;
use portico::model::{CertKey, Snapshot, TlsTable};
use portico::proxy::listener::{ServeFuture, ServeRequest};
use portico::proxy::tls::{FALLBACK_CERT_NAME, PROTOCOL_VERSIONS, certified_key};
use portico::proxy::{ConnInfo, Proxy, ProxyBody, ProxyConfig, ShutdownTrigger};
use portico::publish::Publisher;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, HandshakeKind, ProtocolVersion, SignatureScheme,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const DEADLINE: Duration = Duration::from_secs(5);

/// Echoes what the listener told it about the connection.
struct Echo;

impl ServeRequest for Echo {
    fn serve<'a>(&'a self, req: Request<Incoming>, conn: &'a ConnInfo) -> ServeFuture<'a> {
        Box::pin(async move {
            let body = Full::new(Bytes::from_static(b"ok"))
                .map_err(|never| match never {})
                .boxed();
            let mut resp: Response<ProxyBody> = Response::new(body);
            let h = resp.headers_mut();
            h.insert("x-tls", conn.tls.to_string().parse().expect("hv"));
            let sni = conn.sni.as_deref().unwrap_or("-").to_string();
            h.insert("x-sni", sni.parse().expect("hv"));
            h.insert(
                "x-version",
                format!("{:?}", req.version()).parse().expect("hv"),
            );
            resp
        })
    }
}

struct Server {
    https: SocketAddr,
    publisher: Publisher,
    _trigger: ShutdownTrigger,
}

async fn start_with(service: Option<Arc<dyn ServeRequest>>) -> Server {
    start_cfg(service, ProxyConfig::default()).await
}

async fn start_cfg(service: Option<Arc<dyn ServeRequest>>, cfg: ProxyConfig) -> Server {
    let (publisher, reader) = portico::publish::channel();
    let metrics = Arc::new(Metrics::new());
    let proxy = match service {
        Some(s) => Proxy::bind_with(cfg, reader, metrics, s).await,
        None => Proxy::bind(cfg, reader, metrics).await,
    }
    .expect("bind");
    let https = proxy.https_addr;
    let trigger = ShutdownTrigger::new();
    tokio::spawn(proxy.serve(trigger.signal()));
    Server {
        https,
        publisher,
        _trigger: trigger,
    }
}

async fn start() -> Server {
    start_with(Some(Arc::new(Echo))).await
}

/// A self-signed certificate for `names`, as the snapshot holds it, plus its DER to compare.
fn cert(names: &[&str], source: &str) -> (CertKey, CertificateDer<'static>) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names).expect("rcgen");
    let der = cert.der().clone();
    let key_der = signing_key.serialize_der();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.clone()));
    let certified = certified_key(vec![der.clone()], &key).expect("certified key");
    let mut material = der.to_vec();
    material.extend_from_slice(&key_der);
    (
        CertKey {
            key: certified,
            source: Arc::from(source),
            material: Arc::from(material),
            validity: None,
        },
        der,
    )
}

fn snapshot(
    exact: &[(&str, &CertKey)],
    wildcard: &[(&str, &CertKey)],
    default: Option<&CertKey>,
) -> Snapshot {
    let map = |entries: &[(&str, &CertKey)]| -> HashMap<String, CertKey> {
        entries
            .iter()
            .map(|(n, c)| (n.to_string(), (*c).clone()))
            .collect()
    };
    Snapshot {
        tls: Arc::new(TlsTable {
            exact: map(exact),
            wildcard: map(wildcard),
            default: default.cloned(),
            ..TlsTable::default()
        }),
        ..Snapshot::default()
    }
}

/// Accepts any server certificate (the tests compare it themselves) but still checks the
/// handshake signatures, so the server must hold the key of what it presents.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

struct Client {
    versions: &'static [&'static rustls::SupportedProtocolVersion],
    /// Cipher suites offered, in the client's order (empty: ring's default, AES-256 first).
    suites: Vec<rustls::SupportedCipherSuite>,
    alpn: Vec<Vec<u8>>,
    sni: Option<&'static str>,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            versions: rustls::DEFAULT_VERSIONS,
            suites: Vec::new(),
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            sni: Some("example.com"),
        }
    }
}

impl Client {
    fn sni(name: &'static str) -> Self {
        Client {
            sni: Some(name),
            ..Client::default()
        }
    }

    fn no_sni() -> Self {
        Client {
            sni: None,
            ..Client::default()
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TlsStream<TcpStream>, std::io::Error> {
        self.connect_with(self.config(), addr).await
    }

    /// The client configuration; one config (its verifier and session store) across
    /// connects is what lets a client resume.
    fn config(&self) -> Arc<ClientConfig> {
        let mut p = rustls::crypto::ring::default_provider();
        if !self.suites.is_empty() {
            p.cipher_suites = self.suites.clone();
        }
        let p = Arc::new(p);
        let mut cfg = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(self.versions)
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(p)))
            .with_no_client_auth();
        cfg.alpn_protocols = self.alpn.clone();
        cfg.enable_sni = self.sni.is_some();
        Arc::new(cfg)
    }

    async fn connect_with(
        &self,
        cfg: Arc<ClientConfig>,
        addr: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, std::io::Error> {
        let name = ServerName::try_from(self.sni.unwrap_or("nosni.invalid").to_string())
            .expect("server name");
        let tcp = TcpStream::connect(addr).await?;
        timeout(DEADLINE, TlsConnector::from(cfg).connect(name, tcp))
            .await
            .expect("handshake before the deadline")
    }

    /// The leaf certificate the server presented.
    async fn leaf(&self, addr: SocketAddr) -> CertificateDer<'static> {
        let tls = self.connect(addr).await.expect("handshake");
        let (_, conn) = tls.get_ref();
        conn.peer_certificates().expect("server certificate")[0].clone()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn sni_exact_name_gets_its_certificate() {
    let srv = start().await;
    let (a, a_der) = cert(&["a.example.com"], "ns/a");
    let (b, b_der) = cert(&["b.example.com"], "ns/b");
    srv.publisher.publish(snapshot(
        &[("a.example.com", &a), ("b.example.com", &b)],
        &[],
        None,
    ));
    assert_eq!(Client::sni("a.example.com").leaf(srv.https).await, a_der);
    assert_eq!(Client::sni("b.example.com").leaf(srv.https).await, b_der);
    // SNI is case-insensitive (RFC 6066 §3: DNS host names).
    assert_eq!(Client::sni("A.Example.COM").leaf(srv.https).await, a_der);
}

#[tokio::test]
async fn sni_matching_a_wildcard_gets_the_wildcard_certificate() {
    let srv = start().await;
    let (exact, exact_der) = cert(&["www.example.com"], "ns/exact");
    let (wild, wild_der) = cert(&["*.example.com"], "ns/wild");
    let (default, default_der) = cert(&["default.invalid"], "ns/default");
    srv.publisher.publish(snapshot(
        &[("www.example.com", &exact)],
        &[("example.com", &wild)],
        Some(&default),
    ));
    assert_eq!(
        Client::sni("shop.example.com").leaf(srv.https).await,
        wild_der
    );
    // Exact beats wildcard.
    assert_eq!(
        Client::sni("www.example.com").leaf(srv.https).await,
        exact_der
    );
    // A wildcard covers exactly one label.
    assert_eq!(
        Client::sni("a.b.example.com").leaf(srv.https).await,
        default_der
    );
    assert_eq!(
        Client::sni("example.com").leaf(srv.https).await,
        default_der
    );
}

#[tokio::test]
async fn unknown_and_missing_sni_get_the_default_certificate_when_set() {
    let srv = start().await;
    let (a, _) = cert(&["a.example.com"], "ns/a");
    let (default, default_der) = cert(&["default.invalid"], "ns/default");
    srv.publisher
        .publish(snapshot(&[("a.example.com", &a)], &[], Some(&default)));
    assert_eq!(
        Client::sni("other.example.org").leaf(srv.https).await,
        default_der
    );
    assert_eq!(Client::no_sni().leaf(srv.https).await, default_der);
}

#[tokio::test]
async fn without_a_default_the_generated_fallback_is_served() {
    let srv = start().await;
    // Before any snapshot: fallback.
    let before = Client::no_sni().leaf(srv.https).await;
    assert!(contains(before.as_ref(), FALLBACK_CERT_NAME.as_bytes()));
    let (a, a_der) = cert(&["a.example.com"], "ns/a");
    srv.publisher
        .publish(snapshot(&[("a.example.com", &a)], &[], None));
    let unknown = Client::sni("other.example.org").leaf(srv.https).await;
    let missing = Client::no_sni().leaf(srv.https).await;
    assert_ne!(unknown, a_der);
    // One fallback generated at start, served for all of them.
    assert_eq!(unknown, before);
    assert_eq!(missing, before);
}

#[tokio::test]
async fn rotated_certificate_reaches_new_handshakes_without_restart() {
    let srv = start().await;
    let (v1, v1_der) = cert(&["a.example.com"], "ns/a");
    let (v2, v2_der) = cert(&["a.example.com"], "ns/a");
    srv.publisher
        .publish(snapshot(&[("a.example.com", &v1)], &[], None));
    let old = Client::sni("a.example.com")
        .connect(srv.https)
        .await
        .expect("handshake");
    assert_eq!(
        old.get_ref().1.peer_certificates().expect("cert")[0],
        v1_der
    );
    srv.publisher
        .publish(snapshot(&[("a.example.com", &v2)], &[], None));
    assert_eq!(Client::sni("a.example.com").leaf(srv.https).await, v2_der);
}

/// An HTTP/2 client over an established TLS stream (its connection driven by a task).
async fn h2_sender(
    tls: TlsStream<TcpStream>,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

#[tokio::test]
async fn alpn_h2_is_negotiated_and_http2_is_served_over_tls() {
    // The real handler through Proxy::bind: a snapshot without routes answers 404.
    let srv = start_with(None).await;
    srv.publisher.publish(snapshot(&[], &[], None));
    let tls = Client::sni("a.example.com")
        .connect(srv.https)
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut send = h2_sender(tls).await;
    let req = Request::builder()
        .uri("https://a.example.com/")
        .body(Empty::new())
        .expect("request");
    let resp = timeout(DEADLINE, send.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "no route in the snapshot"
    );
}

#[tokio::test]
async fn conn_info_carries_tls_and_lower_cased_sni() {
    let srv = start().await;
    let tls = Client::sni("Shop.Example.COM")
        .connect(srv.https)
        .await
        .expect("handshake");
    let mut send = h2_sender(tls).await;
    let req = Request::builder()
        .uri("https://shop.example.com/")
        .body(Empty::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.headers()["x-tls"], "true");
    assert_eq!(resp.headers()["x-sni"], "shop.example.com");
    assert_eq!(resp.headers()["x-version"], "HTTP/2.0");
}

#[tokio::test]
async fn the_server_picks_aes128_gcm_over_the_clients_order_but_serves_what_it_offers() {
    use rustls::CipherSuite as S;
    use rustls::crypto::ring::cipher_suite as cs;
    let srv = start().await;
    static V12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    static V13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    for (versions, suites, expect) in [
        // ring's default client order lists AES-256-GCM first: the server's order wins.
        (V13, vec![], S::TLS13_AES_128_GCM_SHA256),
        (V12, vec![], S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        (
            V13,
            vec![
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS13_AES_256_GCM_SHA384,
            ],
            S::TLS13_AES_256_GCM_SHA384,
        ),
        (
            V13,
            vec![cs::TLS13_CHACHA20_POLY1305_SHA256],
            S::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ] {
        let client = Client {
            versions,
            suites,
            ..Client::default()
        };
        let tls = client.connect(srv.https).await.expect("handshake");
        let suite = tls.get_ref().1.negotiated_cipher_suite().expect("suite");
        assert_eq!(suite.suite(), expect);
    }
}

/// One HTTP/1.1 request over `tls` to its end, so the client also reads the session tickets
/// the server sent after the handshake.
async fn get_to_end(mut tls: TlsStream<TcpStream>) {
    tls.write_all(b"GET / HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut resp = Vec::new();
    timeout(DEADLINE, tls.read_to_end(&mut resp))
        .await
        .expect("response before the deadline")
        .expect("read");
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{resp:?}");
}

/// Stateless tickets: a client resumes after many other clients' full handshakes, where a
/// 256-entry server cache (two entries per handshake) would have forgotten its session.
#[tokio::test]
async fn a_client_resumes_its_session_after_hundreds_of_other_handshakes() {
    let srv = start().await;
    static V13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    static V12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    for versions in [V13, V12] {
        let client = Client {
            versions,
            alpn: vec![b"http/1.1".to_vec()],
            ..Client::default()
        };
        let returning = client.config();
        let connect = || client.connect_with(returning.clone(), srv.https);
        let first = connect().await.expect("handshake");
        assert_eq!(
            first.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Full)
        );
        get_to_end(first).await;
        // Bounded: 200 other clients' full handshakes (a fresh config each: no resumption).
        for _ in 0..200 {
            get_to_end(client.connect(srv.https).await.expect("handshake")).await;
        }
        let again = connect().await.expect("handshake");
        assert_eq!(
            again.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{versions:?}"
        );
        get_to_end(again).await;
    }
}

#[tokio::test]
async fn http11_over_tls_by_alpn_and_without_alpn() {
    let srv = start().await;
    // `curl --http1.0` offers only http/1.0; HTTP/1.1 is answered on it as on no ALPN.
    for alpn in [
        vec![b"http/1.1".to_vec()],
        vec![],
        vec![b"http/1.0".to_vec()],
    ] {
        let client = Client {
            alpn: alpn.clone(),
            ..Client::default()
        };
        let tls = client.connect(srv.https).await.expect("handshake");
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(negotiated, alpn.first().cloned());
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("/")
            .header(http::header::HOST, "example.com")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.version(), Version::HTTP_11);
        assert_eq!(resp.headers()["x-version"], "HTTP/1.1");
        assert_eq!(resp.headers()["x-tls"], "true");
    }
}

#[tokio::test]
async fn only_tls12_and_tls13_are_offered() {
    assert_eq!(
        PROTOCOL_VERSIONS
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2]
    );
    let srv = start().await;
    static V12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    static V13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    for (versions, expect) in [
        (V12, ProtocolVersion::TLSv1_2),
        (V13, ProtocolVersion::TLSv1_3),
    ] {
        let client = Client {
            versions,
            ..Client::default()
        };
        let tls = client.connect(srv.https).await.expect("handshake");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expect));
    }

    // rustls clients cannot speak TLS 1.1, so hand-build one ClientHello that differs only in
    // its version: legacy_version 0x0303 (TLS 1.2) must get a ServerHello and 0x0302 (TLS
    // 1.1, no supported_versions extension; RFC 8446 §4.1.2, D.2) must be refused.
    let reply = raw_hello(srv.https, [0x03, 0x03]).await;
    assert_eq!(
        reply[0], 0x16,
        "TLS 1.2 hello gets a handshake record: {reply:?}"
    );
    assert_eq!(reply[5], 0x02, "ServerHello");
    let reply = raw_hello(srv.https, [0x03, 0x02]).await;
    // An alert record (content type 21), fatal, protocol_version (70).
    assert!(reply.len() >= 7, "an alert: {reply:?}");
    assert_eq!(reply[0], 0x15, "alert, not a handshake record: {reply:?}");
    assert_eq!(reply[5], 2, "fatal");
    assert_eq!(reply[6], 70, "protocol_version");
}

/// Send a minimal ECDHE-ECDSA ClientHello with `version` and return what the server sent
/// before closing (or the first bytes of its flight).
async fn raw_hello(addr: SocketAddr, version: [u8; 2]) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend(kind.to_be_bytes());
        out.extend((data.len() as u16).to_be_bytes());
        out.extend(data);
    }
    let mut exts = Vec::new();
    ext(&mut exts, 0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, P-256
    ext(&mut exts, 0x000b, &[0x01, 0x00]); // ec_point_formats: uncompressed
    ext(
        &mut exts,
        0x000d,
        &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01], // ecdsa_p256_sha256, pss, pkcs1
    );
    let mut body = version.to_vec();
    body.extend([0x42; 32]); // random
    body.push(0); // empty session id
    // ECDHE_ECDSA_AES128_GCM_SHA256, ECDHE_RSA_AES128_GCM_SHA256
    body.extend([0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend([0x01, 0x00]); // compression: null
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend((body.len() as u16).to_be_bytes());
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&record).await.expect("write hello");
    let mut reply = vec![0u8; 7];
    timeout(DEADLINE, tcp.read_exact(&mut reply))
        .await
        .expect("server answers in time")
        .expect("at least a record header and two bytes");
    reply
}

#[tokio::test]
async fn garbage_on_the_tls_port_does_not_hurt_other_clients() {
    let srv = start().await;
    let (a, a_der) = cert(&["a.example.com"], "ns/a");
    srv.publisher
        .publish(snapshot(&[("a.example.com", &a)], &[], None));
    // A stalled socket that never sends a ClientHello stays open meanwhile.
    let _stalled = TcpStream::connect(srv.https).await.expect("connect");
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x00, 0x00][..],
        &[0u8; 512][..],
    ] {
        let mut tcp = TcpStream::connect(srv.https).await.expect("connect");
        tcp.write_all(garbage).await.expect("write");
        let mut sink = Vec::new();
        // The server gives up on it (alert and close, or reset).
        let closed = timeout(DEADLINE, tcp.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "server closed the garbage connection");
        assert_eq!(Client::sni("a.example.com").leaf(srv.https).await, a_der);
    }
}

/// HTTP/2 chosen by ALPN: the connection preface is the first request's head, so a client that
/// completes the handshake and then sends nothing is closed after the header timeout, not after
/// the (longer) idle timeout; one that sends its preface is served.
#[tokio::test]
async fn an_h2_connection_without_its_preface_is_closed_after_the_header_timeout() {
    let srv = start_cfg(
        None,
        ProxyConfig {
            client_header_timeout: Duration::from_millis(300),
            client_idle_timeout: Duration::from_secs(3600),
            ..ProxyConfig::default()
        },
    )
    .await;
    srv.publisher.publish(snapshot(&[], &[], None));
    let mut silent = Client::default()
        .connect(srv.https)
        .await
        .expect("handshake");
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut sink = Vec::new();
    let _ = timeout(DEADLINE, silent.read_to_end(&mut sink))
        .await
        .expect("closed well before the idle timeout");

    let tls = Client::default()
        .connect(srv.https)
        .await
        .expect("handshake");
    let mut send = h2_sender(tls).await;
    // Past the header timeout, the connection (preface sent) idles and still serves.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let req = Request::builder()
        .uri("https://a.example.com/")
        .body(Empty::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn a_stalled_handshake_is_closed_after_the_header_timeout() {
    let srv = start_cfg(
        Some(Arc::new(Echo)),
        ProxyConfig {
            client_header_timeout: Duration::from_millis(300),
            ..ProxyConfig::default()
        },
    )
    .await;
    let mut stalled = TcpStream::connect(srv.https).await.expect("connect");
    let from = tokio::time::Instant::now();
    let mut sink = Vec::new();
    let read = timeout(DEADLINE, stalled.read_to_end(&mut sink))
        .await
        .expect("closed before the deadline");
    assert!(from.elapsed() >= Duration::from_millis(250));
    if read.is_ok() {
        assert!(
            sink.is_empty(),
            "nothing sent to a client that sent nothing"
        );
    }
    // Others still get served.
    assert!(Client::default().connect(srv.https).await.is_ok());
}
