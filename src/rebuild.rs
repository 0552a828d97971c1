//! The rebuild loop shared by every source: change notifications → debounce (about 100 ms
//! holdoff, forced by 500 ms) → translate → publish, plus diagnostics reporting (log, gauge,
//! and a hook for the controller's Events/status). May import: translate, publish, metrics, tokio,
//! k8s-openapi types.
//! Must not import the proxy, kube clients or the filesystem: sources own their I/O.
//!
//! # How a source plugs in (brief §2)
//!
//! - A source implements [`Source`]: `inputs()` returns its current view of the world (cheap: the
//!   source keeps it ready, this is a clone of `Arc`s) plus the source's *own* diagnostics (e.g.
//!   a manifest file that does not parse). It must not block on I/O.
//! - Whenever its view changes the source calls [`Trigger::poke`]. Pokes coalesce: a hundred
//!   pokes during one holdoff are one build.
//! - The app creates a [`Rebuilder`] and runs [`Rebuilder::run`] with the source and a
//!   shutdown future, through [`spawn_off_workers`]: a build is synchronous CPU work (a full
//!   translate takes tens of milliseconds at 10 000 Ingresses) and on a runtime worker it
//!   would stall every connection that worker serves. The first build happens at once (so
//!   `/readyz` turns 200 as soon as possible); after that a build starts [`DEFAULT_HOLDOFF`]
//!   after the last poke, and never later than [`DEFAULT_MAX_DELAY`] after the first pending
//!   poke, so a source that changes continuously still gets a build at least every 500 ms.
//! - Each build: `translate` → [`Publisher::publish`] (equal snapshots are not swapped) →
//!   metrics (`snapshot_builds{result}`, `snapshot_build_duration`,
//!   `config_diagnostics{kind,reason}` and `backend_ready_endpoints{namespace,service,port}`,
//!   both reset then set so fixed problems and removed backends disappear; when the diagnostics
//!   are unchanged, or the backends are the same keys in the same order (an endpoint-only
//!   build), only what moved is touched, with the same result) → a `warn!` per diagnostic that
//!   is new since the previous build → the full, sorted diagnostics list on a
//!   `watch` channel ([`Rebuilder::diagnostics`]) for Events/status in cluster mode.
//! - Snapshots that stopped serving are freed here, not by the last request that held one
//!   ([`Publisher::release`]): after each build, and every [`RELEASE_INTERVAL`] while a
//!   request still holds one.
//! - A served certificate past its `notAfter`, or before its `notBefore`, is a warning on its
//!   Secret (`CertificateExpired`, `CertificateNotYetValid`): checked when the TLS table
//!   changes and when such a date passes (the loop wakes up for it, up to hourly, with no
//!   change pending). `portico_tls_certificate_expiry_timestamp_seconds{namespace,secret}`
//!   carries every served certificate's `notAfter` for alerts ahead of time.
//! - A TLS Secret whose data turns invalid (a bad rotation, a truncated edit) is replaced in the
//!   inputs by its last valid version, with an Error diagnostic on the Secret (brief §4.4: "a
//!   file or object that turns invalid keeps its last good version serving, and is reported"):
//!   its hosts keep their certificate and their redirect instead of falling to the default
//!   certificate. A Secret that leaves, or whose data is not held (the controller keeps data of
//!   referenced Secrets only), is forgotten with its key material.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use prometheus::IntGaugeVec;

use crate::metrics::{Metrics, label, remove_series};
use crate::model::{Backend, BackendTable, ServicePortRef, Snapshot, TlsTable};
use crate::publish::{Published, Publisher};
use crate::translate::{self, Diagnostic, Inputs, Options, Severity};

/// Quiet period after the last change before a build starts (brief §2: "about 100 ms holdoff").
pub const DEFAULT_HOLDOFF: Duration = Duration::from_millis(100);
/// Longest a pending change waits for a build, however busy the source is ("forced by 500 ms").
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(500);
/// How often the loop retries freeing replaced snapshots that requests still held.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(1);

