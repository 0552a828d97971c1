//! Duration strings shared by flags, annotations and the RateLimitPolicy `period`:
//! `^([0-9]+(ms|s|m|h))+$` (e.g. `500ms`, `30s`, `1h30m`), and bare integers as seconds
//! where ingress-nginx annotations use them (`proxy-read-timeout: "60"`).

use std::time::Duration;

/// Parse `1h30m`, `500ms`, `5s`. Bare digits are rejected here; see [`parse_seconds_or_duration`].
pub fn parse_duration(s: &str) -> Option<Duration> {
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let n: u128 = s[start..i].parse().ok()?;
        let unit_ms: u128 = if s[i..].starts_with("ms") {
            i += 2;
            1
        } else if s[i..].starts_with('s') {
            i += 1;
            1_000
        } else if s[i..].starts_with('m') {
            i += 1;
            60_000
        } else if s[i..].starts_with('h') {
            i += 1;
            3_600_000
        } else {
            return None;
        };
        total = total.checked_add(n.checked_mul(unit_ms)?)?;
    }
    u64::try_from(total).ok().map(Duration::from_millis)
}

/// Like [`parse_duration`], but also accepts bare digits as whole seconds.
pub fn parse_seconds_or_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().ok().map(Duration::from_secs);
    }
    parse_duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("1x"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("99999999999999999999999h"), None);
        assert_eq!(
            parse_seconds_or_duration("60"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_seconds_or_duration("2s"),
            Some(Duration::from_secs(2))
        );
    }
}
