//! The per-request pipeline: validate, normalise, route, forward, answer. Every request from
//! every listener goes through [`Handler::handle`].

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::metrics::Metrics;
use crate::publish::Reader;

use super::{ConnInfo, ProxyBody, ProxyConfig};

/// Shared by all connections and worker threads.
pub struct Handler {
    _cfg: Arc<ProxyConfig>,
    _reader: Reader,
    _metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(cfg: Arc<ProxyConfig>, reader: Reader, metrics: Arc<Metrics>) -> Handler {
        Handler {
            _cfg: cfg,
            _reader: reader,
            _metrics: metrics,
        }
    }

    /// Serve one request. The listener serves connections with upgrades enabled so WebSocket
    /// upgrades can be taken from `req`.
    pub async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
        conn: &ConnInfo,
    ) -> Response<ProxyBody> {
        let _ = (req, conn);
        let body = Full::new(bytes::Bytes::from_static(b"no route\n"))
            .map_err(|never| match never {})
            .boxed();
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::NOT_FOUND;
        resp
    }
}