/// Run `work` to its end on a thread of tokio's blocking pool rather than on a runtime worker:
/// for the rebuild loop, whose builds are synchronous CPU work and whose freed snapshots are
/// large. Timers and channels inside `work` behave as on a worker (the workers drive the
/// runtime's drivers). Must be called from within a multi-thread tokio runtime.
pub fn spawn_off_workers<F>(work: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(work))
}

/// What a source gives the rebuild loop.
pub trait Source: Send + Sync {
    /// The source's current inputs and its own diagnostics (not translate's). Called on the
    /// rebuild task for every build, so it must be cheap and must not block on I/O.
    fn inputs(&self) -> (Inputs, Vec<Diagnostic>);
}

/// The change signal sources poke; cheap to clone. Pokes made while no build is pending, while
/// one is pending or while one runs are all remembered (as at most one pending change), so no
/// change is ever lost between a poke and the next build.
#[derive(Debug, Clone, Default)]
pub struct Trigger {
    notify: Arc<Notify>,
}

impl Trigger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tell the rebuild loop that the source's inputs changed.
    pub fn poke(&self) {
        // `notify_one` stores a permit when the loop is not waiting, which is what makes a
        // poke during a build cause one more build instead of being dropped.
        self.notify.notify_one();
    }

    async fn changed(&self) {
        self.notify.notified().await;
    }
}

/// A replacement for the translate step. Production uses [`translate::Translator`] (the real
/// translation, re-deriving routes only when more than endpoints changed); this seam lets the
/// loop's own behaviour (swap/unchanged, endpoint gauges) be tested independently of the
/// Ingress semantics.
pub type TranslateFn = fn(&Inputs, &Options) -> (Snapshot, Vec<Diagnostic>);

/// Settings of the rebuild loop.
#[derive(Debug, Clone)]
pub struct RebuildConfig {
    pub options: Options,
    pub holdoff: Duration,
    pub max_delay: Duration,
    /// `None`: the real, incremental [`translate::Translator`].
    pub translate: Option<TranslateFn>,
}

impl RebuildConfig {
    /// Defaults for everything but the translate options.
    pub fn new(options: Options) -> Self {
        RebuildConfig {
            options,
            holdoff: DEFAULT_HOLDOFF,
            max_delay: DEFAULT_MAX_DELAY,
            translate: None,
        }
    }
}

impl Default for RebuildConfig {
    fn default() -> Self {
        Self::new(Options::default())
    }
}

/// Diagnostics as published after every build: sorted, deduplicated, sources' first.
pub type Diagnostics = Arc<Vec<Diagnostic>>;

/// What one build read and produced, for parts that act after every build (the controller's
/// status writer needs the objects, the served snapshot and the diagnostics together).
#[derive(Debug, Clone)]
pub struct Built {
    pub inputs: Inputs,
    /// The snapshot serving after this build (equal to what it built).
    pub snapshot: Arc<Snapshot>,
    pub diagnostics: Diagnostics,
}

/// Owns the publisher and runs builds; see the module doc.
#[derive(Debug)]
pub struct Rebuilder {
    config: RebuildConfig,
    publisher: Publisher,
    metrics: Metrics,
    trigger: Trigger,
    diagnostics: watch::Sender<Diagnostics>,
    /// Every build's [`Built`]; `None` until the first build.
    built: watch::Sender<Option<Arc<Built>>>,
    /// Diagnostics of the previous build (sorted, deduplicated), to log only new ones.
    previous: Diagnostics,
    /// What the endpoint gauges were last set from.
    gauges: BackendGauges,
    /// Keeps the last derived routes, so endpoint-only changes skip re-deriving them.
    translator: translate::Translator,
    /// The last valid version of each TLS Secret (module doc).
    secrets: LastGoodSecrets,
    /// The served certificates' validity: warnings, the expiry gauge, the next check.
    certs: CertWatch,
}

