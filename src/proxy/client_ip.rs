//! The client address a request is attributed to (brief §4.5), shared by rate-limit keys and
//! consistent hashing on `client-ip`.
//!
//! Owns: the trusted-proxy walk over `X-Forwarded-For`. Must not import kube or k8s-openapi.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// The connection's peer, unless the peer is a trusted proxy: then the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy (each trusted hop appended the
/// address it saw, so that entry is the first one no trusted party vouches for beyond). Entries
/// that do not parse as an IP end the walk there: what lies left of them is client-controlled.
/// `X-Real-IP` and `Forwarded` are never read for this (clients could set them).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Several X-Forwarded-For fields are one comma-separated list in order (RFC 9110 §5.3).
    // Split as bytes: one entry with non-ASCII bytes ends the walk at that entry, and does not
    // throw away the trusted entries right of it.
    let mut entries: Vec<&[u8]> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        entries.extend(
            value
                .as_bytes()
                .split(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|e| !e.is_empty()),
        );
    }
    let mut best = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = std::str::from_utf8(entry).ok().and_then(parse_entry) else {
            break;
        };
        // A hop may write an IPv4 client in its IPv4-mapped IPv6 form.
        let ip = ip.to_canonical();
        best = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    best
}

/// One X-Forwarded-For entry: a bare address, `[v6]`, `[v6]:port` or `v4:port`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let end = rest.find(']')?;
        return rest[..end].parse().ok();
    }
    entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(values: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append("x-forwarded-for", v.parse().expect("header"));
        }
        m
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().expect("net")).collect()
    }

    /// An IPv4-mapped entry is read as the IPv4 address it maps, so IPv4 trusted ranges match it.
    #[test]
    fn ipv4_mapped_entries_match_ipv4_ranges() {
        let ip = client_ip(
            [10, 0, 0, 9].into(),
            &h(&["::ffff:1.2.3.4, ::ffff:10.0.0.7"]),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(ip, IpAddr::from([1, 2, 3, 4]));
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_sends() {
        let ip = client_ip(
            [10, 0, 0, 9].into(),
            &h(&["1.2.3.4"]),
            &nets(&["192.168.0.0/16"]),
        );
        assert_eq!(ip, IpAddr::from([10, 0, 0, 9]));
    }

    #[test]
    fn trusted_hops_are_skipped_from_the_right() {
        let trusted = nets(&["10.0.0.0/8"]);
        let headers = h(&["6.6.6.6, 1.2.3.4", "10.1.1.1"]);
        let ip = client_ip([10, 0, 0, 1].into(), &headers, &trusted);
        assert_eq!(ip, IpAddr::from([1, 2, 3, 4]));
    }

    #[test]
    fn trusted_peer_without_header_is_the_client() {
        let ip = client_ip([10, 0, 0, 1].into(), &h(&[]), &nets(&["10.0.0.0/8"]));
        assert_eq!(ip, IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn garbage_ends_the_walk() {
        let trusted = nets(&["10.0.0.0/8"]);
        let ip = client_ip(
            [10, 0, 0, 1].into(),
            &h(&["1.1.1.1, junk, 10.2.2.2"]),
            &trusted,
        );
        // `junk` is where trust ends; the last good entry right of it is a trusted hop.
        assert_eq!(ip, IpAddr::from([10, 2, 2, 2]));
    }

    #[test]
    fn a_non_ascii_entry_ends_the_walk_there_only() {
        let trusted = nets(&["10.0.0.0/8"]);
        let mut headers = HeaderMap::new();
        let value = http::HeaderValue::from_bytes(b"\x80junk, 1.2.3.4, 10.2.2.2").expect("header");
        headers.append("x-forwarded-for", value);
        let ip = client_ip([10, 0, 0, 1].into(), &headers, &trusted);
        assert_eq!(ip, IpAddr::from([1, 2, 3, 4]));
    }

    #[test]
    fn ports_and_brackets() {
        assert_eq!(parse_entry("[2001:db8::1]:80"), "2001:db8::1".parse().ok());
        assert_eq!(parse_entry("1.2.3.4:5"), "1.2.3.4".parse().ok());
        assert_eq!(parse_entry("2001:db8::1"), "2001:db8::1".parse().ok());
        assert_eq!(parse_entry("nope"), None);
    }
}
