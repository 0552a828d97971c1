//! RateLimitPolicy enforcement state (brief §4.5): token buckets keyed by (policy, key value)
//! and per-policy in-flight counters, held outside the snapshot so rebuilds and endpoint churn
//! never reset them; plus the `RateLimit-Policy` / `RateLimit` response headers.
//!
//! Owns: bucket arithmetic, key derivation, the bounded bucket store (idle expiry, key cap,
//! LRU eviction) and header rendering. Must not import kube, k8s-openapi, translate or the
//! listener; it sees policies only as `model::RateLimit`.
//!
//! Design: N shards, each a `Mutex<HashMap>` plus an LRU index (`BTreeMap<seq, key>`). A
//! request locks only the shard its (policy, key) hashes to, for a few hundred nanoseconds,
//! so there is no global lock on the request path (a `Global` key is one bucket and so one
//! shard by definition). A sharded map was chosen over lock-free GCRA on an `AtomicU64`
//! because the brief needs things an atomic cannot give cheaply: LRU eviction under a hard key
//! cap, exact refunds when a later policy refuses, and re-clamping when a policy's numbers
//! change. Arithmetic is exact integer math: one token is `period` nanoseconds' worth of
//! units, so refill is `elapsed_ns * requests` units with no rounding drift.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, PoisonError};

use http::{HeaderMap, HeaderValue};
use prometheus::{IntCounter, IntGauge};
use tokio::time::Instant;

use crate::model::{PolicyRef, RateLimit, RateLimitKey, TokenBucketSpec};

/// Most shards (plenty for lock spreading on any core count we run on).
const MAX_SHARDS: usize = 64;
/// Fewest keys per shard: small caps use fewer shards, so LRU stays meaningful.
const MIN_KEYS_PER_SHARD: usize = 64;
/// Header values longer than this are stored as a 128-bit keyed hash, so a hostile header
/// cannot make one bucket key large (memory stays `cap × small constant`).
pub const MAX_KEY_BYTES: usize = 64;
/// How many of the least recently used entries are looked at for a full (stateless) bucket
/// before the oldest one with state is evicted.
const EVICT_SCAN: usize = 8;
/// How far down the least recently used entries an eviction looks for a bucket of the policy
/// that holds the most keys (see [`Shard::make_room`]).
const VICTIM_SCAN: usize = 256;

/// What a bucket is keyed by within one policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyValue {
    /// An IPv4 address, or an IPv6 address's /64 (see [`client_key`]).
    Ip(IpAddr),
    /// A header value up to [`MAX_KEY_BYTES`].
    Header(Box<[u8]>),
    /// A longer header value, as a keyed 128-bit hash (keys random per process).
    HeaderDigest(u64, u64),
    /// The header is absent: all such requests share one bucket (brief §4.5).
    MissingHeader,
    /// The header is repeated: its value is ambiguous, and keyed on any one line (or all of
    /// them) a client could add a throwaway line to get a fresh bucket per request. All such
    /// requests share one bucket.
    RepeatedHeader,
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BucketKey {
    policy: PolicyRef,
    value: KeyValue,
}

/// Exact bucket state: `level` in units where one token is `period_ns` units.
#[derive(Debug, Clone, Copy)]
struct Slot {
    level: u128,
    updated: Instant,
    spec: TokenBucketSpec,
    seq: u64,
}

/// Integer view of a spec: token size `p` (= period in ns, ≥1), refill `r` units/ns (=
/// requests), capacity in units.
#[derive(Debug, Clone, Copy)]
struct Units {
    p: u128,
    r: u128,
    cap: u128,
}

impl Units {
    fn of(spec: &TokenBucketSpec) -> Units {
        let p = spec.period.as_nanos().clamp(1, u128::from(u64::MAX));
        let r = u128::from(spec.requests.max(1));
        let burst = u128::from(spec.burst.max(1));
        Units {
            p,
            r,
            cap: burst * p,
        }
    }

    /// Level after `elapsed_ns` of refill, clamped to capacity.
    fn refill(&self, level: u128, elapsed_ns: u128) -> u128 {
        level
            .saturating_add(elapsed_ns.saturating_mul(self.r))
            .min(self.cap)
    }

    /// Nanoseconds until `level` reaches `target` units.
    fn ns_until(&self, level: u128, target: u128) -> u128 {
        target.saturating_sub(level).div_ceil(self.r)
    }
}

/// Re-express `level` (units of `old`) in units of `new`, keeping the token count and
/// clamping to the new capacity (brief §4.5: an edited policy keeps its tokens). Split into
/// whole tokens and remainder so the product cannot overflow for any `u64` period.
fn convert(level: u128, old: &Units, new: &Units) -> u128 {
    let whole = (level / old.p).saturating_mul(new.p);
    let part = (level % old.p) * new.p / old.p;
    whole.saturating_add(part).min(new.cap)
}

/// What a client sees of a bucket at `level`. The draft's reset (`t`) is the time "until
/// additional quota is made available": for a bucket that refills continuously, the next whole
/// token, which is also what `Retry-After` says on a 429 (draft §6: it must not be earlier than
/// the reset). A full bucket gains nothing more, so it has none.
fn view_of(u: &Units, level: u128) -> BucketView {
    let next_token = (level / u.p).saturating_add(1).saturating_mul(u.p);
    BucketView {
        remaining: u64::try_from(level / u.p).unwrap_or(u64::MAX),
        reset_secs: (level < u.cap).then(|| {
            u64::try_from(u.ns_until(level, next_token).div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
        }),
    }
}

/// The bucket key of a client address: an IPv4 address as is, an IPv6 address by its /64.
/// One IPv6 host (or subscriber) is routinely given a whole /64 and may use any address in it,
/// so keyed by full address a single client would have 2^64 fresh buckets (RFC 6177: end
/// sites get a /64 or more).
pub fn client_key(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((v6.to_bits() & !u128::from(u64::MAX)).into()),
        },
    }
}