/// Certificates served past their `notAfter` (or before their `notBefore`) are reported
/// (module doc): checked when the TLS table changes and again when a validity boundary
/// passes, which [`Rebuilder::run`] wakes up for even without any change.
#[derive(Debug, Default)]
struct CertWatch {
    tls: Option<Arc<TlsTable>>,
    diagnostics: Vec<Diagnostic>,
    /// Unix seconds of the next notBefore/notAfter still to come.
    next: Option<i64>,
}

/// Longest sleep before the loop looks at the clock again for certificate dates (a wall clock
/// set forward, or a boundary weeks away).
const CERT_RECHECK_MAX: Duration = Duration::from_secs(3600);

/// The wall clock in Unix seconds (certificate dates are wall-clock times).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl CertWatch {
    /// This build's certificate diagnostics; the expiry gauge follows a changed table.
    fn update(
        &mut self,
        metrics: &Metrics,
        tls: &Arc<TlsTable>,
        secrets: &[Arc<Secret>],
        now: i64,
    ) -> &[Diagnostic] {
        let same = self.tls.as_ref().is_some_and(|t| Arc::ptr_eq(t, tls));
        if same && self.next.is_none_or(|t| now < t) {
            return &self.diagnostics;
        }
        // Each certificate once, with its names: for the gauge, the warnings and the next date.
        let certs = tls.certificates();
        if !same {
            let mut expiry: BTreeMap<(&str, &str), i64> = BTreeMap::new();
            for (cert, _) in &certs {
                if let Some(v) = cert.validity {
                    let (ns, name) = cert.source.split_once('/').unwrap_or(("", &cert.source));
                    expiry.insert((ns, name), v.not_after);
                }
            }
            replace_series(
                &metrics.certificate_expiry,
                ["namespace", "secret"],
                &expiry,
            );
        }
        self.diagnostics = translate::certificate_diagnostics(&certs, secrets, now);
        self.next = translate::next_validity_change(&certs, now);
        self.tls = Some(Arc::clone(tls));
        &self.diagnostics
    }

    /// How long until the next certificate date passes (with a second's margin, the dates
    /// being whole seconds), at most [`CERT_RECHECK_MAX`]; `None`: no date to come.
    fn recheck_in(&self) -> Option<Duration> {
        let wait = self
            .next?
            .saturating_sub(unix_now())
            .saturating_add(1)
            .max(0);
        Some(Duration::from_secs(u64::try_from(wait).unwrap_or(0)).min(CERT_RECHECK_MAX))
    }

    /// A certificate date passed since the last check.
    fn due(&self) -> bool {
        self.next.is_some_and(|t| unix_now() >= t)
    }
}

/// `(namespace, name)` → what the last build saw of that Secret.
#[derive(Debug, Default)]
struct LastGoodSecrets(HashMap<(String, String), KeptSecret>);

