//! Listeners: accept loops for HTTP and HTTPS, connection cap, shutdown sequence.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::publish::Reader;

use super::ProxyConfig;

/// Bound proxy listeners, ready to serve.
pub struct Proxy {
    pub http_addr: SocketAddr,
    pub https_addr: SocketAddr,
    _cfg: ProxyConfig,
    _reader: Reader,
    _metrics: Arc<Metrics>,
}

/// Tells a serving [`Proxy`] to close its listeners and drain.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(pub tokio::sync::watch::Sender<bool>);

impl Proxy {
    /// Bind the HTTP and HTTPS listeners.
    pub async fn bind(
        cfg: ProxyConfig,
        reader: Reader,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Proxy> {
        Ok(Proxy {
            http_addr: cfg.http_addr,
            https_addr: cfg.https_addr,
            _cfg: cfg,
            _reader: reader,
            _metrics: metrics,
        })
    }
}
