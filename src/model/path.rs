//! Path normalisation (RFC 3986 §6.2.2) and the climb-out check of brief §4.4: the one
//! algorithm both request paths (proxy) and Ingress rule paths (translate) go through, so a
//! rule and a request that mean the same path always compare equal.
//!
//! Owns: turning a raw path into the one path that is both matched against routes and sent
//! upstream. Pure: a function of its input string only; no I/O.

/// Why a path was refused (each maps to 400 in `proxy::error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Origin-form targets start with `/` (RFC 9112 §3.2.1).
    #[error("path does not start with /")]
    NotAbsolute,
    /// A literal `\`: some backends read it as `/`, so it is ambiguous (brief §4.4).
    #[error("backslash in path")]
    Backslash,
    /// CTL or non-ASCII byte (RFC 3986 §2: only a subset of US-ASCII is allowed).
    #[error("control or non-ASCII byte in path")]
    BadByte,
    /// `%` not followed by two hex digits (RFC 3986 §2.1).
    #[error("malformed percent-escape")]
    BadEscape,
    /// A segment such as `..%2Fsecret` or `x%5C..%5Cy`: harmless for portico, which never
    /// splits on encoded separators, but a backend that decodes them would climb out of the
    /// place the route granted.
    #[error("encoded separator with dot-segment")]
    EncodedTraversal,
    /// A dot-segment with path parameters, such as `..;/admin` or `.;x`: Tomcat, Jetty and
    /// Spring drop the `;` part and resolve what is left, so `/public/..;/admin` reaches
    /// `/admin` behind a route that only granted `/public` (the same class as `..%2F`).
    #[error("dot-segment with path parameters")]
    DotSegmentParams,
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, PathError>;