#[derive(Debug)]
struct KeptSecret {
    /// The Secret as the source gave it last time, to skip re-parsing an unchanged one.
    seen: Arc<Secret>,
    /// Its last version that parsed as a certificate and key.
    good: Option<Arc<Secret>>,
    /// Why `seen` does not (`None` when it does).
    problem: Option<(&'static str, String)>,
}

impl LastGoodSecrets {
    /// Put the last valid version in place of each Secret that turned invalid; a diagnostic
    /// for each one replaced.
    fn apply(&mut self, secrets: &mut [Arc<Secret>]) -> Vec<Diagnostic> {
        let mut next = HashMap::with_capacity(secrets.len());
        let mut diagnostics = Vec::new();
        for secret in secrets.iter_mut() {
            let meta = &secret.metadata;
            let key = (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            );
            let kept = match self.0.remove(&key) {
                Some(k) if Arc::ptr_eq(&k.seen, secret) || k.seen == *secret => k,
                before => {
                    let problem = translate::tls_secret_problem(secret);
                    // Without data (not held) there is nothing to judge: forget the key material.
                    let good = if problem.is_none() {
                        Some(Arc::clone(secret))
                    } else if secret.data.as_ref().is_some_and(|d| !d.is_empty()) {
                        before.and_then(|b| b.good)
                    } else {
                        None
                    };
                    KeptSecret {
                        seen: Arc::clone(secret),
                        good,
                        problem,
                    }
                }
            };
            if let (Some((reason, message)), Some(good)) = (&kept.problem, &kept.good) {
                diagnostics.push(Diagnostic {
                    severity: Severity::Error,
                    kind: "Secret".to_string(),
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    uid: meta.uid.clone().unwrap_or_default(),
                    reason: (*reason).to_string(),
                    message: format!("{message}; its last valid version keeps serving"),
                });
                *secret = Arc::clone(good);
            }
            next.insert(key, kept);
        }
        self.0 = next;
        diagnostics
    }
}

/// What one build did (returned by [`Rebuilder::build`], mostly for tests and `check`).
#[derive(Debug, Clone, PartialEq)]
pub struct BuildReport {
    pub published: Published,
    pub diagnostics: Diagnostics,
    /// Diagnostics not present in the previous build (those that were logged).
    pub new_diagnostics: usize,
}

impl Rebuilder {
    /// `trigger` is the one the source pokes.
    pub fn new(
        config: RebuildConfig,
        publisher: Publisher,
        metrics: Metrics,
        trigger: Trigger,
    ) -> Self {
        let (diagnostics, _) = watch::channel(Arc::new(Vec::new()));
        let (built, _) = watch::channel(None);
        Rebuilder {
            config,
            publisher,
            metrics,
            trigger,
            diagnostics,
            built,
            previous: Arc::new(Vec::new()),
            gauges: BackendGauges::default(),
            translator: translate::Translator::new(),
            secrets: LastGoodSecrets::default(),
            certs: CertWatch::default(),
        }
    }

    /// Every build's inputs, serving snapshot and diagnostics (`None` before the first build).
    pub fn built(&self) -> watch::Receiver<Option<Arc<Built>>> {
        self.built.subscribe()
    }

    /// The current diagnostics, updated after each build whose diagnostics differ.
    pub fn diagnostics(&self) -> watch::Receiver<Diagnostics> {
        self.diagnostics.subscribe()
    }

