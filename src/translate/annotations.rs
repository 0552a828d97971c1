//! Per-Ingress annotations → route policy parameters (brief §4.4, §4.6). Each annotation is read
//! as `portico.dev/<name>` and, where ingress-nginx has it, as `nginx.ingress.kubernetes.io/<name>`;
//! the portico name wins when both are set. A bad value is a Warning and the default is used.
//!
//! Owns: annotation names and value syntax. Must not import tokio, hyper or the filesystem.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::model::duration::parse_seconds_or_duration;
use crate::model::{
    DEFAULT_HEALTH_CHECK_INTERVAL, DEFAULT_HEALTH_CHECK_TIMEOUT, DEFAULT_HEALTHY_THRESHOLD,
    DEFAULT_UNHEALTHY_THRESHOLD, HashKey, HealthCheck, LoadBalance, UpstreamProtocol,
};

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
const LOAD_BALANCE: &str = "load-balance";
const HASH_KEY: &str = "hash-key";
const HASH_COOKIE_TTL: &str = "hash-cookie-ttl";
const HEALTH_CHECK_PATH: &str = "health-check-path";
const HEALTH_CHECK_INTERVAL: &str = "health-check-interval";
const HEALTH_CHECK_TIMEOUT: &str = "health-check-timeout";
const HEALTH_CHECK_HEALTHY: &str = "health-check-healthy-threshold";
const HEALTH_CHECK_UNHEALTHY: &str = "health-check-unhealthy-threshold";
/// ingress-nginx sticky sessions (`affinity: cookie`), read for migrating users.
const NGINX_AFFINITY: &str = "affinity";
const NGINX_SESSION_COOKIE_NAME: &str = "session-cookie-name";
const NGINX_SESSION_COOKIE_MAX_AGE: &str = "session-cookie-max-age";
/// ingress-nginx's default `session-cookie-name`.
const NGINX_DEFAULT_COOKIE: &str = "INGRESSCOOKIE";

/// ingress-nginx annotations that decide who may reach a route, which portico does not
/// implement. Served without them, a route would be open that its owner closed: such an
/// Ingress's routes answer 503 instead, with an Error diagnostic naming the annotation.
/// (`auth-tls-secret` alone asks for client certificates: ingress-nginx's
/// `auth-tls-verify-client` defaults to "on". With `auth-tls-verify-client: "off"` neither asks
/// for anything and both are ignored.)
const NGINX_ACCESS_CONTROL: &[&str] = &[
    "auth-url",
    "auth-type",
    "auth-secret",
    "auth-tls-secret",
    "auth-tls-verify-client",
    "whitelist-source-range",
    "allowlist-source-range",
    "denylist-source-range",
    "satisfy",
];

/// The shortest `health-check-interval` (kubelet's shortest probe period too).
const MIN_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What portico does instead of an unsupported ingress-nginx path annotation.
const AS_WRITTEN: &str =
    "paths are matched and forwarded as written (ImplementationSpecific as Prefix)";
/// ... of an unsupported affinity cookie annotation.
const COOKIE_AS_BUILT: &str = "the affinity cookie is issued with Path=/, HttpOnly, \
     SameSite=Lax, Secure over HTTPS, and session-cookie-max-age as its only lifetime";

/// ingress-nginx annotations that change which backend path a request reaches (regex paths,
/// rewrites, redirects), how it is redirected or kept on an endpoint, or that inject nginx
/// configuration, which portico does not implement, each with what happens instead: the
/// Ingress is served, with a Warning, so a migrating user sees the difference.
const NGINX_UNSUPPORTED_ROUTING: &[(&str, &str)] = &[
    ("use-regex", AS_WRITTEN),
    ("rewrite-target", AS_WRITTEN),
    ("app-root", AS_WRITTEN),
    ("permanent-redirect", AS_WRITTEN),
    ("temporal-redirect", AS_WRITTEN),
    ("configuration-snippet", AS_WRITTEN),
    ("server-snippet", AS_WRITTEN),
    (
        "force-ssl-redirect",
        "plain HTTP is redirected only on hosts with TLS, as ssl-redirect says",
    ),
    ("affinity-mode", COOKIE_AS_BUILT),
    ("session-cookie-samesite", COOKIE_AS_BUILT),
    ("session-cookie-path", COOKIE_AS_BUILT),
    ("session-cookie-expires", COOKIE_AS_BUILT),
    ("session-cookie-change-on-failure", COOKIE_AS_BUILT),
    (
        "server-alias",
        "only the rule's host is served; list the other hosts as rules of their own",
    ),
    (
        "limit-rps",
        "requests are not limited; a RateLimitPolicy (portico.dev/v1alpha1) limits them",
    ),
    (
        "limit-rpm",
        "requests are not limited; a RateLimitPolicy (portico.dev/v1alpha1) limits them",
    ),
    (
        "limit-connections",
        "connections are not limited; portico.dev/max-concurrent-requests caps concurrent \
         requests",
    ),
    (
        "ssl-passthrough",
        "TLS is terminated by portico and the backend receives plain HTTP",
    ),
];