fn elapsed_ns(from: Instant, now: Instant) -> u128 {
    now.saturating_duration_since(from).as_nanos()
}

#[derive(Default)]
struct Shard {
    map: HashMap<BucketKey, Slot>,
    /// Least recently used first.
    lru: BTreeMap<u64, BucketKey>,
    next_seq: u64,
    /// Keys held per policy.
    per_policy: HashMap<PolicyRef, usize>,
}

impl Shard {
    fn is_full(slot: &Slot, now: Instant) -> bool {
        let u = Units::of(&slot.spec);
        u.refill(slot.level, elapsed_ns(slot.updated, now)) >= u.cap
    }

    fn remove(&mut self, key: &BucketKey) -> Option<Slot> {
        let slot = self.map.remove(key)?;
        self.lru.remove(&slot.seq);
        if let Some(n) = self.per_policy.get_mut(&key.policy) {
            *n -= 1;
            if *n == 0 {
                self.per_policy.remove(&key.policy);
            }
        }
        Some(slot)
    }

    fn insert(&mut self, key: BucketKey, slot: Slot) {
        *self.per_policy.entry(key.policy.clone()).or_default() += 1;
        self.lru.insert(slot.seq, key.clone());
        self.map.insert(key, slot);
    }

    fn touch(&mut self, key: &BucketKey) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(slot) = self.map.get_mut(key) {
            let old = std::mem::replace(&mut slot.seq, seq);
            if let Some(k) = self.lru.remove(&old) {
                self.lru.insert(seq, k);
            }
        }
    }

    /// Drop up to two least recently used buckets that have refilled to full: they carry no
    /// state (an absent bucket starts full), so this is idle expiry, amortised over requests.
    fn expire_idle(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        for _ in 0..2 {
            let Some((_, key)) = self.lru.first_key_value() else {
                break;
            };
            let full = self.map.get(key).is_some_and(|s| Shard::is_full(s, now));
            if !full {
                break;
            }
            let key = key.clone();
            self.remove(&key);
            dropped += 1;
        }
        dropped
    }

    /// Make room for one more key under `cap`: a full bucket among the least recently used
    /// goes first (no state lost); otherwise the least recently used bucket of the policy
    /// that holds the most keys. A flood of distinct keys (header values a client makes up,
    /// addresses) thus evicts its own policy's buckets, not the state of clients another
    /// policy is limiting. Returns (dropped, of which evicted with state).
    fn make_room(&mut self, cap: usize, now: Instant) -> (usize, usize) {
        let (mut dropped, mut evicted) = (0, 0);
        while self.map.len() >= cap {
            let full = self
                .lru
                .values()
                .take(EVICT_SCAN)
                .find(|k| self.map.get(*k).is_some_and(|s| Shard::is_full(s, now)))
                .cloned();
            let victim = match full {
                Some(k) => k,
                None => {
                    let largest = self
                        .per_policy
                        .iter()
                        .max_by_key(|(_, n)| **n)
                        .map(|(p, _)| p);
                    // The largest policy holds at least its share of the keys, so one of
                    // them is near the front unless it is also the most active one; then the
                    // least recently used bucket of any policy goes.
                    let of_largest = self
                        .lru
                        .values()
                        .take(VICTIM_SCAN)
                        .find(|k| Some(&k.policy) == largest);
                    match of_largest.or_else(|| self.lru.values().next()) {
                        Some(k) => {
                            evicted += 1;
                            k.clone()
                        }
                        None => break,
                    }
                }
            };
            self.remove(&victim);
            dropped += 1;
        }
        (dropped, evicted)
    }
}

/// Bucket numbers seen by one request for one policy, for the response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketView {
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Seconds until the next whole token (rounded up); `None` while the bucket is full.
    pub reset_secs: Option<u64>,
}

/// Outcome of [`Limiter::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every policy admitted the request (tokens taken).
    Admitted,
    /// `limits[policy]` (the first to refuse) refused; no policy's tokens were consumed.
    /// `retry_after_secs` is whole seconds until every bucket that is empty now has a token
    /// again, rounded up, at least 1 (brief §4.5).
    Limited {
        policy: usize,
        retry_after_secs: u64,
    },
}

/// [`Limiter::check`]'s verdict plus the headers every response on the route carries.
#[derive(Debug, Clone)]
pub struct Checked {
    pub verdict: Verdict,
    pub headers: Option<RateHeaders>,
}

/// `RateLimit-Policy` and `RateLimit` values for one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateHeaders {
    pub policy: HeaderValue,
    pub limit: HeaderValue,
}

impl RateHeaders {
    /// Set both fields on a response (replacing any the upstream sent: the proxy is the one
    /// enforcing these limits).
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert("ratelimit-policy", self.policy.clone());
        headers.insert("ratelimit", self.limit.clone());
    }
}

/// In-flight counters of the policies hashing to one shard.
type InFlightMap = HashMap<PolicyRef, Arc<AtomicUsize>>;

