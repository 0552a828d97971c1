//! Endpoint-choice arithmetic (brief §4.6 `portico.dev/load-balance`): the per-request
//! [`Affinity`] of consistent hashing (client IP, header or cookie, and the sticky cookie the
//! proxy issues when the request has none), rendezvous hashing, power of two choices and
//! uniform random choice over a candidate list.
//!
//! Owns: pure functions over candidate addresses; no state, no I/O. The state they read
//! (in-flight counts, health marks, round-robin cursors) lives in [`super::upstream`]. Must not
//! import kube, k8s-openapi, `publish` or the handler.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::header::{COOKIE, HeaderValue, SET_COOKIE};
use http::{HeaderMap, HeaderName};
use ipnet::IpNet;

use crate::model::{HashKey, LoadBalance};

use super::client_ip::client_ip;

/// What the handler hands to `Upstreams::forward` about one request's balancing.
#[derive(Debug, Default, Clone)]
pub struct Affinity {
    /// Consistent-hash key of this request (`None` on routes that do not hash).
    pub key: Option<u64>,
    /// A sticky cookie the proxy just issued: goes on the response as `Set-Cookie`.
    pub set_cookie: Option<HeaderValue>,
}

impl Affinity {
    /// Derive the request's hash input from the client request as received (before forwarding
    /// headers are rewritten). `client-ip` follows brief §4.5 (`--trusted-proxies`); a missing
    /// header hashes as the empty value (all such requests share one endpoint); a missing or
    /// empty cookie makes the proxy issue one (like ingress-nginx `affinity: cookie`), hashed
    /// the same way the client will send it back.
    pub fn of(
        lb: &LoadBalance,
        peer: IpAddr,
        headers: &HeaderMap,
        trusted: &[IpNet],
        tls: bool,
    ) -> Affinity {
        let LoadBalance::ConsistentHash(key) = lb else {
            return Affinity::default();
        };
        match key {
            HashKey::ClientIp => Affinity {
                key: Some(hash_of(&client_ip(peer, headers, trusted))),
                set_cookie: None,
            },
            HashKey::Header(name) => {
                let value = HeaderName::from_bytes(name.as_bytes())
                    .ok()
                    .and_then(|n| headers.get(n))
                    .map(HeaderValue::as_bytes)
                    .unwrap_or_default();
                Affinity {
                    key: Some(hash_of(value)),
                    set_cookie: None,
                }
            }
            HashKey::Cookie { name, ttl } => match cookie(headers, name) {
                Some(value) => Affinity {
                    key: Some(hash_of(value.as_bytes())),
                    set_cookie: None,
                },
                None => {
                    let value = format!("{:016x}", fastrand::u64(..));
                    Affinity {
                        key: Some(hash_of(value.as_bytes())),
                        set_cookie: HeaderValue::from_str(&set_cookie(name, &value, *ttl, tls))
                            .ok(),
                    }
                }
            },
        }
    }

    /// Add the issued cookie, if any, to the response headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some(c) = &self.set_cookie {
            headers.append(SET_COOKIE, c.clone());
        }
    }
}

/// Value of cookie `name` in the request's `Cookie` fields (RFC 6265 §5.4: `name=value` pairs
/// separated by `; `; HTTP/2 may split them over several fields). Empty values count as absent.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// The sticky cookie as ingress-nginx `affinity: cookie` sets it: whole site, not readable by
/// scripts, sent on top-level navigations; `Max-Age` only with a TTL (else a session cookie),
/// `Secure` when the request came over HTTPS.
pub fn set_cookie(name: &str, value: &str, ttl: Option<Duration>, tls: bool) -> String {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax");
    if let Some(ttl) = ttl {
        c.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
    }
    if tls {
        c.push_str("; Secure");
    }
    c
}

