//! SNI certificate table: exact names, one-label wildcards, and the default certificate from
//! `--default-certificate`. Certificates are parsed rustls keys, ready for handshakes.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use rustls::sign::CertifiedKey;

/// A parsed certificate chain + private key. Equality compares the source material (the PEM
/// bytes it was built from), so an unchanged Secret yields an equal snapshot.
#[derive(Clone)]
pub struct CertKey {
    pub key: Arc<CertifiedKey>,
    /// `namespace/name` of the Secret it came from (logs only).
    pub source: Arc<str>,
    /// The certificate and key bytes it was parsed from.
    pub material: Arc<[u8]>,
    /// The leaf certificate's validity period; `None` when its dates could not be read (it is
    /// served all the same: a TLS server does not check its own certificate's dates).
    pub validity: Option<Validity>,
}

/// X.509 `notBefore`/`notAfter` of a certificate, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl TlsTable {
    /// Each certificate in the table once (by its parsed key), with the names it serves:
    /// exact hosts, `*.suffix` for wildcards, and `(default)` for `--default-certificate`.
    /// Sorted by Secret, names sorted.
    pub fn certificates(&self) -> Vec<(&CertKey, Vec<String>)> {
        let named = (self.exact.iter().map(|(host, cert)| (cert, host.clone())))
            .chain(
                self.wildcard
                    .iter()
                    .map(|(suffix, cert)| (cert, format!("*.{suffix}"))),
            )
            .chain(
                self.default
                    .iter()
                    .map(|cert| (cert, "(default)".to_string())),
            );
        let mut by_key: HashMap<*const CertifiedKey, (&CertKey, Vec<String>)> = HashMap::new();
        for (cert, name) in named {
            by_key
                .entry(Arc::as_ptr(&cert.key))
                .or_insert_with(|| (cert, Vec::new()))
                .1
                .push(name);
        }
        let mut all: Vec<(&CertKey, Vec<String>)> = by_key.into_values().collect();
        for (_, names) in &mut all {
            names.sort_unstable();
        }
        all.sort_by(|a, b| (&a.0.source, &a.1).cmp(&(&b.0.source, &b.1)));
        all
    }
}

impl PartialEq for CertKey {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.material == other.material
    }
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKey")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// SNI → certificate. Names are lower-case.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsTable {
    pub exact: HashMap<String, CertKey>,
    /// Keyed by the suffix after `*.`.
    pub wildcard: HashMap<String, CertKey>,
    /// From `--default-certificate ns/name`; when `None` the proxy's generated fallback serves.
    pub default: Option<CertKey>,
    /// Exact hosts, and wildcard suffixes, whose certificate comes from an Ingress that opts
    /// out of the HTTPS redirect: a request reaching them through a route that does not name
    /// them (a catch-all rule, the default backend) is not redirected either.
    pub no_redirect_exact: HashSet<String>,
    pub no_redirect_wildcard: HashSet<String>,
    /// Exact hosts, and wildcard suffixes, named by a TLS entry without a `secretName` (the API
    /// leaves it optional "to allow TLS routing based on SNI hostname alone"): served the default
    /// certificate, and redirected like hosts with a certificate of their own. Only entries of
    /// Ingresses that keep the redirect are recorded.
    pub default_exact: HashSet<String>,
    pub default_wildcard: HashSet<String>,
}

impl TlsTable {
    /// SNI picks exact, then wildcard (one label), then the default certificate.
    pub fn resolve(&self, sni: Option<&str>) -> Option<&CertKey> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(c) = self.exact.get(&name) {
                return Some(c);
            }
            if let Some((first, rest)) = name.split_once('.')
                && !first.is_empty()
                && let Some(c) = self.wildcard.get(rest)
            {
                return Some(c);
            }
        }
        self.default.as_ref()
    }

    /// True when the host has a certificate of its own (exact or wildcard), not just the default.
    /// Whether plain HTTP to `host` (normalised) should be redirected by a route that does not
    /// name it: the host has a certificate of its own whose Ingress did not opt out.
    /// Hosts named by a TLS entry without a Secret count as well.
    pub fn redirects_host(&self, host: &str) -> bool {
        if !self.exact.is_empty() && self.exact.contains_key(host) {
            return !self.no_redirect_exact.contains(host);
        }
        if !self.wildcard.is_empty()
            && let Some(rest) = parent(host)
            && self.wildcard.contains_key(rest)
        {
            return !self.no_redirect_wildcard.contains(rest);
        }
        self.on_default_certificate(host)
    }

    /// True when the host is served over TLS by a certificate of its own (exact or wildcard) or
    /// by a TLS entry without a Secret, not merely by the default certificate's catching all.
    pub fn has_tls_for(&self, host: &str) -> bool {
        // Plain-HTTP requests on catch-all routes ask this every time: no hashing, and no
        // search for the first label, where a table is empty.
        (!self.exact.is_empty() && self.exact.contains_key(host))
            || (!self.wildcard.is_empty()
                && parent(host).is_some_and(|rest| self.wildcard.contains_key(rest)))
            || self.on_default_certificate(host)
    }

    /// Named by a TLS entry without a Secret (see [`TlsTable::default_exact`]).
    #[inline]
    fn on_default_certificate(&self, host: &str) -> bool {
        (!self.default_exact.is_empty() && self.default_exact.contains(host))
            || (!self.default_wildcard.is_empty()
                && parent(host).is_some_and(|rest| self.default_wildcard.contains(rest)))
    }
}

/// What a one-label wildcard matches `host` by: everything after its first, non-empty label.
#[inline]
fn parent(host: &str) -> Option<&str> {
    host.split_once('.')
        .filter(|(first, _)| !first.is_empty())
        .map(|(_, rest)| rest)
}
