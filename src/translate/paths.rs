//! Ingress path rules: `pathType` and path validation and normalisation (brief §4.3/§4.4,
//! Kubernetes `HTTPIngressPath`).
//!
//! Owns: turning a rule path into the form the request path is compared with. Must not import
//! tokio, hyper or the filesystem.

use crate::model::PathKind;

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

/// Normalise a rule path the way request paths are normalised (brief §4.4): percent-escapes of
/// unreserved characters decoded and other escapes upper-cased (RFC 3986 §6.2.2.1–2), non-ASCII
/// characters percent-encoded as UTF-8 (a request target is ASCII), repeated slashes merged, and
/// dot-segments removed (RFC 3986 §5.2.4). `%2F` and `%5C` stay encoded: they are never
/// separators.
pub(super) fn normalize_rule_path(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.to_string()));
    }
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                // `from_str_radix` would accept a sign (`%+1`): insist on two hex digits.
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(v) = hex else {
                return Err(PathError::BadEscape(raw.to_string()));
            };
            if is_unreserved(v) {
                decoded.push(char::from(v));
            } else {
                decoded.push_str(&format!("%{v:02X}"));
            }
            i += 3;
        } else if b >= 0x80 {
            decoded.push_str(&format!("%{b:02X}"));
            i += 1;
        } else if is_pchar_or_slash(b) {
            decoded.push(char::from(b));
            i += 1;
        } else {
            // Space, controls, `\`, `?`, `#`, `"`, `<`, `>`, `^`, `` ` ``, `{`, `|`, `}`...
            return Err(PathError::InvalidChar(raw.to_string()));
        }
    }
    Ok(remove_dot_segments(&decoded))
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §3.3 `pchar` (minus `%`, handled by the caller) and `/`.
fn is_pchar_or_slash(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
        || b == b'/'
}

/// Merge repeated slashes and resolve `.`/`..` segments over a path that starts with `/`.
/// `..` never climbs above the root (RFC 3986 §5.2.4). A trailing `.`, `..` or `/` leaves a
/// trailing slash, as in the RFC's algorithm.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in path.split('/').skip(1) {
        match seg {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod unit {
    use super::*;

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
