//! Every error the request pipeline can answer with, classified by origin, and the ONE place
//! where an error becomes a status code and a client-facing body (brief §4.4 "Status codes").
//!
//! Owns: [`ProxyError`] → status / metric reason / response. Must not import model, publish
//! or upstream internals: bodies are fixed short strings so no address or error text leaks.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::ProxyBody;

/// Where an error came from: the client, the upstream, or portico itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Downstream,
    Upstream,
    Internal,
}

/// An error the handler answers with a status code (never forwarded as-is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    // ---- downstream (the client's request) ----
    /// Request target longer than `max_request_line` → 414 (RFC 9112 §3).
    #[error("request target too long")]
    UriTooLong,
    /// Header block over `max_header_bytes` → 431 (RFC 6585 §5).
    #[error("request header block too large")]
    HeadersTooLarge,
    /// Malformed or ambiguous request → 400. The reason is a metric label, never sent.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A transfer coding other than `chunked` → 501 (RFC 9112 §6.1).
    #[error("unsupported transfer coding")]
    UnsupportedTransferCoding,
    /// CONNECT (tunnelling) is not offered → 501 (RFC 9110 §15.6.2).
    #[error("unsupported method")]
    UnsupportedMethod,
    /// The client's body failed mid-upload (it went away or broke framing) → 400; the client
    /// rarely sees it, but logs and metrics do, and the upstream is not blamed.
    #[error("client request body failed")]
    ClientBody,
    /// Body over the route's limit → 413 (RFC 9110 §15.5.14).
    #[error("request body too large")]
    BodyTooLarge,
    /// The client sent no byte of its body for the route's read timeout → 408 (RFC 9110
    /// §15.5.9; nginx's `client_body_timeout`); the upstream is not blamed.
    #[error("client request body timed out")]
    ClientBodyTimeout,

    // ---- routing / policy (portico) ----
    /// No snapshot published yet → 503.
    #[error("no routing snapshot yet")]
    NotReady,
    /// No route and no default backend → 404.
    #[error("no route")]
    NoRoute,
    /// Route whose backend is missing or has no usable endpoint → 503.
    #[error("no usable endpoint")]
    NoEndpoints,
    /// Over the global, per-Ingress or per-policy (`maxInFlight`) concurrency cap → 503.
    #[error("over concurrency cap ({0})")]
    Overloaded(&'static str),
    /// A RateLimitPolicy's bucket is empty → 429 with `Retry-After` (RFC 6585 §4; brief §4.5:
    /// whole seconds, rounded up, at least 1).
    #[error("rate limited (retry after {retry_after_secs} s)")]
    RateLimited { retry_after_secs: u64 },

    // ---- upstream ----
    /// Connect refused/reset/timed out on every attempt, or reset before response headers → 502.
    #[error("upstream connect failed")]
    UpstreamConnect,
    /// Connection failed after the request was sent, before response headers → 502.
    #[error("upstream failed before response")]
    UpstreamReset,
    /// No response headers within the read timeout → 504.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// A response head whose body length is ambiguous (Transfer-Encoding with Content-Length,
    /// or a coding other than chunked) → 502, as nginx answers.
    #[error("upstream response framing refused")]
    UpstreamFraming,
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, ProxyError>;

impl ProxyError {
    /// Who is to blame.
    pub fn origin(&self) -> Origin {
        use ProxyError::*;
        match self {
            UriTooLong
            | HeadersTooLarge
            | BadRequest(_)
            | UnsupportedTransferCoding
            | UnsupportedMethod
            | ClientBody
            | ClientBodyTimeout
            | BodyTooLarge => Origin::Downstream,
            UpstreamConnect | UpstreamReset | UpstreamTimeout | UpstreamFraming => Origin::Upstream,
            NotReady | NoRoute | NoEndpoints | Overloaded(_) | RateLimited { .. } => {
                Origin::Internal
            }
        }
    }

    /// The one mapping from error to status code (brief §4.4).
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            UriTooLong => StatusCode::URI_TOO_LONG,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BadRequest(_) | ClientBody => StatusCode::BAD_REQUEST,
            UnsupportedTransferCoding | UnsupportedMethod => StatusCode::NOT_IMPLEMENTED,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            NoRoute => StatusCode::NOT_FOUND,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            NotReady | NoEndpoints | Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamConnect | UpstreamReset | UpstreamFraming => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Label for `portico_rejected_requests_total{reason}` (requests refused before routing or
    /// by policy); `None` for errors that are not rejections (upstream failures, 404).
    pub fn reject_reason(&self) -> Option<&'static str> {
        use ProxyError::*;
        match self {
            UriTooLong => Some("uri_too_long"),
            HeadersTooLarge => Some("headers_too_large"),
            BadRequest(r) => Some(r),
            UnsupportedTransferCoding => Some("transfer_coding"),
            UnsupportedMethod => Some("method"),
            ClientBody => Some("client_body"),
            BodyTooLarge => Some("body_too_large"),
            ClientBodyTimeout => Some("client_body_timeout"),
            NotReady => Some("not_ready"),
            Overloaded(r) => Some(r),
            RateLimited { .. } => Some("rate_limited"),
            NoRoute | NoEndpoints | UpstreamConnect | UpstreamReset | UpstreamTimeout
            | UpstreamFraming => None,
        }
    }

    /// Client-facing response: short fixed text/plain, nothing from the error's internals.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let text = match status.canonical_reason() {
            Some(r) => format!("{r}\n"),
            None => format!("{}\n", status.as_u16()),
        };
        let mut resp = Response::new(full_body(Bytes::from(text)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let ProxyError::RateLimited { retry_after_secs } = self {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(*retry_after_secs.max(&1)),
            );
        }
        // After a framing or size error the rest of the connection cannot be trusted
        // (RFC 9112 §9.6: a server that is not going to read the rest should close).
        if matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::UnsupportedTransferCoding
                | ProxyError::UnsupportedMethod
                | ProxyError::ClientBody
                | ProxyError::BodyTooLarge
                | ProxyError::HeadersTooLarge
                | ProxyError::UriTooLong
        ) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// An empty [`ProxyBody`].
pub fn empty_body() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A complete in-memory body as a [`ProxyBody`].
pub fn full_body(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_is_the_brief_table() {
        let cases = [
            (ProxyError::UriTooLong, 414, Origin::Downstream),
            (ProxyError::HeadersTooLarge, 431, Origin::Downstream),
            (ProxyError::BadRequest("x"), 400, Origin::Downstream),
            (
                ProxyError::UnsupportedTransferCoding,
                501,
                Origin::Downstream,
            ),
            (ProxyError::UnsupportedMethod, 501, Origin::Downstream),
            (ProxyError::ClientBody, 400, Origin::Downstream),
            (ProxyError::BodyTooLarge, 413, Origin::Downstream),
            (ProxyError::ClientBodyTimeout, 408, Origin::Downstream),
            (ProxyError::NotReady, 503, Origin::Internal),
            (ProxyError::NoRoute, 404, Origin::Internal),
            (ProxyError::NoEndpoints, 503, Origin::Internal),
            (ProxyError::Overloaded("global"), 503, Origin::Internal),
            (
                ProxyError::RateLimited {
                    retry_after_secs: 3,
                },
                429,
                Origin::Internal,
            ),
            (ProxyError::UpstreamConnect, 502, Origin::Upstream),
            (ProxyError::UpstreamReset, 502, Origin::Upstream),
            (ProxyError::UpstreamTimeout, 504, Origin::Upstream),
            (ProxyError::UpstreamFraming, 502, Origin::Upstream),
        ];
        for (err, code, origin) in cases {
            assert_eq!(err.status().as_u16(), code, "{err}");
            assert_eq!(err.origin(), origin, "{err}");
        }
    }

    #[test]
    fn rate_limited_carries_retry_after_of_at_least_one_second() {
        let resp = ProxyError::RateLimited {
            retry_after_secs: 7,
        }
        .to_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        let resp = ProxyError::RateLimited {
            retry_after_secs: 0,
        }
        .to_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }

    #[tokio::test]
    async fn bodies_are_short_plain_text() {
        let resp = ProxyError::BadRequest("path: secret detail").to_response();
        assert_eq!(resp.status(), 400);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"Bad Request\n");
    }
}
