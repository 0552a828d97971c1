//! Ingress path rules: `pathType` and path validation and normalisation (brief §4.3/§4.4,
//! Kubernetes `HTTPIngressPath`).
//!
//! Owns: turning a rule path into the form the request path is compared with. Must not import
//! tokio, hyper or the filesystem.

use crate::model::PathKind;
use crate::model::path::{
    PathError as SharedPathError, is_sub_delim, is_unreserved, normalize_path,
};

/// Why a path rule is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum PathError {
    #[error("pathType {0:?} is not Exact, Prefix or ImplementationSpecific")]
    UnknownType(String),
    #[error("path is required for pathType {0}")]
    Missing(&'static str),
    #[error("path {0:?} must start with `/`")]
    NotAbsolute(String),
    #[error("path {0:?} contains a character not allowed in a URI path (RFC 3986 §3.3)")]
    InvalidChar(String),
    #[error("path {0:?} contains a malformed percent-escape")]
    BadEscape(String),
    #[error(
        "path {0:?} has segment parameters (`;`): request paths are matched without theirs, \
         so it could never match (write it without them, or encode `;` as %3B)"
    )]
    Parameters(String),
}

impl PathError {
    pub fn reason(&self) -> &'static str {
        match self {
            PathError::UnknownType(_) => "InvalidPathType",
            _ => "InvalidPath",
        }
    }
}

/// A parsed path rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PathRule {
    pub kind: PathKind,
    pub path: String,
    /// `pathType` was missing and defaulted to `ImplementationSpecific` (a Warning).
    pub defaulted_type: bool,
    /// `path` was missing and defaulted to `/` (a Warning).
    pub defaulted_path: bool,
}

/// Parse `pathType` + `path`. The API requires `pathType`; a missing one (possible from hand
/// written manifests) is read as `ImplementationSpecific`, which portico treats as `Prefix`.
/// A missing path is allowed only for `ImplementationSpecific` and means `/`.
pub(super) fn parse_path(path: Option<&str>, path_type: &str) -> Result<PathRule, PathError> {
    let (kind, implementation_specific) = match path_type {
        "Exact" => (PathKind::Exact, false),
        "Prefix" => (PathKind::Prefix, false),
        "ImplementationSpecific" | "" => (PathKind::Prefix, true),
        other => return Err(PathError::UnknownType(other.to_string())),
    };
    let (raw, defaulted_path) = match path.filter(|p| !p.is_empty()) {
        Some(p) => (p, false),
        None if implementation_specific => ("/", true),
        None => {
            return Err(PathError::Missing(if kind == PathKind::Exact {
                "Exact"
            } else {
                "Prefix"
            }));
        }
    };
    let mut norm = normalize_rule_path(raw)?;
    // Requests are routed without their `;` parameters (Snapshot::route): a rule with some
    // would be dead.
    if norm.contains(';') {
        return Err(PathError::Parameters(raw.to_string()));
    }
    if kind == PathKind::Prefix {
        // Prefix matching is element-wise and ignores a trailing slash: store `/foo` for
        // `/foo/` (the lookup then matches `/foo`, `/foo/` and `/foo/bar`); `/` stays `/`.
        while norm.len() > 1 && norm.ends_with('/') {
            norm.pop();
        }
    }
    Ok(PathRule {
        kind,
        path: norm,
        defaulted_type: path_type.is_empty(),
        defaulted_path,
    })
}

/// Normalise a rule path exactly as request paths are normalised (brief §4.4), through the one
/// shared algorithm ([`crate::model::path::normalize_path`]): unreserved escapes decoded, other
/// escapes upper-cased, repeated slashes merged, dot-segments removed, `%2F`/`%5C` kept encoded.
/// Before that, a rule may be written more loosely than a request target: non-ASCII characters
/// are percent-encoded as UTF-8 (a request target is ASCII), and anything that is not a `pchar`
/// or `/` (RFC 3986 §3.3) is refused.
pub(super) fn normalize_rule_path(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.to_string()));
    }
    let shared_error = |e| match e {
        SharedPathError::BadEscape => PathError::BadEscape(raw.to_string()),
        _ => PathError::InvalidChar(raw.to_string()),
    };
    // The common rule is already ASCII `pchar`s: normalise it as is, without the copy below,
    // and when it is already in normal form, copy it without normalising at all.
    if raw.bytes().all(|b| is_pchar_or_slash(b) || b == b'%') {
        if is_normal(raw) {
            return Ok(raw.to_string());
        }
        return normalize_path(raw).map_err(shared_error);
    }
    let mut ascii = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b >= 0x80 {
            ascii.push_str(&format!("%{b:02X}"));
        } else if is_pchar_or_slash(b) || b == b'%' {
            ascii.push(char::from(b));
        } else {
            // Space, controls, `\`, `?`, `#`, `"`, `<`, `>`, `^`, `` ` ``, `{`, `|`, `}`...
            return Err(PathError::InvalidChar(raw.to_string()));
        }
    }
    normalize_path(&ascii).map_err(shared_error)
}