/// ingress-nginx `canary: "true"`: the Ingress adds a weighted or header-selected alternative
/// backend to another Ingress's host and path. portico does not split traffic; such an Ingress
/// is not served (as ingress-nginx, it never takes a path of its own), so the main Ingress
/// serves all of it.
const NGINX_CANARY: &str = "canary";

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
    /// `load-balance` + `hash-key` + `hash-cookie-ttl` (or ingress-nginx `affinity: cookie`).
    pub load_balance: LoadBalance,
    /// `health-check-*`: `Some` when `health-check-path` is set and valid.
    pub health_check: Option<Arc<HealthCheck>>,
    /// The first ingress-nginx access-control annotation present ([`NGINX_ACCESS_CONTROL`]):
    /// the routes cannot be served as written.
    pub access_control: Option<String>,
    /// ingress-nginx `canary: "true"` ([`NGINX_CANARY`]): the Ingress is not served.
    pub canary: bool,
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
    // A portico-only annotation: only "true" and "false". Browsers remember HSTS, so a typo
    // must not turn it on.
    let hsts = r.read(HSTS, false, "\"true\" or \"false\"", None, |v| {
        let on = if v.eq_ignore_ascii_case("true") {
            true
        } else if v.eq_ignore_ascii_case("false") {
            false
        } else {
            return None;
        };
        Some(on.then(|| format!("max-age={max_age}")))
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
    let load_balance = load_balance(&mut r);
    let health_check = health_check(&mut r);
    let access_control = unsupported_nginx(&mut r);
    let canary = match r
        .map
        .and_then(|m| m.get(&format!("{NGINX_PREFIX}{NGINX_CANARY}")))
    {
        None => false,
        Some(v) => parse_bool(v.trim()).unwrap_or_else(|| {
            // As in ingress-nginx, an unreadable value leaves the Ingress an ordinary one.
            bad_nginx_value(&mut r, NGINX_CANARY, v.clone(), "\"true\" or \"false\"");
            false
        }),
    };
    if canary {
        r.diags.warn(
            "Ingress",
            &r.obj,
            "UnsupportedAnnotation",
            format!(
                "annotation {NGINX_PREFIX}{NGINX_CANARY} is not supported by portico: this canary \
                 Ingress is not served, and the main Ingress of its hosts and paths serves all \
                 of their traffic"
            ),
        );
    }
    Annotations {
        connect_timeout,
        read_timeout,
        body_limit,
        ssl_redirect,
        hsts,
        backend_protocol,
        max_concurrent_requests,
        load_balance,
        health_check,
        access_control,
        canary,
    }
}

/// Warns about the ingress-nginx annotations portico does not implement that change routing,
/// and returns the first access-control one (its routes are refused, see
/// [`Annotations::access_control`]; the diagnostic is the route's).
fn unsupported_nginx(r: &mut Reader<'_, '_>) -> Option<String> {
    let map = r.map?;
    let mut snippet_access = None;
    for (name, instead) in NGINX_UNSUPPORTED_ROUTING {
        let full = format!("{NGINX_PREFIX}{name}");
        let Some(value) = map.get(&full) else {
            continue;
        };
        // A snippet that restricts access (`deny all;`, `auth_request`) closed the routes in
        // nginx: refused like the access-control annotations, not served open with a warning.
        if matches!(*name, "configuration-snippet" | "server-snippet") && restricts_access(value) {
            snippet_access.get_or_insert(full);
            continue;
        }
        // `use-regex: "false"` and `force-ssl-redirect: "false"` ask for what portico does
        // anyway.
        if matches!(*name, "use-regex" | "force-ssl-redirect") && parse_bool(value) == Some(false) {
            continue;
        }
        r.diags.warn(
            "Ingress",
            &r.obj,
            "UnsupportedAnnotation",
            format!("annotation {full} is not supported by portico and is ignored: {instead}"),
        );
    }
    let verify_off = map
        .get(&format!("{NGINX_PREFIX}auth-tls-verify-client"))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("off"));
    NGINX_ACCESS_CONTROL
        .iter()
        .find_map(|name| {
            let full = format!("{NGINX_PREFIX}{name}");
            map.get(&full)?;
            let off = name.starts_with("auth-tls-") && verify_off;
            (!off).then_some(full)
        })
        .or(snippet_access)
}

