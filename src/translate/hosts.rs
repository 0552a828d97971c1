//! Ingress host validation (brief §4.3; Kubernetes `IngressRule.host`: a DNS-1123 subdomain,
//! optionally with `*.` as the whole first label; IP literals are not allowed).
//!
//! Owns: rule/TLS host parsing into [`HostKey`]. Must not import tokio, hyper or the filesystem.

use std::fmt;
use std::net::Ipv4Addr;

/// Where a host's routes live in the [`crate::model::HostTable`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum HostKey {
    /// Lower-case exact name.
    Exact(String),
    /// `*.foo.com`, stored as `foo.com`.
    Wildcard(String),
    /// No host: catches every host not matched otherwise.
    CatchAll,
}

impl fmt::Display for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKey::Exact(h) => f.write_str(h),
            HostKey::Wildcard(s) => write!(f, "*.{s}"),
            HostKey::CatchAll => f.write_str("(any host)"),
        }
    }
}

/// Why a host is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum HostError {
    #[error("host {0:?} is an IP address; Ingress hosts must be DNS names")]
    IpLiteral(String),
    #[error("host {0:?}: `*` is only allowed as the whole first label (`*.example.com`)")]
    BadWildcard(String),
    #[error("host {0:?} is not a valid DNS name (RFC 1123 labels of a-z, 0-9 and `-`)")]
    InvalidName(String),
}

/// Longest DNS name (RFC 1123 §2.1) and label.
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Parse a rule or TLS host. `None` or empty means "no host" (catch-all), as the API treats an
/// empty host as absent. Hosts are case-insensitive (RFC 4343), stored lower-case.
pub(super) fn parse_host(raw: Option<&str>) -> Result<HostKey, HostError> {
    let Some(raw) = raw.filter(|h| !h.is_empty()) else {
        return Ok(HostKey::CatchAll);
    };
    let mut host = raw.to_ascii_lowercase();
    // A `:` alone is no IP address (`a.test:443` is an invalid name, below).
    if host.parse::<Ipv4Addr>().is_ok()
        || host.parse::<std::net::Ipv6Addr>().is_ok()
        || host.starts_with('[')
    {
        return Err(HostError::IpLiteral(raw.to_string()));
    }
    let wildcard = host.starts_with("*.");
    let name = if wildcard { &host[2..] } else { host.as_str() };
    if name.contains('*') {
        return Err(HostError::BadWildcard(raw.to_string()));
    }
    if !is_dns1123_subdomain(name) {
        return Err(HostError::InvalidName(raw.to_string()));
    }
    // The lower-cased copy becomes the key (one allocation per rule host).
    Ok(if wildcard {
        host.drain(..2);
        HostKey::Wildcard(host)
    } else {
        HostKey::Exact(host)
    })
}

/// A DNS-1123 subdomain (lower-case labels of a-z, 0-9 and `-`): what the API server accepts
/// as an Ingress host or a `LoadBalancerIngress.hostname`.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= MAX_LABEL
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b.first() != Some(&b'-')
                && b.last() != Some(&b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_ip_literals_and_names_with_a_port() {
        for ip in ["10.0.0.1", "::1", "2001:db8::1", "[::1]"] {
            assert!(
                matches!(parse_host(Some(ip)), Err(HostError::IpLiteral(_))),
                "{ip}"
            );
        }
        // A port is no IP address: the name is invalid.
        assert!(matches!(
            parse_host(Some("a.test:443")),
            Err(HostError::InvalidName(_))
        ));
        assert_eq!(
            parse_host(Some("A.Test")).ok(),
            Some(HostKey::Exact("a.test".into()))
        );
        assert_eq!(
            parse_host(Some("*.Apps.test")).ok(),
            Some(HostKey::Wildcard("apps.test".into()))
        );
        assert_eq!(parse_host(Some("")).ok(), Some(HostKey::CatchAll));
    }
}
