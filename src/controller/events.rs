//! Diagnostics → `events.k8s.io/v1` Events on the objects they name (brief §4.4 "Reporting":
//! an Event in cluster mode). Owns: the Event shape, deduplication and the rate cap. May import
//! translate (Diagnostic), rebuild (the diagnostics channel), kube, k8s-openapi, tokio; must not
//! import `crate::proxy`.
//!
//! Why not kube-runtime's `events::Recorder`: its cache key leaves out the note, so two
//! different problems with one reason would become one Event series, and a repeat is a PATCH
//! each time. Here a repeat is nothing at all:
//! - one Event per (object, reason, message) for as long as that diagnostic stays present
//!   (rebuilds repeat the whole list; only new entries emit). A diagnostic that goes away and
//!   comes back is new again. The cache is bounded ([`EventsConfig::cache_capacity`]) and
//!   entries older than [`EventsConfig::cache_ttl`] re-emit, so a long-standing problem is
//!   reported again after Kubernetes has garbage-collected the old Event (1 h by default);
//! - a token bucket ([`EventsConfig::burst`], [`EventsConfig::per_minute`]) caps creations so a
//!   flapping rebuild loop cannot flood the API server; diagnostics over the cap are not
//!   remembered, so they emit on a later report once tokens are back;
//! - only the leader emits ([`run`] gates on the leader channel).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::rebuild::Diagnostics;
use crate::translate::Diagnostic;

/// `action` of every Event we emit: what we were doing when we found the problem.
pub const ACTION_TRANSLATE: &str = "Translate";
/// Event API maximum for `note` (events.k8s.io/v1: "at most 1kB").
const MAX_NOTE_BYTES: usize = 1024;

/// Errors of the Event reporter.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("creating Event in namespace {namespace}: {source}")]
    Create {
        namespace: String,
        #[source]
        source: kube::Error,
    },
}

pub type Result<T, E = EventsError> = std::result::Result<T, E>;

impl EventsError {
    /// A refusal that retrying the same Event cannot change: a 4xx other than 409 (conflict)
    /// and 429 (throttled).
    pub fn is_permanent(&self) -> bool {
        match self {
            EventsError::Create {
                source: kube::Error::Api(s),
                ..
            } => (400..500).contains(&s.code) && s.code != 409 && s.code != 429,
            EventsError::Create { .. } => false,
        }
    }
}

/// Settings of the reporter.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsConfig {
    /// `reportingController` (the `--controller-name`).
    pub controller: String,
    /// `reportingInstance` (the leader identity).
    pub instance: String,
    /// Events that may be created at once.
    pub burst: u32,
    /// Refill of the bucket.
    pub per_minute: u32,
    /// Remembered (object, reason, message) keys at most; the oldest go first.
    pub cache_capacity: usize,
    /// A remembered key older than this emits again.
    pub cache_ttl: Duration,
}

/// Default burst (as client-go's event spam filter: 25).
pub const DEFAULT_BURST: u32 = 25;
/// Default refill, per minute.
pub const DEFAULT_PER_MINUTE: u32 = 60;
/// Default bound of the dedupe cache.
pub const DEFAULT_CACHE_CAPACITY: usize = 4096;
/// Default age after which a still-present diagnostic emits again (the API server's default
/// Event TTL is 1 h).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(3600);

impl EventsConfig {
    pub fn new(controller: impl Into<String>, instance: impl Into<String>) -> Self {
        EventsConfig {
            controller: controller.into(),
            instance: instance.into(),
            burst: DEFAULT_BURST,
            per_minute: DEFAULT_PER_MINUTE,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            cache_ttl: DEFAULT_CACHE_TTL,
        }
    }
}

/// What one [`EventReporter::report`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportSummary {
    /// Events created.
    pub emitted: usize,
    /// Diagnostics already reported (no Event).
    pub duplicates: usize,
    /// Diagnostics held back by the rate cap (they emit on a later report).
    pub rate_limited: usize,
    /// Creations that failed for a reason that may pass (server errors, throttling, the
    /// connection): retried on a later report.
    pub failed: usize,
    /// Creations the API server refused for good (403: no `events create` permission in that
    /// namespace; 404: no such namespace; 422: invalid): not retried until the diagnostic
    /// changes or its cache entry ages out, so a missing permission is not a request every
    /// retry interval for as long as the replica leads.
    pub refused: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    kind: String,
    namespace: String,
    name: String,
    /// A new object of the same name (deleted and re-created) gets its own Event.
    uid: String,
    reason: String,
    message: String,
}

impl From<&Diagnostic> for Key {
    fn from(d: &Diagnostic) -> Self {
        Key {
            kind: d.kind.clone(),
            namespace: d.namespace.clone(),
            name: d.name.clone(),
            uid: d.uid.clone(),
            reason: d.reason.clone(),
            message: d.message.clone(),
        }
    }
}