/// SipHash with fixed keys: the same input gives the same key in every replica of one build,
/// so a cookie or client sticks to the same endpoint whichever replica serves it.
fn hash_of<T: Hash + ?Sized>(v: &T) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Rendezvous (highest random weight) score of `addr` for `key`.
pub fn score(key: u64, addr: SocketAddr) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    addr.hash(&mut h);
    h.finish()
}

/// The candidate with the highest score for `key`. Each key ranks all endpoints independently
/// of the others, so adding or removing one endpoint moves only the keys it wins or held
/// (about 1/N), and excluding an endpoint (tried, ejected, down) falls to the key's next best.
/// Ties (astronomically rare) go to the lower address so the choice is total.
pub fn rendezvous(key: u64, candidates: &[SocketAddr]) -> Option<SocketAddr> {
    candidates
        .iter()
        .copied()
        .max_by(|a, b| score(key, *a).cmp(&score(key, *b)).then(b.cmp(a)))
}

/// Power of two choices: two distinct random candidates, the one with fewer requests in flight
/// wins (the first on a tie). Avoids the herd a strict least-loaded pick causes with stale
/// counts while still steering away from slow endpoints.
pub fn p2c(candidates: &[SocketAddr], load: impl Fn(SocketAddr) -> usize) -> Option<SocketAddr> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let i = fastrand::usize(..n);
            // A second index different from the first, uniformly.
            let j = (i + 1 + fastrand::usize(..n - 1)) % n;
            let (a, b) = (candidates[i], candidates[j]);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