/// Token buckets and in-flight counters of every policy, shared by all connections.
pub struct Limiter {
    shards: Box<[Mutex<Shard>]>,
    inflight: Box<[Mutex<InFlightMap>]>,
    per_shard_cap: usize,
    hasher: std::collections::hash_map::RandomState,
    digest_keys: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
    tracked: IntGauge,
    evicted: IntCounter,
}

/// Memory footprint of the bucket store, for tests and debugging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Buckets held.
    pub keys: usize,
    /// Allocated entries over all shard maps.
    pub map_capacity: usize,
    /// Hard cap on held buckets (`max_keys` rounded down to a multiple of the shard count).
    pub cap: usize,
}

impl Limiter {
    /// A store of at most `max_keys` buckets (split evenly over the shards); `tracked` and
    /// `evicted` are `portico_ratelimit_tracked_keys` / `portico_ratelimit_evicted_keys_total`.
    pub fn new(max_keys: usize, tracked: IntGauge, evicted: IntCounter) -> Limiter {
        let max_keys = max_keys.max(1);
        let n = (max_keys / MIN_KEYS_PER_SHARD).clamp(1, MAX_SHARDS);
        Limiter {
            shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
            inflight: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard_cap: (max_keys / n).max(1),
            hasher: Default::default(),
            digest_keys: Default::default(),
            tracked,
            evicted,
        }
    }

    fn shard_of<K: Hash>(&self, key: &K, n: usize) -> usize {
        // `n` ≤ 64, so the cast cannot truncate anything that matters.
        (self.hasher.hash_one(key) % n as u64) as usize
    }

    /// The key value of `limit` for this request.
    pub fn key_value(&self, key: &RateLimitKey, client: IpAddr, headers: &HeaderMap) -> KeyValue {
        match key {
            RateLimitKey::ClientIp => KeyValue::Ip(client_key(client)),
            RateLimitKey::Global => KeyValue::Global,
            RateLimitKey::Header(name) => {
                let mut lines = headers.get_all(name.as_str()).iter();
                let Some(v) = lines.next() else {
                    return KeyValue::MissingHeader;
                };
                if lines.next().is_some() {
                    return KeyValue::RepeatedHeader;
                }
                if v.len() <= MAX_KEY_BYTES {
                    return KeyValue::Header(v.as_bytes().into());
                }
                let mut a = self.digest_keys.0.build_hasher();
                let mut b = self.digest_keys.1.build_hasher();
                a.write(v.as_bytes());
                b.write(v.as_bytes());
                KeyValue::HeaderDigest(a.finish(), b.finish())
            }
        }
    }

    /// Take one token from the bucket of every policy in `limits` that has one. If any
    /// refuses, the tokens already taken for this request are given back, so a request refused
    /// by one policy consumes nothing from the others (one extra shard lock per refusal; the
    /// refund re-adds exactly one token, clamped to capacity).
    pub fn check(
        &self,
        limits: &[RateLimit],
        client: IpAddr,
        headers: &HeaderMap,
        now: Instant,
    ) -> Checked {
        let mut views: Vec<Option<BucketView>> = Vec::with_capacity(limits.len());
        let mut taken: Vec<(usize, BucketKey, TokenBucketSpec)> = Vec::new();
        let mut verdict = Verdict::Admitted;
        for (i, limit) in limits.iter().enumerate() {
            let Some(spec) = limit.bucket else {
                views.push(None);
                continue;
            };
            let key = BucketKey {
                policy: limit.policy.clone(),
                value: self.key_value(&limit.key, client, headers),
            };
            let take = verdict == Verdict::Admitted;
            let (view, refused) = self.take(&key, &spec, take, now);
            match (&mut verdict, refused) {
                (Verdict::Admitted, Some(retry_after_secs)) => {
                    verdict = Verdict::Limited {
                        policy: i,
                        retry_after_secs,
                    }
                }
                (Verdict::Admitted, None) => taken.push((i, key, spec)),
                // Already refused: the client may retry only when every empty bucket has a
                // token again, so Retry-After is the longest wait.
                (
                    Verdict::Limited {
                        retry_after_secs, ..
                    },
                    Some(wait),
                ) => *retry_after_secs = (*retry_after_secs).max(wait),
                (Verdict::Limited { .. }, None) => {}
            }
            views.push(Some(view));
        }
        if verdict != Verdict::Admitted {
            for (i, key, spec) in &taken {
                let view = self.refund(key, spec, now);
                if let Some(slot) = views.get_mut(*i) {
                    *slot = Some(view);
                }
            }
        }
        let headers = render(limits, &views, |p| self.in_flight_now(p));
        Checked { verdict, headers }
    }