/// True when [`normalize_path`] returns `raw` unchanged, for a `raw` of `pchar`s and `/` only
/// (the caller checked): it starts with `/` and has no `%` (nothing to decode or upper-case),
/// no empty segment but a trailing one (no slashes to merge) and no `.`/`..` segment (no
/// dot-segments to remove; without `%` there is no encoded separator either).
fn is_normal(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix('/') else {
        return false;
    };
    if raw.contains('%') {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg == "." || seg == ".." || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// RFC 3986 §3.3 `pchar` (minus `%`, handled by the caller) and `/`.
fn is_pchar_or_slash(b: u8) -> bool {
    is_unreserved(b) || is_sub_delim(b) || matches!(b, b':' | b'@' | b'/')
}

#[cfg(test)]
mod unit {
    use super::*;

    /// The shortcut must agree with the full normaliser on every path it takes: all paths of
    /// up to 5 bytes over an alphabet with every byte the normaliser treats specially.
    #[test]
    fn is_normal_agrees_with_normalize_path() {
        const ALPHABET: &[u8] = b"/a.%2Fe";
        let mut taken = 0;
        for len in 0..=5u32 {
            for mut n in 0..ALPHABET.len().pow(len) {
                let mut raw = String::from("/");
                for _ in 0..len {
                    raw.push(char::from(ALPHABET[n % ALPHABET.len()]));
                    n /= ALPHABET.len();
                }
                if is_normal(&raw) {
                    taken += 1;
                    assert_eq!(normalize_path(&raw).as_deref(), Ok(raw.as_str()), "{raw:?}");
                }
            }
        }
        // The shortcut is really taken, and refused where it must be.
        assert!(taken > 1000, "{taken}");
        for raw in ["/a//b", "/a/./b", "/a/..", "/%7e", "a", "/a/b/."] {
            assert!(!is_normal(raw), "{raw:?}");
        }
        for raw in ["/", "/a", "/a/", "/a.b/..c/c..", "/a/b/"] {
            assert!(is_normal(raw), "{raw:?}");
        }
    }

    #[test]
    fn normalisation() {
        let n = |p: &str| normalize_rule_path(p).expect("valid");
        assert_eq!(n("/"), "/");
        assert_eq!(n("//a///b"), "/a/b");
        assert_eq!(n("/a/./b/../c"), "/a/c");
        assert_eq!(n("/../a"), "/a");
        assert_eq!(n("/a/.."), "/");
        assert_eq!(n("/a/b/"), "/a/b/");
        assert_eq!(n("/%7Euser/%2f"), "/~user/%2F");
        assert_eq!(n("/caf\u{e9}"), "/caf%C3%A9");
        assert!(matches!(
            normalize_rule_path("a"),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            normalize_rule_path("/a b"),
            Err(PathError::InvalidChar(_))
        ));
        assert!(matches!(
            normalize_rule_path("/a\\b"),
            Err(PathError::InvalidChar(_))
        ));
        assert!(matches!(
            normalize_rule_path("/a?b"),
            Err(PathError::InvalidChar(_))
        ));
        assert!(matches!(
            normalize_rule_path("/a%zz"),
            Err(PathError::BadEscape(_))
        ));
        assert!(matches!(
            normalize_rule_path("/a%2"),
            Err(PathError::BadEscape(_))
        ));
        assert!(matches!(
            normalize_rule_path("/a%+1"),
            Err(PathError::BadEscape(_))
        ));
    }
}