    /// Build at once, then on every (debounced) change, until `shutdown` completes.
    pub async fn run<S, F>(mut self, source: &S, shutdown: F)
    where
        S: Source + ?Sized,
        F: Future<Output = ()>,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        // A poke that raced with start-up is covered by the first build: drop its permit so it
        // does not cause a second, identical build. (Polling a fresh `Notified` once consumes
        // a stored permit if there is one.)
        self.consume_pending_poke();
        self.build(source);
        loop {
            let held = self.publisher.release();
            let recheck = self.certs.recheck_in();
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = self.trigger.changed() => {}
                () = tokio::time::sleep(RELEASE_INTERVAL), if held > 0 => continue,
                // A certificate expires (or becomes valid) with no input changing.
                () = tokio::time::sleep(recheck.unwrap_or_default()), if recheck.is_some() => {
                    if self.certs.due() {
                        self.build(source);
                    }
                    continue;
                }
            }
            let first = Instant::now();
            let forced = first + self.config.max_delay;
            let mut quiet = first + self.config.holdoff;
            // Bounded: each pass either builds (break), returns, or moves `quiet` forward,
            // and `forced` caps the deadline, so the inner loop ends within `max_delay`.
            loop {
                let deadline = quiet.min(forced);
                tokio::select! {
                    biased;
                    () = &mut shutdown => return,
                    () = tokio::time::sleep_until(deadline) => break,
                    () = self.trigger.changed() => quiet = Instant::now() + self.config.holdoff,
                }
            }
            self.build(source);
        }
    }

    fn consume_pending_poke(&self) {
        let notified = self.trigger.notify.notified();
        let mut notified = std::pin::pin!(notified);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = notified.as_mut().poll(&mut cx);
    }

    /// One build: inputs → translate → publish → metrics, logs, diagnostics channel.
    pub fn build<S: Source + ?Sized>(&mut self, source: &S) -> BuildReport {
        let started = std::time::Instant::now();
        let (mut inputs, mut source_diagnostics) = source.inputs();
        source_diagnostics.extend(self.secrets.apply(&mut inputs.secrets));
        let (snapshot, mut translate_diagnostics) = match self.config.translate {
            Some(f) => f(&inputs, &self.config.options),
            None => self.translator.translate(&inputs, &self.config.options),
        };
        translate_diagnostics.extend_from_slice(self.certs.update(
            &self.metrics,
            &snapshot.tls,
            &inputs.secrets,
            unix_now(),
        ));
        let diagnostics = merge_diagnostics(source_diagnostics, translate_diagnostics);

        self.gauges.update(&self.metrics, &snapshot);
        let built_snapshot = Arc::new(snapshot.clone());
        let published = self.publisher.publish(snapshot);
        // The serving snapshot is the published one (equal to what we built either way).
        let serving = self.publisher.current().unwrap_or(built_snapshot);
        let result = match published {
            Published::Swapped => "swapped",
            Published::Unchanged => "unchanged",
        };
        self.metrics
            .snapshot_builds
            .with_label_values(&[result])
            .inc();
        self.metrics
            .snapshot_build_duration
            .with_label_values(&[] as &[&str])
            .observe(started.elapsed().as_secs_f64());

        // Unchanged diagnostics (the usual endpoint-only build) leave the gauges and logs as
        // they are; both lists are sorted and deduplicated (`merge_diagnostics`).
        let mut new_diagnostics = 0;
        let diagnostics = if *self.previous == diagnostics {
            Arc::clone(&self.previous)
        } else {
            set_diagnostic_gauges(&self.metrics, &diagnostics);
            for d in &diagnostics {
                if self.previous.binary_search(d).is_err() {
                    new_diagnostics += 1;
                    log_diagnostic(d);
                }
            }
            Arc::new(diagnostics)
        };
        self.previous = Arc::clone(&diagnostics);
        self.diagnostics.send_if_modified(|cur| {
            if **cur == *diagnostics {
                false
            } else {
                *cur = diagnostics.clone();
                true
            }
        });
        self.built.send_replace(Some(Arc::new(Built {
            inputs,
            snapshot: serving,
            diagnostics: diagnostics.clone(),
        })));
        // The previous `Built` held the snapshot this build replaced.
        self.publisher.release();
        tracing::debug!(
            result,
            diagnostics = diagnostics.len(),
            "routing snapshot built"
        );
        BuildReport {
            published,
            diagnostics,
            new_diagnostics,
        }
    }
}

/// Sources' diagnostics and translate's, sorted (by the `Ord` of [`Diagnostic`]) and without
/// duplicates, so the list (and what is logged and exported) does not depend on input order.
pub fn merge_diagnostics(
    mut source: Vec<Diagnostic>,
    translate: Vec<Diagnostic>,
) -> Vec<Diagnostic> {
    source.extend(translate);
    source.sort();
    source.dedup();
    source
}

/// `warn!` with the fields the brief names (§4.4 "Reporting").
fn log_diagnostic(d: &Diagnostic) {
    let severity = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    tracing::warn!(
        kind = %d.kind,
        namespace = %d.namespace,
        name = %d.name,
        reason = %d.reason,
        severity,
        message = %d.message,
    );
}

fn set_diagnostic_gauges(metrics: &Metrics, diagnostics: &[Diagnostic]) {
    let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for d in diagnostics {
        *counts.entry((&d.kind, &d.reason)).or_default() += 1;
    }
    // A (kind, reason) that no longer occurs disappears rather than sticking at its last value.
    replace_series(&metrics.config_diagnostics, ["kind", "reason"], &counts);
}