/// nginx directives that decide who may reach a location.
const NGINX_ACCESS_DIRECTIVES: &[&str] = &[
    "allow",
    "deny",
    "auth_basic",
    "auth_request",
    "auth_jwt",
    "satisfy",
];

/// Whether an nginx snippet holds an access directive: a statement (after the start, a `;`,
/// `{` or `}`, comments removed) whose first word is one of [`NGINX_ACCESS_DIRECTIVES`].
fn restricts_access(snippet: &str) -> bool {
    let code: String = snippet
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    code.split([';', '{', '}'])
        .filter_map(|statement| statement.split_whitespace().next())
        .any(|word| NGINX_ACCESS_DIRECTIVES.contains(&word))
}

/// What `load-balance` names, before the hash key is attached.
#[derive(Clone, Copy)]
enum Strategy {
    RoundRobin,
    LeastRequest,
    Random,
    ConsistentHash,
}

/// `load-balance`, `hash-key`, `hash-cookie-ttl` (brief §4.6). Without a portico
/// `load-balance`, ingress-nginx `affinity: cookie` (+ `session-cookie-name`,
/// `session-cookie-max-age`) means consistent hashing on that cookie, so sticky sessions keep
/// working after a migration.
fn load_balance(r: &mut Reader<'_, '_>) -> LoadBalance {
    let strategy = r.read(
        LOAD_BALANCE,
        false,
        "one of round-robin, least-request, random, consistent-hash",
        None,
        |v| match v {
            "round-robin" => Some(Some(Strategy::RoundRobin)),
            "least-request" => Some(Some(Strategy::LeastRequest)),
            "random" => Some(Some(Strategy::Random)),
            "consistent-hash" => Some(Some(Strategy::ConsistentHash)),
            _ => None,
        },
    );
    let ttl = r.read(
        HASH_COOKIE_TTL,
        false,
        "a positive duration (seconds, or e.g. 30m, 12h)",
        None,
        |v| parse_timeout(v).map(Some),
    );
    let key = r.read(
        HASH_KEY,
        false,
        "client-ip, header:<name> or cookie:<name>",
        None,
        |v| parse_hash_key(v, ttl).map(Some),
    );
    let chosen = match strategy {
        None if key.is_none() => return nginx_affinity(r).unwrap_or_default(),
        None | Some(Strategy::RoundRobin) => LoadBalance::RoundRobin,
        Some(Strategy::LeastRequest) => LoadBalance::LeastRequest,
        Some(Strategy::Random) => LoadBalance::Random,
        Some(Strategy::ConsistentHash) => {
            return LoadBalance::ConsistentHash(key.unwrap_or(HashKey::ClientIp));
        }
    };
    if key.is_some() {
        // `hash-key` without `load-balance: consistent-hash` is most likely a forgotten
        // annotation; say so rather than silently balancing some other way.
        r.diags.warn(
            "Ingress",
            &r.obj,
            "InvalidAnnotation",
            format!(
                "annotation {PORTICO_PREFIX}{HASH_KEY} is ignored without \
                 {PORTICO_PREFIX}{LOAD_BALANCE}: consistent-hash"
            ),
        );
    }
    chosen
}

/// ingress-nginx `affinity: cookie` as consistent hashing on the session cookie.
fn nginx_affinity(r: &mut Reader<'_, '_>) -> Option<LoadBalance> {
    let map = r.map?;
    let get = |n: &str| map.get(&format!("{NGINX_PREFIX}{n}")).map(|v| v.trim());
    if get(NGINX_AFFINITY)? != "cookie" {
        return None;
    }
    let name = match get(NGINX_SESSION_COOKIE_NAME) {
        Some(n) if is_token(n) => n.to_string(),
        Some(n) => {
            let n = n.to_string();
            bad_nginx_value(r, NGINX_SESSION_COOKIE_NAME, n, "a cookie name (a token)");
            NGINX_DEFAULT_COOKIE.to_string()
        }
        None => NGINX_DEFAULT_COOKIE.to_string(),
    };
    let ttl = match get(NGINX_SESSION_COOKIE_MAX_AGE) {
        None => None,
        Some(v) => match v.parse::<u64>().ok().filter(|s| *s > 0) {
            Some(secs) => Some(Duration::from_secs(secs)),
            None => {
                let v = v.to_string();
                let expected = "a positive number of seconds (without it the cookie lasts the \
                     browser session)";
                bad_nginx_value(r, NGINX_SESSION_COOKIE_MAX_AGE, v, expected);
                None
            }
        },
    };
    Some(LoadBalance::ConsistentHash(HashKey::Cookie { name, ttl }))
}