    /// Refill, then take a token when `take` (and one is there). Returns the view after the
    /// request and, when it was refused, the Retry-After seconds.
    fn take(
        &self,
        key: &BucketKey,
        spec: &TokenBucketSpec,
        take: bool,
        now: Instant,
    ) -> (BucketView, Option<u64>) {
        let u = Units::of(spec);
        let idx = self.shard_of(key, self.shards.len());
        let mut shard = self.shards[idx]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut dropped = shard.expire_idle(now);
        // `now` was read before the lock: another request may have stored a later time. Never
        // move a bucket's clock backwards, or the span between the two would refill twice.
        let now = shard.map.get(key).map_or(now, |slot| slot.updated.max(now));
        let level = match shard.map.get(key) {
            Some(slot) => {
                let old = Units::of(&slot.spec);
                // Refill at the rate that was in force, then re-express in the new spec (a
                // changed policy keeps its tokens, clamped; brief §4.5).
                let refilled = old.refill(slot.level, elapsed_ns(slot.updated, now));
                if slot.spec == *spec {
                    refilled
                } else {
                    convert(refilled, &old, &u)
                }
            }
            None => u.cap,
        };
        // Refused (or, when only looking, would be): whole seconds until one token is back.
        let wait = (level < u.p).then(|| {
            let secs = u.ns_until(level, u.p).div_ceil(1_000_000_000).max(1);
            u64::try_from(secs).unwrap_or(u64::MAX)
        });
        let (level, refused) = match (take, wait) {
            (false, _) => (level, wait),
            (true, None) => (level - u.p, None),
            (true, Some(_)) => (level, wait),
        };
        let view = view_of(&u, level);
        let mut added = false;
        if level >= u.cap {
            // Full again: no state needed.
            if shard.remove(key).is_some() {
                dropped += 1;
            }
        } else if let Some(slot) = shard.map.get_mut(key) {
            slot.level = level;
            slot.updated = now;
            slot.spec = *spec;
            shard.touch(key);
        } else {
            let (d, evicted) = shard.make_room(self.per_shard_cap, now);
            dropped += d;
            if evicted > 0 {
                self.evicted.inc_by(evicted as u64);
            }
            let seq = shard.next_seq;
            shard.next_seq += 1;
            shard.insert(
                key.clone(),
                Slot {
                    level,
                    updated: now,
                    spec: *spec,
                    seq,
                },
            );
            added = true;
        }
        drop(shard);
        let delta = i64::from(added) - i64::try_from(dropped).unwrap_or(i64::MAX);
        if delta != 0 {
            self.tracked.add(delta);
        }
        (view, refused)
    }

    /// Give back the token `take` removed; returns the bucket as the client now sees it.
    fn refund(&self, key: &BucketKey, spec: &TokenBucketSpec, now: Instant) -> BucketView {
        let u = Units::of(spec);
        let idx = self.shard_of(key, self.shards.len());
        let mut shard = self.shards[idx]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let level = match shard.map.get_mut(key) {
            Some(slot) => {
                let now = slot.updated.max(now);
                let level = u
                    .refill(slot.level, elapsed_ns(slot.updated, now))
                    .saturating_add(u.p)
                    .min(u.cap);
                slot.level = level;
                slot.updated = now;
                level
            }
            // Evicted in between by a flood: it starts full again anyway.
            None => u.cap,
        };
        if level >= u.cap && shard.remove(key).is_some() {
            drop(shard);
            self.tracked.dec();
        }
        view_of(&u, level)
    }

    /// The in-flight counter of a policy (`maxInFlight`), kept across snapshots. Counters no
    /// request holds are pruned when a new one is created, so deleted policies do not leak.
    pub fn in_flight(&self, policy: &PolicyRef) -> Arc<AtomicUsize> {
        let idx = self.shard_of(policy, self.inflight.len());
        let mut map = self.inflight[idx]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(policy) {
            return c.clone();
        }
        map.retain(|_, c| Arc::strong_count(c) > 1);
        map.entry(policy.clone()).or_default().clone()
    }