/// A token bucket on [`tokio::time::Instant`] (paused time in tests).
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    capacity: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    fn new(burst: u32, per_minute: u32) -> Self {
        Bucket {
            tokens: f64::from(burst),
            capacity: f64::from(burst),
            per_sec: f64::from(per_minute) / 60.0,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The dedupe cache: key → when its Event was created; bounded in size and age.
#[derive(Debug)]
struct Seen {
    at: HashMap<Key, Instant>,
    capacity: usize,
    ttl: Duration,
}

impl Seen {
    fn new(capacity: usize, ttl: Duration) -> Self {
        Seen {
            at: HashMap::new(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    /// Keeps only keys still in `current` and younger than the TTL.
    fn prune(&mut self, current: &BTreeSet<Key>) {
        let ttl = self.ttl;
        self.at
            .retain(|k, at| current.contains(k) && at.elapsed() < ttl);
    }

    fn contains(&self, key: &Key) -> bool {
        self.at.contains_key(key)
    }

    fn insert(&mut self, key: Key) {
        if self.at.len() >= self.capacity
            && !self.at.contains_key(&key)
            && let Some(oldest) = self
                .at
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
        {
            self.at.remove(&oldest);
        }
        self.at.insert(key, Instant::now());
    }

    fn len(&self) -> usize {
        self.at.len()
    }

    fn clear(&mut self) {
        self.at.clear();
    }
}

/// Turns diagnostics lists into Events; see the module doc.
pub struct EventReporter {
    client: Client,
    config: EventsConfig,
    seen: Seen,
    bucket: Bucket,
}

impl std::fmt::Debug for EventReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `kube::Client` is not Debug.
        f.debug_struct("EventReporter")
            .field("config", &self.config)
            .field("remembered", &self.seen.len())
            .finish_non_exhaustive()
    }
}

/// Distinguishes Events created within one nanosecond (names must be unique).
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// apiVersion of the kinds translate names in diagnostics.
fn api_version_of(kind: &str) -> &'static str {
    match kind {
        "Ingress" | "IngressClass" => "networking.k8s.io/v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "RateLimitPolicy" => "portico.dev/v1alpha1",
        _ => "v1",
    }
}

/// Event names are DNS subdomains (RFC 1123: at most 253 characters, dot-separated labels of
/// lower-case letters, digits and `-` that start and end with a letter or digit): keep the
/// name valid whatever the object name is, cut to 200 characters included (a name cut after
/// a `-` or `.` would be refused, and its object would never get an Event).
fn event_name(object: &str, now: Timestamp) -> String {
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mut base = String::new();
    for label in object.split('.') {
        let label: String = label
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let label = label.trim_matches('-');
        if label.is_empty() {
            continue;
        }
        if !base.is_empty() {
            base.push('.');
        }
        base.push_str(label);
    }
    base.truncate(200);
    let keep = base.trim_end_matches(['-', '.']).len();
    base.truncate(keep);
    if base.is_empty() {
        base.push_str("portico");
    }
    format!("{base}.{:x}{seq:x}", now.as_nanosecond())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl EventReporter {
    pub fn new(client: Client, config: EventsConfig) -> Self {
        let bucket = Bucket::new(config.burst, config.per_minute);
        let seen = Seen::new(config.cache_capacity, config.cache_ttl);
        EventReporter {
            client,
            config,
            seen,
            bucket,
        }
    }

    /// The Event for one diagnostic (Warning for errors and warnings alike: both mean the
    /// object is not served exactly as written).
    pub fn event_for(&self, d: &Diagnostic) -> Event {
        let now = Timestamp::now();
        // Cluster-scoped objects (IngressClass) get their Events in `default`, as kube-runtime
        // and client-go do.
        let namespace = if d.namespace.is_empty() {
            "default".to_string()
        } else {
            d.namespace.clone()
        };
        Event {
            metadata: ObjectMeta {
                name: Some(event_name(&d.name, now)),
                namespace: Some(namespace),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".to_string()),
            reason: Some(truncate(&d.reason, 128)),
            action: Some(ACTION_TRANSLATE.to_string()),
            note: Some(truncate(&d.message, MAX_NOTE_BYTES)),
            reporting_controller: Some(self.config.controller.clone()),
            reporting_instance: Some(truncate(&self.config.instance, 128)),
            regarding: Some(ObjectReference {
                api_version: Some(api_version_of(&d.kind).to_string()),
                kind: Some(d.kind.clone()),
                namespace: (!d.namespace.is_empty()).then(|| d.namespace.clone()),
                name: Some(d.name.clone()),
                // `kubectl describe` selects an object's Events by uid as well as by name.
                uid: (!d.uid.is_empty()).then(|| d.uid.clone()),
                ..ObjectReference::default()
            }),
            ..Event::default()
        }
    }

    /// Reports the current full list of diagnostics: creates Events for the entries not yet
    /// reported, within the rate cap, and forgets entries no longer present.
    pub async fn report(&mut self, diagnostics: &[Diagnostic]) -> ReportSummary {
        let mut summary = ReportSummary::default();
        let current: BTreeSet<Key> = diagnostics.iter().map(Key::from).collect();
        self.seen.prune(&current);
        // Sorted and deduplicated: a stable order, so under the cap the same ones go first.
        let mut done = BTreeSet::new();
        let mut sorted: Vec<&Diagnostic> = diagnostics.iter().collect();
        sorted.sort();
        for d in sorted {
            let key = Key::from(d);
            if self.seen.contains(&key) || !done.insert(key.clone()) {
                summary.duplicates += 1;
                continue;
            }
            if !self.bucket.take() {
                summary.rate_limited += 1;
                continue;
            }
            match self.create(d).await {
                Ok(()) => {
                    summary.emitted += 1;
                    self.seen.insert(key);
                }
                Err(e) if e.is_permanent() => {
                    summary.refused += 1;
                    self.seen.insert(key);
                    tracing::warn!(error = %e, diagnostic = %d, "could not create Event; not retried while this diagnostic stands");
                }
                Err(e) => {
                    summary.failed += 1;
                    tracing::warn!(error = %e, diagnostic = %d, "could not create Event");
                }
            }
        }
        if summary.rate_limited > 0 {
            tracing::warn!(
                held_back = summary.rate_limited,
                "Event rate cap reached; remaining diagnostics are reported later"
            );
        }
        summary
    }

    async fn create(&self, d: &Diagnostic) -> Result<()> {
        let event = self.event_for(d);
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        api.create(&PostParams::default(), &event)
            .await
            .map(|_| ())
            .map_err(|source| EventsError::Create { namespace, source })
    }

    /// Forgets what was reported (e.g. on losing leadership: the next leader reports afresh).
    pub fn reset(&mut self) {
        self.seen.clear();
    }
}

/// Reports every diagnostics list published on `diagnostics` (the rebuild loop's channel)
/// while `leader` is true, until `shutdown`. On becoming leader the current list is reported
/// at once; held-back diagnostics are retried every `retry` while leading, and the list is
/// reported again every cache TTL, so a problem that outlives its Event (garbage-collected
/// after an hour) gets a new one even when nothing else changes.
pub async fn run<F>(
    mut reporter: EventReporter,
    mut leader: watch::Receiver<bool>,
    mut diagnostics: watch::Receiver<Diagnostics>,
    retry: Duration,
    shutdown: F,
) where
    F: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let mut pending = true;
    let refresh = reporter.config.cache_ttl;
    loop {
        if *leader.borrow_and_update() && pending {
            let list = diagnostics.borrow_and_update().clone();
            // Losing the Lease mid-report abandons the rest (see `status::run`).
            let summary = tokio::select! {
                s = reporter.report(&list) => Some(s),
                _ = leader.wait_for(|l| !*l) => None,
            };
            match summary {
                Some(summary) => pending = summary.rate_limited > 0 || summary.failed > 0,
                None => {
                    reporter.reset();
                    pending = true;
                }
            }
        }
        let retry_tick = tokio::time::sleep(if pending { retry } else { refresh });
        tokio::select! {
            () = &mut shutdown => return,
            r = leader.changed() => {
                if r.is_err() {
                    return;
                }
                if !*leader.borrow() {
                    reporter.reset();
                }
                pending = true;
            }
            r = diagnostics.changed() => {
                if r.is_err() {
                    return;
                }
                pending = true;
            }
            () = retry_tick => pending = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_valid_and_unique() {
        let now = Timestamp::now();
        let a = event_name("Shop_Front", now);
        let b = event_name("Shop_Front", now);
        assert_ne!(a, b);
        assert!(a.starts_with("shopfront."));
        let long = format!("{}-b", "a".repeat(199));
        let dotted = format!("{}.b", "a".repeat(199));
        for object in [
            "Shop_Front",
            long.as_str(),
            dotted.as_str(),
            "_-x.-y-._.z",
            "..",
            "",
        ] {
            let name = event_name(object, now);
            assert!(name.len() <= 253, "{name}");
            for label in name.split('.') {
                assert!(
                    !label.is_empty()
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                    "{object:?} -> {name:?}"
                );
            }
        }
        assert!(event_name("_-x.-y-._.z", now).starts_with("x.y.z."));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }

    fn key(name: &str) -> Key {
        Key {
            kind: "Ingress".into(),
            namespace: "ns".into(),
            name: name.into(),
            uid: String::new(),
            reason: "R".into(),
            message: "m".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_cache_is_bounded_and_ages_out() {
        let mut seen = Seen::new(2, Duration::from_secs(60));
        seen.insert(key("a"));
        tokio::time::advance(Duration::from_secs(1)).await;
        seen.insert(key("b"));
        tokio::time::advance(Duration::from_secs(1)).await;
        // Full: the oldest ("a") goes.
        seen.insert(key("c"));
        assert_eq!(seen.len(), 2);
        assert!(!seen.contains(&key("a")));
        assert!(seen.contains(&key("b")) && seen.contains(&key("c")));

        // Keys no longer present are forgotten.
        let current: BTreeSet<Key> = [key("c")].into();
        seen.prune(&current);
        assert!(!seen.contains(&key("b")));
        assert!(seen.contains(&key("c")));

        // Past the TTL a still-present key is forgotten too (its Event re-emits).
        tokio::time::advance(Duration::from_secs(60)).await;
        seen.prune(&current);
        assert_eq!(seen.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_caps_then_refills() {
        let mut b = Bucket::new(3, 60);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(b.take());
        assert!(!b.take());
    }
}