/// Whether the annotations mark an ingress-nginx canary (`canary: "true"`, as ingress-nginx
/// reads it), without diagnostics ([`parse`] reports a bad value).
pub(super) fn is_canary(map: Option<&BTreeMap<String, String>>) -> bool {
    map.and_then(|m| m.get(&format!("{NGINX_PREFIX}{NGINX_CANARY}")))
        .and_then(|v| parse_bool(v.trim()))
        .unwrap_or(false)
}

/// Warns that the ingress-nginx annotation `name` holds a `value` that is not `expected`.
fn bad_nginx_value(r: &mut Reader<'_, '_>, name: &str, value: String, expected: &'static str) {
    let err = AnnotationError {
        name: format!("{NGINX_PREFIX}{name}"),
        value,
        expected,
    };
    r.diags
        .warn("Ingress", &r.obj, "InvalidAnnotation", err.to_string());
}

/// RFC 9110 §5.6.2 token (header names; RFC 6265 cookie names are tokens too).
fn is_token(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_hash_key(v: &str, ttl: Option<Duration>) -> Option<HashKey> {
    if v == "client-ip" {
        return Some(HashKey::ClientIp);
    }
    if let Some(name) = v.strip_prefix("header:") {
        return is_token(name).then(|| HashKey::Header(name.to_ascii_lowercase()));
    }
    if let Some(name) = v.strip_prefix("cookie:") {
        return is_token(name).then(|| HashKey::Cookie {
            name: name.to_string(),
            ttl,
        });
    }
    None
}

/// `health-check-path` turns active checks on; the other four tune them.
fn health_check(r: &mut Reader<'_, '_>) -> Option<Arc<HealthCheck>> {
    let path = r.read(
        HEALTH_CHECK_PATH,
        false,
        "an absolute path such as /healthz",
        None,
        |v| {
            let ok = v.starts_with('/') && v.bytes().all(|b| b.is_ascii_graphic());
            ok.then(|| Some(v.to_string()))
        },
    );
    // Each probe is a new connection to the endpoint: an Ingress must not be able to make the
    // shared proxy open them back to back (a `1ms` interval would, on every endpoint).
    let interval = r.read(
        HEALTH_CHECK_INTERVAL,
        false,
        "a duration of at least 1s (seconds, or e.g. 1500ms, 10s)",
        DEFAULT_HEALTH_CHECK_INTERVAL,
        |v| parse_timeout(v).filter(|d| *d >= MIN_HEALTH_CHECK_INTERVAL),
    );
    let timeout = r.read(
        HEALTH_CHECK_TIMEOUT,
        false,
        "a positive duration (seconds, or e.g. 500ms, 2s)",
        DEFAULT_HEALTH_CHECK_TIMEOUT,
        parse_timeout,
    );
    let threshold = |v: &str| v.parse::<u32>().ok().filter(|n| *n >= 1);
    let healthy_threshold = r.read(
        HEALTH_CHECK_HEALTHY,
        false,
        "an integer of at least 1",
        DEFAULT_HEALTHY_THRESHOLD,
        threshold,
    );
    let unhealthy_threshold = r.read(
        HEALTH_CHECK_UNHEALTHY,
        false,
        "an integer of at least 1",
        DEFAULT_UNHEALTHY_THRESHOLD,
        threshold,
    );
    Some(Arc::new(HealthCheck {
        path: path?,
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
    }))
}

/// `ssl-redirect` of one Ingress without diagnostics (the TLS table reads it; [`parse`]
/// reports a bad value): the portico name, else the ingress-nginx one, else `default`.
pub(super) fn ssl_redirect_wanted(map: Option<&BTreeMap<String, String>>, default: bool) -> bool {
    let Some(map) = map else {
        return default;
    };
    [PORTICO_PREFIX, NGINX_PREFIX]
        .iter()
        .find_map(|p| map.get(&format!("{p}{SSL_REDIRECT}")))
        .and_then(|v| parse_bool(v.trim()))
        .unwrap_or(default)
}

/// A boolean as ingress-nginx reads one (Go's `strconv.ParseBool`: `1`, `t`, `true`, `0`,
/// `f`, `false`), in any case.
fn parse_bool(v: &str) -> Option<bool> {
    if ["true", "t", "1"].iter().any(|t| v.eq_ignore_ascii_case(t)) {
        Some(true)
    } else if ["false", "f", "0"]
        .iter()
        .any(|f| v.eq_ignore_ascii_case(f))
    {
        Some(false)
    } else {
        None
    }
}

/// nginx size syntax as ingress-nginx accepts it for `proxy-body-size`: digits with an optional
/// `k`, `m` or `g` suffix (either case, binary multiples); `0` disables the limit.
pub fn parse_size(v: &str) -> Option<u64> {
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