/// Set the two-label gauge `vec` (labels `names`) to `values`, then remove the series
/// `values` lacks. Removed after the new values are set, not reset before: a scrape in between
/// would see the gauge empty, and an alert on it would flap.
fn replace_series(vec: &IntGaugeVec, names: [&str; 2], values: &BTreeMap<(&str, &str), i64>) {
    for ((a, b), v) in values {
        vec.with_label_values(&[a, b]).set(*v);
    }
    remove_series(vec, |l, _| {
        !values.contains_key(&(label(l, names[0]), label(l, names[1])))
    });
}

/// `backend_ready_endpoints` as last set. The gauge is per (namespace, service, port) label set;
/// two backends can share one (`port: 80` and `port: "80"`), and then the later one in the table
/// sets it, as a reset followed by setting every backend in order would.
#[derive(Debug, Default)]
struct BackendGauges {
    table: Option<Arc<BackendTable>>,
    /// Per backend of `table`: whether it is the last one with its labels (the one that sets).
    owner: Vec<bool>,
}

/// The serving+terminating fallback keeps traffic flowing during a drain, but those endpoints
/// are not ready (EndpointSlice `conditions.ready`), so they count as zero.
fn ready_endpoints(backend: &Backend) -> i64 {
    if backend.draining_fallback {
        0
    } else {
        i64::try_from(backend.endpoints.len()).unwrap_or(i64::MAX)
    }
}

fn port_label(port: &ServicePortRef) -> std::borrow::Cow<'_, str> {
    match port {
        ServicePortRef::Number(n) => n.to_string().into(),
        ServicePortRef::Name(n) => (**n).into(),
    }
}

impl BackendGauges {
    fn update(&mut self, metrics: &Metrics, snapshot: &Snapshot) {
        let table = &snapshot.backends;
        if let Some(prev) = &self.table {
            if Arc::ptr_eq(prev, table) {
                return;
            }
            // Endpoint-only change: the same backends in the same order, so the same labels
            // and owners; set only the gauges whose value moved (10 000 backends at issue 6's
            // scale, typically one changed).
            if prev.backends.len() == table.backends.len()
                && prev
                    .backends
                    .iter()
                    .zip(&table.backends)
                    .all(|(a, b)| a.key == b.key)
            {
                for ((old, new), owner) in
                    prev.backends.iter().zip(&table.backends).zip(&self.owner)
                {
                    let value = ready_endpoints(new);
                    if *owner && ready_endpoints(old) != value {
                        let port = port_label(&new.key.port);
                        metrics
                            .backend_ready_endpoints
                            .with_label_values(&[&*new.key.namespace, &*new.key.service, &port])
                            .set(value);
                    }
                }
                self.table = Some(Arc::clone(table));
                return;
            }
        }
        let mut last: HashMap<(&str, &str, std::borrow::Cow<'_, str>), usize> = HashMap::new();
        for (i, backend) in table.backends.iter().enumerate() {
            let port = port_label(&backend.key.port);
            metrics
                .backend_ready_endpoints
                .with_label_values(&[&*backend.key.namespace, &*backend.key.service, &port])
                .set(ready_endpoints(backend));
            last.insert((&*backend.key.namespace, &*backend.key.service, port), i);
        }
        // Removed backends disappear rather than stick at their last value; removed after the
        // new values are set, so no scrape sees the gauge empty.
        remove_series(&metrics.backend_ready_endpoints, |l, _| {
            let port = std::borrow::Cow::Borrowed(label(l, "port"));
            !last.contains_key(&(label(l, "namespace"), label(l, "service"), port))
        });
        let mut owner = vec![false; table.backends.len()];
        for i in last.into_values() {
            owner[i] = true;
        }
        self.owner = owner;
        self.table = Some(Arc::clone(table));
    }
}