    fn in_flight_now(&self, policy: &PolicyRef) -> usize {
        let idx = self.shard_of(policy, self.inflight.len());
        let map = self.inflight[idx]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(policy)
            .map_or(0, |c| c.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Headers for a response refused before any bucket was looked at (over `maxInFlight`):
    /// the buckets are read, not consumed.
    pub fn peek(&self, limits: &[RateLimit], client: IpAddr, headers: &HeaderMap) -> Checked {
        let now = Instant::now();
        let views: Vec<Option<BucketView>> = limits
            .iter()
            .map(|l| {
                l.bucket.map(|spec| {
                    let key = BucketKey {
                        policy: l.policy.clone(),
                        value: self.key_value(&l.key, client, headers),
                    };
                    self.take(&key, &spec, false, now).0
                })
            })
            .collect();
        Checked {
            verdict: Verdict::Admitted,
            headers: render(limits, &views, |p| self.in_flight_now(p)),
        }
    }

    /// Buckets held now.
    pub fn tracked(&self) -> usize {
        usize::try_from(self.tracked.get()).unwrap_or(0)
    }

    /// Keys held and memory allocated for them.
    pub fn footprint(&self) -> Footprint {
        let (mut keys, mut map_capacity) = (0, 0);
        for s in self.shards.iter() {
            let s = s.lock().unwrap_or_else(PoisonError::into_inner);
            keys += s.map.len();
            map_capacity += s.map.capacity();
        }
        Footprint {
            keys,
            map_capacity,
            cap: self.per_shard_cap * self.shards.len(),
        }
    }
}

/// A structured-field String (RFC 9651 §3.3.3): printable ASCII, `"` and `\` escaped.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

/// Render `RateLimit-Policy` and `RateLimit` in the structured-field form of
/// draft-ietf-httpapi-ratelimit-headers-10 (§4, §5): each a List with one Item per policy,
/// the policy name as a String. A token-bucket policy advertises `q` = its burst (what can be
/// spent at once) and `w` = seconds to refill that much, so `q/w` is the sustained rate
/// `requests/period`; `RateLimit` gives `r` = whole tokens left and `t` = seconds until the
/// next token (left out while the bucket is full). A `maxInFlight`-only policy uses the draft's
/// `concurrent-requests` quota unit (§3.1.2), with `r` = free slots. `None` when no policy
/// applies.
/// The largest integer a structured field may carry (RFC 9651 §3.3.1: 15 digits); a larger
/// one makes a client discard the whole field.
const SF_INTEGER_MAX: u128 = 999_999_999_999_999;

/// `RateLimit-Policy`'s `q` and `w` of a bucket: `w` is the time to refill the burst in whole
/// seconds (rounded up, at least 1, at most [`SF_INTEGER_MAX`]) and `q` the tokens that refill
/// in `w`. When the refill takes whole seconds `q` is the burst; otherwise (1000 a second with a
/// burst of 1, say) `q` grows with the rounded-up window, so `q/w` stays the sustained rate
/// instead of falling to 1 a second.
fn quota_window(spec: &TokenBucketSpec) -> (u128, u128) {
    let u = Units::of(spec);
    let window = u
        .ns_until(0, u.cap)
        .div_ceil(1_000_000_000)
        .clamp(1, SF_INTEGER_MAX);
    let quota = (u.r * window * 1_000_000_000 / u.p).clamp(1, SF_INTEGER_MAX);
    (quota, window)
}

fn render(
    limits: &[RateLimit],
    views: &[Option<BucketView>],
    in_flight: impl Fn(&PolicyRef) -> usize,
) -> Option<RateHeaders> {
    let mut policy = Vec::with_capacity(limits.len());
    let mut state = Vec::with_capacity(limits.len());
    for (limit, view) in limits.iter().zip(views) {
        let name = sf_string(&limit.policy.name);
        match (&limit.bucket, view, limit.max_in_flight) {
            (Some(spec), Some(view), _) => {
                let (quota, window) = quota_window(spec);
                policy.push(format!("{name};q={quota};w={window}"));
                state.push(match view.reset_secs {
                    Some(t) => format!("{name};r={};t={t}", view.remaining),
                    None => format!("{name};r={}", view.remaining),
                });
            }
            (None, _, Some(cap)) => {
                let free = (cap as usize).saturating_sub(in_flight(&limit.policy));
                policy.push(format!("{name};q={cap};qu=\"concurrent-requests\""));
                state.push(format!("{name};r={free}"));
            }
            _ => {}
        }
    }
    if policy.is_empty() {
        return None;
    }
    Some(RateHeaders {
        policy: HeaderValue::from_str(&policy.join(", ")).ok()?,
        limit: HeaderValue::from_str(&state.join(", ")).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(name: &str) -> PolicyRef {
        PolicyRef {
            namespace: "shop".into(),
            name: name.into(),
            uid: "".into(),
        }
    }

    fn limit(name: &str, requests: u32, period: Duration, burst: u32) -> RateLimit {
        RateLimit {
            policy: policy(name),
            bucket: Some(TokenBucketSpec {
                requests,
                period,
                burst,
            }),
            key: RateLimitKey::ClientIp,
            max_in_flight: None,
        }
    }

    fn limiter(max_keys: usize) -> Limiter {
        Limiter::new(
            max_keys,
            IntGauge::new("t", "t").expect("gauge"),
            IntCounter::new("e", "e").expect("counter"),
        )
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn admitted(l: &Limiter, limits: &[RateLimit]) -> Checked {
        l.check(limits, IP, &HeaderMap::new(), Instant::now())
    }

    /// With two empty buckets, Retry-After is the longer wait: retrying when only the first
    /// refusing policy has a token would be refused again.
    #[tokio::test(start_paused = true)]
    async fn retry_after_is_the_longest_wait_of_the_empty_buckets() {
        let l = limiter(100);
        let limits = [
            limit("a-fast", 1, Duration::from_secs(1), 1),
            limit("b-slow", 1, Duration::from_secs(60), 1),
        ];
        assert_eq!(admitted(&l, &limits).verdict, Verdict::Admitted);
        assert_eq!(
            admitted(&l, &limits).verdict,
            Verdict::Limited {
                policy: 0,
                retry_after_secs: 60
            }
        );
    }

    /// A request that read the clock before a later one took the shard lock must not move the
    /// bucket's clock backwards (that span would be refilled twice).
    #[tokio::test(start_paused = true)]
    async fn an_earlier_timestamp_never_refills_twice() {
        let l = limiter(100);
        let limits = [limit("p", 1, Duration::from_secs(10), 2)];
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        let t1 = Instant::now();
        let h = HeaderMap::new();
        assert_eq!(l.check(&limits, IP, &h, t1).verdict, Verdict::Admitted);
        assert_eq!(l.check(&limits, IP, &h, t1).verdict, Verdict::Admitted);
        // Late arrival with the older time t0: the bucket is empty at t1 and stays so.
        assert!(matches!(
            l.check(&limits, IP, &h, t0).verdict,
            Verdict::Limited { .. }
        ));
        // And at t1 + 5 s only half a token came back, not the stretch t0..t1 as well.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(matches!(
            l.check(&limits, IP, &h, Instant::now()).verdict,
            Verdict::Limited { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_then_retry_after() {
        let l = limiter(100);
        // 10 per minute: one token every 6 s, capacity 3.
        let limits = [limit("p", 10, Duration::from_secs(60), 3)];
        for _ in 0..3 {
            assert_eq!(admitted(&l, &limits).verdict, Verdict::Admitted);
        }
        assert_eq!(
            admitted(&l, &limits).verdict,
            Verdict::Limited {
                policy: 0,
                retry_after_secs: 6
            }
        );
        // 2.5 s later the next token is 3.5 s away: rounded up to 4.
        tokio::time::advance(Duration::from_millis(2_500)).await;
        assert_eq!(
            admitted(&l, &limits).verdict,
            Verdict::Limited {
                policy: 0,
                retry_after_secs: 4
            }
        );
        tokio::time::advance(Duration::from_millis(3_500)).await;
        assert_eq!(admitted(&l, &limits).verdict, Verdict::Admitted);
        assert!(matches!(
            admitted(&l, &limits).verdict,
            Verdict::Limited { .. }
        ));
        // Refill never exceeds the burst: after an hour exactly 3 again.
        tokio::time::advance(Duration::from_secs(3_600)).await;
        for _ in 0..3 {
            assert_eq!(admitted(&l, &limits).verdict, Verdict::Admitted);
        }
        assert!(matches!(
            admitted(&l, &limits).verdict,
            Verdict::Limited { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn sub_second_wait_is_at_least_one_second() {
        let l = limiter(100);
        // 100 per second: the next token is 10 ms away, Retry-After still says 1.
        let limits = [limit("p", 100, Duration::from_secs(1), 1)];
        assert_eq!(admitted(&l, &limits).verdict, Verdict::Admitted);
        assert_eq!(
            admitted(&l, &limits).verdict,
            Verdict::Limited {
                policy: 0,
                retry_after_secs: 1
            }
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(admitted(&l, &limits).verdict, Verdict::Admitted);
    }

    #[tokio::test(start_paused = true)]
    async fn continuous_refill_is_exact() {
        let l = limiter(100);
        // 3 per 1 s: a token every 333.33 ms; after 1 s exactly 3 tokens, no drift.
        let limits = [limit("p", 3, Duration::from_secs(1), 3)];
        for _ in 0..3 {
            assert_eq!(admitted(&l, &limits).verdict, Verdict::Admitted);
        }
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        for _ in 0..3 {
            assert_eq!(admitted(&l, &limits).verdict, Verdict::Admitted);
        }
        assert!(matches!(
            admitted(&l, &limits).verdict,
            Verdict::Limited { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn headers_report_remaining_and_reset() {
        let l = limiter(100);
        let limits = [limit("web", 10, Duration::from_secs(60), 5)];
        let c = admitted(&l, &limits);
        let h = c.headers.expect("headers");
        // q = burst 5, w = 5 tokens × 6 s = 30 s.
        assert_eq!(h.policy, "\"web\";q=5;w=30");
        assert_eq!(h.limit, "\"web\";r=4;t=6");
        for _ in 0..4 {
            admitted(&l, &limits);
        }
        let c = admitted(&l, &limits);
        assert_eq!(c.headers.expect("headers").limit, "\"web\";r=0;t=6");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_by_one_policy_consumes_none_of_the_others() {
        let l = limiter(100);
        let limits = [
            limit("a-wide", 10, Duration::from_secs(1), 10),
            limit("b-tight", 1, Duration::from_secs(60), 1),
        ];
        assert_eq!(admitted(&l, &limits).verdict, Verdict::Admitted);
        for _ in 0..20 {
            let c = admitted(&l, &limits);
            assert!(matches!(c.verdict, Verdict::Limited { policy: 1, .. }));
            // a-wide still shows 9 left: refused requests gave their token back.
            assert_eq!(
                c.headers.expect("headers").limit,
                "\"a-wide\";r=9;t=1, \"b-tight\";r=0;t=60"
            );
        }
        // a-wide alone still has its 9 (no time passed).
        for _ in 0..9 {
            assert_eq!(admitted(&l, &limits[..1]).verdict, Verdict::Admitted);
        }
        assert!(matches!(
            admitted(&l, &limits[..1]).verdict,
            Verdict::Limited { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn policy_edit_clamps_tokens_and_uses_new_rate() {
        let l = limiter(100);
        let old = [limit("p", 100, Duration::from_secs(100), 100)];
        for _ in 0..10 {
            admitted(&l, &old);
        }
        // 90 left; the edit lowers capacity to 20: clamped to 20, not reset to full.
        let new = [limit("p", 1, Duration::from_secs(10), 20)];
        let c = admitted(&l, &new);
        assert_eq!(c.headers.expect("headers").limit, "\"p\";r=19;t=10");
        for _ in 0..19 {
            assert_eq!(admitted(&l, &new).verdict, Verdict::Admitted);
        }
        assert_eq!(
            admitted(&l, &new).verdict,
            Verdict::Limited {
                policy: 0,
                retry_after_secs: 10
            }
        );
        // Raising capacity keeps the (empty) bucket's tokens: still limited.
        let raised = [limit("p", 1, Duration::from_secs(10), 1000)];
        assert!(matches!(
            admitted(&l, &raised).verdict,
            Verdict::Limited { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_policy_keeps_its_bucket_and_full_buckets_carry_no_state() {
        let l = limiter(100);
        let limits = [limit("p", 1, Duration::from_secs(10), 2)];
        admitted(&l, &limits);
        assert_eq!(l.tracked(), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        // Refilled to full: the next look drops it (idle expiry) before re-adding it spent.
        admitted(&l, &limits);
        assert_eq!(l.tracked(), 1);
        tokio::time::advance(Duration::from_secs(20)).await;
        let other = [limit("q", 1, Duration::from_secs(10), 2)];
        admitted(&l, &other);
        assert_eq!(l.footprint().keys, l.tracked());
        // One shard (small cap): q's request expired p, which had refilled to full.
        let p = l.peek(&limits, IP, &HeaderMap::new());
        assert_eq!(p.headers.expect("h").limit, "\"p\";r=2");
    }

    /// A repeated key header is ambiguous: every such request, whatever its lines, shares one
    /// bucket, so a throwaway line in front of a real key buys nothing.
    #[test]
    fn a_repeated_key_header_shares_one_bucket() {
        let l = limiter(100);
        let key = RateLimitKey::Header("x-api-key".into());
        let lines = |vals: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in vals {
                h.append("x-api-key", HeaderValue::from_static(v));
            }
            l.key_value(&key, IP, &h)
        };
        assert_eq!(lines(&["a", "real"]), KeyValue::RepeatedHeader);
        assert_eq!(lines(&["a", "real"]), lines(&["b", "real"]));
        assert_eq!(lines(&["real"]), KeyValue::Header(b"real"[..].into()));
        assert_ne!(lines(&["real"]), lines(&["x", "real"]));
    }

    #[test]
    fn header_keys_missing_shared_and_long_values_hashed() {
        let l = limiter(100);
        let key = RateLimitKey::Header("x-api-key".into());
        let empty = HeaderMap::new();
        assert_eq!(l.key_value(&key, IP, &empty), KeyValue::MissingHeader);
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("abc"));
        assert_eq!(
            l.key_value(&key, IP, &h),
            KeyValue::Header((*b"abc").into())
        );
        let long = "k".repeat(10_000);
        h.insert("x-api-key", HeaderValue::from_str(&long).expect("v"));
        let a = l.key_value(&key, IP, &h);
        assert!(matches!(a, KeyValue::HeaderDigest(..)));
        assert_eq!(a, l.key_value(&key, IP, &h));
        h.insert(
            "x-api-key",
            HeaderValue::from_str(&format!("{long}x")).expect("v"),
        );
        assert_ne!(a, l.key_value(&key, IP, &h));
        assert_eq!(l.key_value(&RateLimitKey::Global, IP, &h), KeyValue::Global);
    }

    #[tokio::test(start_paused = true)]
    async fn two_hundred_thousand_clients_stay_within_the_cap() {
        const CAP: usize = 10_000;
        let evicted = IntCounter::new("e", "e").expect("counter");
        let l = Limiter::new(CAP, IntGauge::new("t", "t").expect("g"), evicted.clone());
        let limits = [limit("p", 1, Duration::from_secs(3600), 5)];
        let headers = HeaderMap::new();
        // A heavy legitimate client keeps using its bucket throughout the flood.
        let regular: IpAddr = "198.51.100.7".parse().expect("ip");
        l.check(&limits, regular, &headers, Instant::now());
        let mut max_seen = 0;
        for i in 0..200_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.check(&limits, ip, &headers, Instant::now());
            if i % 1000 == 0 {
                // Touched every 1000 inserts: recently used, so never the LRU victim.
                l.check(&limits, regular, &headers, Instant::now());
            }
            max_seen = max_seen.max(l.tracked());
        }
        let fp = l.footprint();
        assert!(max_seen <= CAP, "tracked {max_seen} > cap {CAP}");
        assert_eq!(fp.keys, l.tracked());
        assert!(fp.keys <= fp.cap && fp.cap <= CAP);
        // The bound asserted: the maps never allocate more than 3 × cap entries, whatever the
        // number of distinct clients (a shard never holds more than cap/shards keys; under
        // insert/remove churn hashbrown grows to at most the power of two above 2 × that and
        // then rehashes in place). Each entry is a fixed-size key + slot (header values over
        // MAX_KEY_BYTES are hashed), so memory is O(cap).
        assert!(fp.map_capacity <= 3 * CAP, "{fp:?}");
        assert!(evicted.get() >= 190_000, "evicted {}", evicted.get());
        // The regular client's bucket survived with its state: 5 - 1 - 200 touches → empty.
        let c = l.check(&limits, regular, &headers, Instant::now());
        assert!(matches!(c.verdict, Verdict::Limited { .. }));
    }

    /// `q/w` is the sustained rate also when refilling the burst takes less than a second or
    /// not a whole number of seconds, and neither exceeds a structured-field integer.
    #[test]
    fn quota_and_window_keep_the_rate_and_fit_a_structured_field() {
        let spec = |requests, period, burst| TokenBucketSpec {
            requests,
            period,
            burst,
        };
        let s = Duration::from_secs;
        // Refill in whole seconds: q is the burst.
        assert_eq!(quota_window(&spec(10, s(60), 20)), (20, 120));
        // 1000 a second, burst 1: refilled in 1 ms.
        assert_eq!(quota_window(&spec(1000, s(1), 1)), (1000, 1));
        // 2 a second, burst 3: 1.5 s → w = 2, q = 4.
        assert_eq!(quota_window(&spec(2, s(1), 3)), (4, 2));
        // The longest window: capped at 15 digits, q keeps the rate (1 per 8784 h).
        let (q, w) = quota_window(&spec(1, s(8784 * 3600), u32::MAX));
        assert_eq!(w, SF_INTEGER_MAX);
        assert_eq!(q, SF_INTEGER_MAX / (8784 * 3600));
        let (q, w) = quota_window(&spec(u32::MAX, Duration::from_millis(1), u32::MAX));
        assert!(q <= SF_INTEGER_MAX && w >= 1, "{q} {w}");
    }

    /// An IPv6 client is keyed by its /64: every address a host may take from its prefix
    /// shares one bucket. IPv4 (and IPv4-mapped) addresses are keyed as they are.
    #[tokio::test(start_paused = true)]
    async fn ipv6_clients_share_a_bucket_per_64() {
        let l = limiter(100);
        let limits = [limit("p", 1, Duration::from_secs(3600), 2)];
        let h = HeaderMap::new();
        let verdicts: Vec<bool> = (1..=3)
            .map(|i| {
                let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().expect("ip");
                l.check(&limits, ip, &h, Instant::now()).verdict == Verdict::Admitted
            })
            .collect();
        assert_eq!(verdicts, [true, true, false], "one /64, one bucket of 2");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(
            l.check(&limits, other, &h, Instant::now()).verdict,
            Verdict::Admitted
        );
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        assert_eq!(client_key(mapped), IP);
        let v4: IpAddr = "192.0.2.2".parse().expect("ip");
        assert_eq!(client_key(v4), v4);
    }

    /// A flood of made-up keys on one policy, past the key cap, evicts that policy's own
    /// buckets: a client another policy is limiting stays limited.
    #[tokio::test(start_paused = true)]
    async fn a_key_flood_on_one_policy_does_not_free_clients_of_another() {
        // One shard of 64 keys.
        let l = limiter(64);
        let shop = [limit("shop", 1, Duration::from_secs(3600), 1)];
        let api = [RateLimit {
            key: RateLimitKey::Header("x-api-key".into()),
            ..limit("api", 1, Duration::from_secs(3600), 1)
        }];
        let throttled: IpAddr = "198.51.100.7".parse().expect("ip");
        let no_headers = HeaderMap::new();
        assert_eq!(
            l.check(&shop, throttled, &no_headers, Instant::now())
                .verdict,
            Verdict::Admitted
        );
        for i in 0..1000 {
            let mut h = HeaderMap::new();
            h.insert(
                "x-api-key",
                HeaderValue::from_str(&format!("k{i}")).expect("v"),
            );
            l.check(&api, IP, &h, Instant::now());
        }
        assert!(l.tracked() <= 64);
        assert!(
            matches!(
                l.check(&shop, throttled, &no_headers, Instant::now())
                    .verdict,
                Verdict::Limited { .. }
            ),
            "the flood gave the throttled client a fresh bucket"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_buckets_are_evicted_before_buckets_with_state() {
        let evicted = IntCounter::new("e", "e").expect("counter");
        // A cap of 1: one shard holding one key.
        let l = Limiter::new(1, IntGauge::new("t", "t").expect("g"), evicted.clone());
        let limits = [limit("p", 1, Duration::from_secs(10), 1)];
        let h = HeaderMap::new();
        let a: IpAddr = "192.0.2.10".parse().expect("ip");
        let b: IpAddr = "192.0.2.11".parse().expect("ip");
        l.check(&limits, a, &h, Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        // a is full again: b takes its place without an eviction being counted.
        l.check(&limits, b, &h, Instant::now());
        assert_eq!(evicted.get(), 0);
        assert_eq!(l.tracked(), 1);
        // Now b has state; a (fresh) evicts it and that is counted.
        l.check(&limits, a, &h, Instant::now());
        assert_eq!(evicted.get(), 1);
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn concurrent_requests_get_exactly_the_burst_and_refunds_are_exact() {
        // Real threads on real locks: no token is lost or double-spent, and refusals by the
        // tighter policy give the wider one back exactly what they took.
        let l = Arc::new(limiter(100));
        let global = |name: &str, burst: u32| RateLimit {
            key: RateLimitKey::Global,
            // One token an hour: nothing refills while the test runs.
            ..limit(name, 1, Duration::from_secs(3600), burst)
        };
        let limits: Arc<[RateLimit]> = vec![global("a-wide", 1000), global("b-tight", 600)].into();
        let admitted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (l, limits, admitted) = (l.clone(), limits.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let c = l.check(&limits, IP, &HeaderMap::new(), Instant::now());
                        if c.verdict == Verdict::Admitted {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(admitted.load(std::sync::atomic::Ordering::Relaxed), 600);
        let h = l.peek(&limits, IP, &HeaderMap::new()).headers.expect("h");
        let state = h.limit.to_str().expect("ascii").to_string();
        assert!(state.starts_with("\"a-wide\";r=400;"), "{state}");
        assert!(state.contains("\"b-tight\";r=0;"), "{state}");
    }

    #[test]
    fn concurrency_only_policies_render_free_slots() {
        let l = limiter(100);
        let p = RateLimit {
            policy: policy("cap"),
            bucket: None,
            key: RateLimitKey::Global,
            max_in_flight: Some(5),
        };
        let counter = l.in_flight(&p.policy);
        counter.fetch_add(2, std::sync::atomic::Ordering::AcqRel);
        let c = l.check(
            std::slice::from_ref(&p),
            IP,
            &HeaderMap::new(),
            Instant::now(),
        );
        assert_eq!(c.verdict, Verdict::Admitted);
        let h = c.headers.expect("headers");
        assert_eq!(h.policy, "\"cap\";q=5;qu=\"concurrent-requests\"");
        assert_eq!(h.limit, "\"cap\";r=3");
        assert_eq!(sf_string("a\"b\\c\n"), "\"a\\\"b\\\\c_\"");
    }
}