/// Uniformly random candidate.
pub fn random(candidates: &[SocketAddr]) -> Option<SocketAddr> {
    match candidates.len() {
        0 => None,
        n => Some(candidates[fastrand::usize(..n)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
            .collect()
    }

    #[test]
    fn p2c_prefers_the_less_loaded_endpoint() {
        let eps = addrs(2);
        let busy = eps[0];
        let load = |a: SocketAddr| if a == busy { 10 } else { 0 };
        // With two candidates both are always compared: the idle one wins every time.
        for _ in 0..1000 {
            assert_eq!(p2c(&eps, load), Some(eps[1]));
        }
        // With many, the busiest endpoint can only win against an equally busy one: never
        // here, since it is the only loaded one.
        let eps = addrs(10);
        let busy = eps[3];
        let load = |a: SocketAddr| if a == busy { 5 } else { 1 };
        for _ in 0..1000 {
            assert_ne!(p2c(&eps, load), Some(busy));
        }
        assert_eq!(p2c(&eps[..1], load), Some(eps[0]));
        assert_eq!(p2c(&[], load), None);
    }

    #[test]
    fn random_spreads_evenly() {
        let eps = addrs(3);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let a = random(&eps).expect("pick");
            counts[eps.iter().position(|e| *e == a).expect("known")] += 1;
        }
        // Expected 1000 each; ±30% is over 15 standard deviations: never flakes.
        for c in counts {
            assert!((700..=1300).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn consistent_hash_keeps_a_key_and_remaps_about_one_nth_on_add() {
        let n = 10usize;
        let eps = addrs(n as u16);
        let keys: Vec<u64> = (0..10_000u64).map(|k| hash_of(&k)).collect();
        let before: Vec<_> = keys.iter().map(|k| rendezvous(*k, &eps)).collect();
        // Same key, same endpoint, whatever the candidate order.
        let mut reversed = eps.clone();
        reversed.reverse();
        for (k, b) in keys.iter().zip(&before) {
            assert_eq!(rendezvous(*k, &reversed), *b);
        }
        let mut grown = eps.clone();
        grown.push(SocketAddr::from(([10, 9, 9, 9], 8080)));
        let moved = keys
            .iter()
            .zip(&before)
            .filter(|(k, b)| rendezvous(**k, &grown) != **b)
            .count();
        // A new endpoint takes about 1/(N+1) of the keys and only those move.
        let expect = keys.len() / (n + 1);
        assert!(
            moved >= expect / 2 && moved <= expect * 3 / 2,
            "moved {moved}, expected about {expect}"
        );
        // Every moved key went to the new endpoint.
        for (k, b) in keys.iter().zip(&before) {
            let now = rendezvous(*k, &grown);
            assert!(now == *b || now == Some(grown[n]));
        }
        // Removing one endpoint moves only its own keys.
        let shrunk: Vec<_> = eps[1..].to_vec();
        for (k, b) in keys.iter().zip(&before) {
            if *b != Some(eps[0]) {
                assert_eq!(rendezvous(*k, &shrunk), *b);
            }
        }
    }

    #[test]
    fn affinity_inputs() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let ch = |k: HashKey| LoadBalance::ConsistentHash(k);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4".parse().expect("hv"));
        // Client IP after the trusted hop: the same client through two proxies hashes alike.
        let a = Affinity::of(
            &ch(HashKey::ClientIp),
            [10, 0, 0, 1].into(),
            &h,
            &trusted,
            false,
        );
        let b = Affinity::of(
            &ch(HashKey::ClientIp),
            [10, 0, 0, 2].into(),
            &h,
            &trusted,
            false,
        );
        assert_eq!(a.key, b.key);
        assert!(a.key.is_some() && a.set_cookie.is_none());
        // Round robin has no key.
        let rr = Affinity::of(
            &LoadBalance::RoundRobin,
            [1, 1, 1, 1].into(),
            &h,
            &[],
            false,
        );
        assert_eq!(rr.key, None);
        // Header: missing hashes like empty.
        let hk = ch(HashKey::Header("x-user".into()));
        let none = Affinity::of(&hk, [1, 1, 1, 1].into(), &HeaderMap::new(), &[], false);
        assert_eq!(none.key, Some(hash_of(&b""[..])));
        let mut hu = HeaderMap::new();
        hu.insert("x-user", "alice".parse().expect("hv"));
        let alice = Affinity::of(&hk, [2, 2, 2, 2].into(), &hu, &[], false);
        assert_eq!(alice.key, Some(hash_of(&b"alice"[..])));
    }

    #[test]
    fn cookie_is_read_or_issued() {
        let lb = LoadBalance::ConsistentHash(HashKey::Cookie {
            name: "sid".into(),
            ttl: Some(Duration::from_secs(3600)),
        });
        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1; sid=abc".parse().expect("hv"));
        let got = Affinity::of(&lb, [1, 1, 1, 1].into(), &h, &[], false);
        assert_eq!(got.key, Some(hash_of(&b"abc"[..])));
        assert!(got.set_cookie.is_none());
        // Split over two fields (h2).
        let mut h2 = HeaderMap::new();
        h2.append(COOKIE, "a=1".parse().expect("hv"));
        h2.append(COOKIE, "sid=abc".parse().expect("hv"));
        assert_eq!(cookie(&h2, "sid"), Some("abc"));
        assert_eq!(cookie(&h2, "si"), None);

        let issued = Affinity::of(&lb, [1, 1, 1, 1].into(), &HeaderMap::new(), &[], true);
        let sc = issued
            .set_cookie
            .expect("issued")
            .to_str()
            .expect("ascii")
            .to_string();
        assert!(
            sc.starts_with("sid=")
                && sc.ends_with("; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600; Secure"),
            "{sc}"
        );
        // The issued value hashes to the key used for this request, so the client's next
        // request (carrying it) lands where this one did.
        let value = sc
            .strip_prefix("sid=")
            .and_then(|r| r.split(';').next())
            .expect("value");
        assert_eq!(issued.key, Some(hash_of(value.as_bytes())));
        assert_eq!(
            set_cookie("s", "v", None, false),
            "s=v; Path=/; HttpOnly; SameSite=Lax"
        );
        let mut out = HeaderMap::new();
        Affinity::default().apply(&mut out);
        assert!(out.is_empty());
    }
}
