//! Pure request-path lookups over a [`Snapshot`]: host selection (exact, one-label wildcard,
//! catch-all) and Ingress v1 path matching in precedence order.

use std::sync::Arc;

use super::{HostRoutes, PathKind, Route, Snapshot};

/// Which host entry of the table a request host selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMatch {
    Exact,
    Wildcard,
    CatchAll,
    /// No host entry: only the default backend (if any) can serve.
    None,
}

/// Result of routing one request.
#[derive(Debug, Clone)]
pub struct RouteMatch<'a> {
    pub host: HostMatch,
    /// The route that serves the request: a path rule, else the default backend; `None` → 404.
    pub route: Option<&'a Arc<Route>>,
    /// True when `route` is the default backend (host matched but no path did, or unknown host).
    pub is_default: bool,
}

impl Snapshot {
    /// Route a request. `host` must already be normalised ([`normalize_host`]) and `path`
    /// RFC 3986-normalised without the query.
    pub fn route<'a>(&'a self, host: &str, path: &str) -> RouteMatch<'a> {
        let (kind, entry) = self.select_host(host);
        if let Some(entry) = entry
            && let Some(route) = entry
                .routes
                .iter()
                .find(|r| path_matches(r.kind, &r.path, path))
        {
            return RouteMatch {
                host: kind,
                route: Some(route),
                is_default: false,
            };
        }
        RouteMatch {
            host: kind,
            route: self.hosts.default_route.as_ref(),
            is_default: true,
        }
    }

    fn select_host(&self, host: &str) -> (HostMatch, Option<&HostRoutes>) {
        let table = &*self.hosts;
        if let Some(e) = table.exact.get(host) {
            return (HostMatch::Exact, Some(e));
        }
        // `*.foo.com` matches exactly one extra label: strip the first label and look up the rest.
        if let Some((first, rest)) = host.split_once('.')
            && !first.is_empty()
            && let Some(e) = table.wildcard.get(rest)
        {
            return (HostMatch::Wildcard, Some(e));
        }
        match &table.catch_all {
            Some(e) => (HostMatch::CatchAll, Some(e)),
            None => (HostMatch::None, None),
        }
    }
}

/// Ingress v1 path matching. `Exact` is whole-string and case-sensitive. `Prefix` is
/// element-wise over `/`-separated segments: rule `/foo` matches `/foo`, `/foo/` and `/foo/bar`,
/// never `/foobar` (the rule path is stored without trailing slash).
pub fn path_matches(kind: PathKind, rule: &str, path: &str) -> bool {
    match kind {
        PathKind::Exact => path == rule,
        PathKind::Prefix => {
            if rule == "/" {
                return true;
            }
            path.starts_with(rule)
                && (path.len() == rule.len() || path.as_bytes().get(rule.len()) == Some(&b'/'))
        }
    }
}

/// Normalise a Host / `:authority` value for lookup: lower-case, `:port` removed, one trailing
/// dot removed. IPv6 literals keep their brackets. Returns `None` for an empty host.
pub fn normalize_host(raw: &str) -> Option<String> {
    let host = if raw.starts_with('[') {
        // `[v6]` or `[v6]:port`
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => return None,
        }
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_element_wise() {
        assert!(path_matches(PathKind::Prefix, "/foo", "/foo"));
        assert!(path_matches(PathKind::Prefix, "/foo", "/foo/"));
        assert!(path_matches(PathKind::Prefix, "/foo", "/foo/bar"));
        assert!(!path_matches(PathKind::Prefix, "/foo", "/foobar"));
        assert!(path_matches(PathKind::Prefix, "/", "/anything"));
    }

    #[test]
    fn exact_is_whole_string() {
        assert!(path_matches(PathKind::Exact, "/foo", "/foo"));
        assert!(!path_matches(PathKind::Exact, "/foo", "/foo/"));
        assert!(!path_matches(PathKind::Exact, "/foo", "/FOO"));
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Foo.COM:8080").as_deref(), Some("foo.com"));
        assert_eq!(normalize_host("foo.com.").as_deref(), Some("foo.com"));
        assert_eq!(normalize_host("[::1]:443").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host(""), None);
    }
}