/// RFC 3986 §2.3 unreserved characters: escapes of these are decoded (§6.2.2.2).
/// RFC 3986 §2.3 `unreserved`.
pub const fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §2.2 `sub-delims`.
pub const fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalise the path of a request target (without the query):
///
/// 1. refuse literal `\`, control bytes and malformed escapes;
/// 2. percent-encoding normalisation (§6.2.2.2): decode escapes of unreserved characters,
///    upper-case the hex digits of every other escape (`%2f` → `%2F`);
/// 3. merge repeated slashes (brief §4.4; not an RFC 3986 rule);
/// 4. remove dot-segments (§5.2.4), after decoding, so `/%2e%2e/` is a dot-segment too;
/// 5. refuse a segment that would contain a `.`/`..` sub-segment once `%2F` / `%5C` were read
///    as separators.
///
/// A trailing slash is kept (`/a/` and `/a` may differ for the backend).
pub fn normalize_path(raw: &str) -> Result<String> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Step 1 + 2: decode into a new string; `%2F`/`%5C` remain escapes.
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\\' => return Err(PathError::Backslash),
            0..=0x20 | 0x7f..=0xff => return Err(PathError::BadByte),
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_val);
                let lo = bytes.get(i + 2).copied().and_then(hex_val);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadEscape);
                };
                let v = hi * 16 + lo;
                if is_unreserved(v) {
                    decoded.push(char::from(v));
                } else {
                    decoded.push('%');
                    decoded.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                    decoded.push(char::from(bytes[i + 2].to_ascii_uppercase()));
                }
                i += 3;
            }
            _ => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }

    // Steps 3 + 4 over `/`-separated segments. Empty segments (repeated slashes) are merged.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded[1..].split('/') {
        match seg {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            s => {
                check_encoded_separators(s)?;
                // `;` or its escape: a backend that decodes first strips the same parameters.
                let before = s.split(';').next().unwrap_or(s);
                let before = before.split("%3B").next().unwrap_or(before);
                if before.len() < s.len() && (before == "." || before == "..") {
                    return Err(PathError::DotSegmentParams);
                }
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if path.is_empty() || trailing_slash {
        path.push('/');
    }
    Ok(path)
}

/// Step 5: split one (already normalised) segment on `%2F` / `%5C` and refuse dot
/// sub-segments. A segment without encoded separators always passes.
fn check_encoded_separators(seg: &str) -> Result<()> {
    if !seg.contains("%2F") && !seg.contains("%5C") {
        return Ok(());
    }
    let unified = seg.replace("%5C", "%2F");
    // Parameters (`;` or its escape) come off first, as a backend that decodes and strips them
    // (Tomcat, Spring) does: `x%2F..;%2F..;` climbs out there.
    let bare = |sub: &str| {
        let b = sub.split(';').next().unwrap_or(sub);
        b.split("%3B").next().unwrap_or(b).to_string()
    };
    if unified
        .split("%2F")
        .any(|sub| matches!(bare(sub).as_str(), "." | ".."))
    {
        return Err(PathError::EncodedTraversal);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        match normalize_path(raw) {
            Ok(p) => p,
            Err(e) => panic!("{raw:?} refused: {e}"),
        }
    }

    #[test]
    fn plain_paths_are_unchanged() {
        for p in ["/", "/a", "/a/b", "/a/b/", "/a-b_c~d.e", "/x%2Fy", "/%20"] {
            assert_eq!(ok(p), p, "{p}");
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(ok("/a/../b"), "/b");
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(ok("/.."), "/");
        assert_eq!(ok("/a/b/../../c"), "/c");
        // `..a` and `a..` are ordinary segments.
        assert_eq!(ok("/..a/b.."), "/..a/b..");
    }

    #[test]
    fn encoded_dots_are_dot_segments() {
        assert_eq!(ok("/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/api/%2E%2E/admin"), "/admin");
        assert_eq!(ok("/api/.%2e/admin"), "/admin");
        assert_eq!(ok("/api/%2e/x"), "/api/x");
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_upper_cased() {
        assert_eq!(ok("/%41%62%7e%2d%5f%2E"), "/Ab~-_.");
        assert_eq!(ok("/%2f"), "/%2F");
        assert_eq!(ok("/a%3fb"), "/a%3Fb");
        assert_eq!(ok("/%c3%a9"), "/%C3%A9");
        assert_eq!(ok("/%25"), "/%25");
        // Decoding `%25` must not create a new escape.
        assert_eq!(ok("/%2541"), "/%2541");
    }

    #[test]
    fn repeated_slashes_are_merged() {
        assert_eq!(ok("//a///b//"), "/a/b/");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/a//../b"), "/b");
    }

    #[test]
    fn encoded_separators_stay_encoded() {
        assert_eq!(ok("/repo/a%2Fb/raw"), "/repo/a%2Fb/raw");
        assert_eq!(ok("/x%5cy"), "/x%5Cy");
        assert_eq!(ok("/a%2F.b"), "/a%2F.b");
    }

    #[test]
    fn climb_out_through_encoded_separators_is_refused() {
        for p in [
            "/static/..%2Fsecret",
            "/static/..%2fsecret",
            "/x%5C..%5Cy",
            "/a/%2e%2e%2fsecret",
            "/a%2F..",
            "/a%2F.%2Fb",
            "/%2F..%2F",
            // With parameters, as Tomcat and Spring strip them.
            "/public/x%2F..;%2F..;/admin",
            "/public/x%2F..%3Bv%2F..%3B/admin",
            "/a%2F.;x",
        ] {
            assert_eq!(normalize_path(p), Err(PathError::EncodedTraversal), "{p}");
        }
    }

    /// The `..;/` bypass: a dot-segment with parameters resolves as a dot-segment on Tomcat,
    /// Jetty and Spring. Parameters on ordinary segments, and names that merely start with
    /// dots, are fine.
    #[test]
    fn dot_segments_with_parameters_are_refused() {
        for p in [
            "/public/..;/admin",
            "/public/..;jsessionid=x/admin",
            "/public/%2e%2e;/admin",
            "/public/..%3B/admin",
            "/public/..%3b/admin",
            "/a/.;/b",
        ] {
            assert_eq!(normalize_path(p), Err(PathError::DotSegmentParams), "{p}");
        }
        assert_eq!(ok("/a;v=1/b;x"), "/a;v=1/b;x");
        assert_eq!(ok("/...;x/.x;y"), "/...;x/.x;y");
    }

    #[test]
    fn bad_bytes_are_refused() {
        assert_eq!(normalize_path("/a\\b"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/a\u{1}b"), Err(PathError::BadByte));
        assert_eq!(normalize_path("/a b"), Err(PathError::BadByte));
        assert_eq!(normalize_path("/a\u{7f}"), Err(PathError::BadByte));
        assert_eq!(normalize_path("/é"), Err(PathError::BadByte));
        assert_eq!(normalize_path("/%"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/%4"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path(""), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn normalisation_is_idempotent() {
        for p in [
            "/a/../b/./c//d/",
            "/%2e%2e/%41/%2f",
            "/a%2Fb/c",
            "/x/y/z/../../..",
        ] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p}");
        }
    }
}
