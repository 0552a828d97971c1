//! The data plane: HTTP and HTTPS listeners, TLS (SNI from the snapshot), routing, forwarding
//! to pod endpoints with pooling and retries, and the request rules of brief §4.4.
//!
//! Owns: everything on the request path. May import: model, publish, metrics, hyper, rustls,
//! tokio. Must never import kube or k8s-openapi types (checked by `tests/architecture.rs`).
//!
//! Seams: [`listener`] accepts connections (TCP, TLS, h1/h2/h2c told apart by [`sniff`],
//! connection cap, shutdown) and hands every request with its [`ConnInfo`] to
//! [`handler::Handler`], which validates, routes and forwards through [`upstream`] (endpoint
//! choice in [`balance`]); [`health`] runs the active health checks beside the listeners.

/// The `AsyncWrite` methods of a read-side IO wrapper: every write goes straight to its
/// `inner` (used by [`framing::FramingIo`] and [`sniff::Prefixed`]).
macro_rules! write_through_to_inner {
    () => {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }
    };
}

pub mod balance;
pub mod client_ip;
pub mod error;
pub mod framing;
pub mod handler;
pub mod health;
pub mod listener;
pub mod ratelimit;
mod route_metrics;
pub mod sniff;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ipnet::IpNet;

pub use listener::{Proxy, ShutdownTrigger};

/// Error type carried by proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every response the proxy writes.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Request line limit (method + target + version), 8 KiB → 414 above it.
pub const DEFAULT_MAX_REQUEST_LINE: usize = 8 * 1024;
/// Header block limit, 64 KiB → 431 above it.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Header count limit → 431 above it.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Client must send its full request head within this.
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle keep-alive client connections close after this.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on open client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default retries on other endpoints.
pub const DEFAULT_MAX_RETRIES: u32 = 2;
/// HTTP/2 streams per connection.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Token buckets tracked at most (all policies together); memory stays bounded under a flood
/// of distinct client keys.
pub const DEFAULT_RATE_LIMIT_MAX_KEYS: usize = 100_000;
/// Passive health never ejects more than this share (percent) of a backend's endpoints.
pub const DEFAULT_MAX_EJECTION_PERCENT: u8 = 50;

/// Proxy settings, from flags.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub http_addr: SocketAddr,
    pub https_addr: SocketAddr,
    pub max_connections: usize,
    /// Whole-proxy cap on concurrent requests; `None` = no cap.
    pub max_concurrent_requests: Option<u32>,
    pub max_request_line: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub client_header_timeout: Duration,
    pub client_idle_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub max_retries: u32,
    /// Peers whose forwarding headers are trusted.
    pub trusted_proxies: Vec<IpNet>,
    /// In-flight requests get this long after listeners close.
    pub shutdown_grace: Duration,
    /// Emit one access-log line per request.
    pub access_log: bool,
    /// Cap on rate-limit buckets held at once.
    pub rate_limit_max_keys: usize,
    /// Largest share (percent, 0-100) of a backend's endpoints passive health may eject.
    pub max_ejection_percent: u8,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            https_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_requests: None,
            max_request_line: DEFAULT_MAX_REQUEST_LINE,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            client_header_timeout: DEFAULT_CLIENT_HEADER_TIMEOUT,
            client_idle_timeout: DEFAULT_CLIENT_IDLE_TIMEOUT,
            stream_idle_timeout: crate::model::DEFAULT_STREAM_IDLE_TIMEOUT,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            max_retries: DEFAULT_MAX_RETRIES,
            trusted_proxies: Vec::new(),
            shutdown_grace: Duration::from_secs(30),
            access_log: true,
            rate_limit_max_keys: DEFAULT_RATE_LIMIT_MAX_KEYS,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

/// Progress of one HTTP/2 stream, in a request's extensions (the listener's per-stream idle
/// timer, brief §4.4 "streams idle"): the handler counts the request body's frames here, so
/// an upload, or the client's half of a bidirectional stream, keeps its stream alive.
#[derive(Clone)]
pub struct StreamProgress(Arc<listener::StreamWatch>);

impl StreamProgress {
    /// One frame moved.
    pub fn moved(&self) {
        self.0.moved();
    }
}

impl std::fmt::Debug for StreamProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamProgress").finish_non_exhaustive()
    }
}

/// What the handler knows about the client connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Came over the HTTPS listener.
    pub tls: bool,
    /// SNI the client sent, lower-case.
    pub sni: Option<Arc<str>>,
    /// The peer address and local port as header values, formatted once per connection
    /// rather than on every request (X-Forwarded-For, X-Real-IP, X-Forwarded-Port).
    pub peer_ip_value: http::HeaderValue,
    pub local_port_value: http::HeaderValue,
}

impl ConnInfo {
    /// `local_port_value`: the listener's port as a header value, shared by its connections.
    pub fn new(
        peer: SocketAddr,
        local: SocketAddr,
        local_port_value: http::HeaderValue,
        tls: bool,
        sni: Option<Arc<str>>,
    ) -> Self {
        let peer_ip_value = ip_header_value(peer.ip());
        ConnInfo {
            peer_ip_value,
            local_port_value,
            peer,
            local,
            tls,
            sni,
        }
    }
}

/// An IP address as a header value (X-Forwarded-For, X-Real-IP), once per connection. IPv4,
/// the common case, is written digit by digit into a stack buffer: through `Display` and a
/// growing `String` it cost about 1 600 instructions, a few percent of a request on a new
/// connection (callgrind).
fn ip_header_value(ip: std::net::IpAddr) -> http::HeaderValue {
    let std::net::IpAddr::V4(v4) = ip else {
        // An IP address is always a valid header value; the String becomes its bytes.
        return http::HeaderValue::try_from(ip.to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
    };
    // At most 4 × 3 digits and 3 dots: "255.255.255.255" fills the buffer exactly, so no
    // index below can go past it.
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    http::HeaderValue::from_bytes(&text[..len])
        .unwrap_or_else(|_| http::HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::ip_header_value;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn ip_header_value_matches_display_for_every_octet_width() {
        let mut cases: Vec<IpAddr> = vec![
            IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
            IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 9, 100, 99)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0xc0a8, 0x101)),
            IpAddr::V6(Ipv4Addr::new(192, 168, 1, 1).to_ipv6_mapped()),
        ];
        // Every octet value in every position.
        for o in 0..=255u8 {
            cases.push(IpAddr::V4(Ipv4Addr::new(
                o,
                255 - o,
                o / 2,
                o.wrapping_mul(7),
            )));
        }
        for ip in cases {
            assert_eq!(
                ip_header_value(ip).to_str().ok(),
                Some(ip.to_string().as_str())
            );
        }
    }
}
