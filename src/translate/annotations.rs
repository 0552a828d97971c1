//! Per-Ingress annotations → route policy parameters (brief §4.4, §4.6). Each annotation is read
//! as `portico.dev/<name>` and, where ingress-nginx has it, as `nginx.ingress.kubernetes.io/<name>`;
//! the portico name wins when both are set. A bad value is a Warning and the default is used.
//!
//! Owns: annotation names and value syntax. Must not import tokio, hyper or the filesystem.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::UpstreamProtocol;
use crate::model::duration::parse_seconds_or_duration;

use super::{Diags, ObjRef, RouteDefaults};

pub(super) const PORTICO_PREFIX: &str = "portico.dev/";
pub(super) const NGINX_PREFIX: &str = "nginx.ingress.kubernetes.io/";

const SSL_REDIRECT: &str = "ssl-redirect";
const PROXY_BODY_SIZE: &str = "proxy-body-size";
const PROXY_CONNECT_TIMEOUT: &str = "proxy-connect-timeout";
const PROXY_READ_TIMEOUT: &str = "proxy-read-timeout";
const BACKEND_PROTOCOL: &str = "backend-protocol";
const HSTS: &str = "hsts";
const MAX_CONCURRENT_REQUESTS: &str = "max-concurrent-requests";

/// A value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {name}: {value:?} is not {expected}; the default is used")]
pub(super) struct AnnotationError {
    name: String,
    value: String,
    expected: &'static str,
}

/// `backend-protocol` as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BackendProtocol {
    /// Not set (or set to a bad value): the Service port's `appProtocol` decides.
    Unset,
    Set(UpstreamProtocol),
    /// A valid ingress-nginx value portico does not speak (HTTPS, GRPCS, FCGI, AUTO_HTTP): the
    /// routes cannot be served as written.
    Unsupported(String),
}

/// Everything the annotations of one Ingress say.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Annotations {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub body_limit: u64,
    /// Redirect wanted (default from flags, `"false"` opts out); applied only on hosts with a
    /// valid TLS entry.
    pub ssl_redirect: bool,
    pub hsts: Option<String>,
    pub backend_protocol: BackendProtocol,
    pub max_concurrent_requests: Option<u32>,
}

struct Reader<'a, 'd> {
    map: Option<&'a BTreeMap<String, String>>,
    obj: ObjRef<'a>,
    diags: &'d mut Diags,
}

impl Reader<'_, '_> {
    /// The value under the portico name, else the ingress-nginx name (when `nginx` is true).
    fn get(&self, name: &str, nginx: bool) -> Option<(String, String)> {
        let map = self.map?;
        let portico = format!("{PORTICO_PREFIX}{name}");
        if let Some(v) = map.get(&portico) {
            return Some((portico, v.trim().to_string()));
        }
        if nginx {
            let n = format!("{NGINX_PREFIX}{name}");
            if let Some(v) = map.get(&n) {
                return Some((n, v.trim().to_string()));
            }
        }
        None
    }

    /// Read and parse one annotation; on a bad value warn and return `default`.
    fn read<T>(
        &mut self,
        name: &str,
        nginx: bool,
        expected: &'static str,
        default: T,
        parse: impl Fn(&str) -> Option<T>,
    ) -> T {
        let Some((full, value)) = self.get(name, nginx) else {
            return default;
        };
        match parse(&value) {
            Some(v) => v,
            None => {
                let err = AnnotationError {
                    name: full,
                    value,
                    expected,
                };
                self.diags
                    .warn("Ingress", &self.obj, "InvalidAnnotation", err.to_string());
                default
            }
        }
    }
}

/// Parse the annotations of one Ingress.
pub(super) fn parse(
    map: Option<&BTreeMap<String, String>>,
    defaults: &RouteDefaults,
    obj: ObjRef<'_>,
    diags: &mut Diags,
) -> Annotations {
    let mut r = Reader { map, obj, diags };
    let ssl_redirect = r.read(
        SSL_REDIRECT,
        true,
        "\"true\" or \"false\"",
        defaults.ssl_redirect,
        parse_bool,
    );
    let body_limit = r.read(
        PROXY_BODY_SIZE,
        true,
        "a size such as 8m, 512k, 1g or bytes (0 = unlimited)",
        defaults.body_limit,
        parse_size,
    );
    let connect_timeout = r.read(
        PROXY_CONNECT_TIMEOUT,
        true,
        "a positive duration (seconds, or e.g. 500ms, 5s)",
        defaults.connect_timeout,
        parse_timeout,
    );
    let read_timeout = r.read(
        PROXY_READ_TIMEOUT,
        true,
        "a positive duration (seconds, or e.g. 500ms, 60s)",
        defaults.read_timeout,
        parse_timeout,
    );
    let max_age = defaults.hsts_max_age.as_secs();
    let hsts = r.read(HSTS, false, "\"true\" or \"false\"", None, |v| {
        parse_bool(v).map(|on| on.then(|| format!("max-age={max_age}")))
    });
    let max_concurrent_requests = r.read(
        MAX_CONCURRENT_REQUESTS,
        false,
        "an integer of at least 1",
        None,
        |v| v.parse::<u32>().ok().filter(|n| *n >= 1).map(Some),
    );
    let backend_protocol = r.read(
        BACKEND_PROTOCOL,
        true,
        "one of HTTP, H2C, GRPC (HTTPS, GRPCS, FCGI, AUTO_HTTP are not supported)",
        BackendProtocol::Unset,
        parse_backend_protocol,
    );
    Annotations {
        connect_timeout,
        read_timeout,
        body_limit,
        ssl_redirect,
        hsts,
        backend_protocol,
        max_concurrent_requests,
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    if v.eq_ignore_ascii_case("true") {
        Some(true)
    } else if v.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// nginx size syntax as ingress-nginx accepts it for `proxy-body-size`: digits with an optional
/// `k`, `m` or `g` suffix (either case, binary multiples); `0` disables the limit.
pub(super) fn parse_size(v: &str) -> Option<u64> {
    let (digits, mult) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&v[..v.len() - 1], 1u64 << 20),
        b'g' | b'G' => (&v[..v.len() - 1], 1u64 << 30),
        _ => (v, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// A zero timeout would fail every request, so it is refused like any other bad value.
fn parse_timeout(v: &str) -> Option<Duration> {
    parse_seconds_or_duration(v).filter(|d| !d.is_zero())
}

/// ingress-nginx `backend-protocol` values (case-insensitive) plus portico's `H2C`.
fn parse_backend_protocol(v: &str) -> Option<BackendProtocol> {
    let upper = v.to_ascii_uppercase();
    match upper.as_str() {
        "HTTP" => Some(BackendProtocol::Set(UpstreamProtocol::Http1)),
        "H2C" | "GRPC" => Some(BackendProtocol::Set(UpstreamProtocol::H2c)),
        "HTTPS" | "GRPCS" | "FCGI" | "AUTO_HTTP" => Some(BackendProtocol::Unsupported(upper)),
        _ => None,
    }
}
