//! Leader election on a `coordination.k8s.io/v1` Lease, so exactly one replica writes status and
//! Events (brief §1, §4.1). Owns: the Lease protocol (acquire, renew, step down, release) and the
//! "am I leader" `watch` channel. May import kube, k8s-openapi, tokio; must not import
//! `crate::proxy` (every replica serves traffic whether it leads or not).
//!
//! The protocol follows client-go's `leaderelection` package over the Lease API
//! (<https://kubernetes.io/docs/concepts/architecture/leases/>):
//! - a Lease that is absent is created (a 409 AlreadyExists means another replica won);
//! - a Lease held by us, released (`holderIdentity` empty) or expired is taken with a `replace`
//!   carrying the resourceVersion we read, so two replicas racing for it cannot both win: the
//!   loser gets 409 Conflict, writes nothing and re-reads on its next attempt;
//! - "expired" is judged on our own monotonic clock, as client-go's `observedTime`: a Lease
//!   whose record has not changed for `leaseDurationSeconds` since we first saw it that way
//!   ("saw": when the read returned, since a read the server queued can carry a renewal made
//!   after it was sent).
//!   The holder's `renewTime` is its wall clock, and a replica whose clock runs ahead would
//!   otherwise take a Lease that is still being renewed;
//! - `leaseTransitions` is incremented whenever the holder changes;
//! - the leader renews every retry period (one PUT of the Lease it last wrote) and steps down if
//!   it could not renew within the renew deadline, which is shorter than the lease duration, so
//!   it stops acting before anyone else may take over;
//! - on graceful shutdown it steps down first, then clears `holderIdentity` (as client-go's
//!   `ReleaseOnCancel` does), so a successor takes over on its next attempt instead of waiting
//!   for the lease to expire; also when shutdown interrupts a renewal in flight.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// `--lease-name` default.
pub const DEFAULT_LEASE_NAME: &str = "portico-leader";
/// `--lease-duration` default (client-go's usual 15 s).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// `--renew-deadline` default.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// `--retry-period` default.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Where a pod finds its own namespace (Kubernetes service-account token volume).
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid leader election settings: {0}")]
    InvalidConfig(String),
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

pub type Result<T, E = LeaderError> = std::result::Result<T, E>;

/// Settings of one elector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub lease_namespace: String,
    /// Who we are in `holderIdentity`; unique per replica ([`default_identity`]).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// Default name and timings for `identity` in `lease_namespace`.
    pub fn new(lease_namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaderConfig {
            lease_name: DEFAULT_LEASE_NAME.to_string(),
            lease_namespace: lease_namespace.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// From the `portico run` flags, resolving the namespace and identity defaults.
    pub fn from_run_args(args: &crate::config::RunArgs) -> Self {
        LeaderConfig {
            lease_name: args.lease_name.clone(),
            lease_namespace: args
                .lease_namespace
                .clone()
                .unwrap_or_else(default_lease_namespace),
            identity: default_identity(),
            lease_duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
        }
    }

    /// client-go's rules: lease duration > renew deadline > retry period > 0, so a leader that
    /// cannot renew steps down before the lease can expire under it.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(LeaderError::InvalidConfig(m.to_string()));
        if self.lease_name.is_empty() || self.lease_namespace.is_empty() {
            return bad("lease name and namespace must not be empty");
        }
        if self.identity.is_empty() {
            return bad("identity must not be empty");
        }
        if self.retry_period.is_zero() {
            return bad("retry period must be positive");
        }
        if self.renew_deadline <= self.retry_period {
            return bad("renew deadline must be longer than the retry period");
        }
        if self.lease_duration <= self.renew_deadline {
            return bad("lease duration must be longer than the renew deadline");
        }
        Ok(())
    }

    /// `leaseDurationSeconds` is whole seconds: round up, at least 1, so the Lease never
    /// promises less than we renew for.
    fn lease_duration_seconds(&self) -> i32 {
        let d = self.lease_duration;
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
    }
}

/// `POD_NAME` (downward API), else hostname + "-" + process id, so two replicas on one machine
/// never share an identity.
pub fn default_identity() -> String {
    if let Ok(name) = std::env::var("POD_NAME")
        && !name.trim().is_empty()
    {
        return name.trim().to_string();
    }
    format!("{}-{}", hostname(), std::process::id())
}

fn hostname() -> String {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_proc = || std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    from_env
        .or_else(from_proc)
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "portico".to_string())
}

/// `POD_NAMESPACE`, else the service-account namespace file, else `default`.
pub fn default_lease_namespace() -> String {
    if let Ok(ns) = std::env::var("POD_NAMESPACE")
        && !ns.trim().is_empty()
    {
        return ns.trim().to_string();
    }
    std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// One replica's elector. Create with [`LeaderElector::new`], take [`LeaderElector::subscribe`]
/// receivers for the parts that act only while leading, then await [`LeaderElector::run`].
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderConfig,
    leader: watch::Sender<bool>,
    /// The Lease as we last wrote it while holding it: a renewal replaces exactly that version,
    /// so anyone else's write in between turns our renewal into a 409.
    held: Option<Lease>,
    /// When we last wrote the Lease as holder (start of the renew-deadline window).
    last_renew: Option<Instant>,
    /// Someone else's Lease record as we last read it, and when (our clock) we first saw it
    /// so: its expiry counts from there.
    observed: Option<(LeaseSpec, Instant)>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaderConfig) -> Result<Self> {
        config.validate()?;
        let (leader, _) = watch::channel(false);
        Ok(LeaderElector {
            api: Api::namespaced(client, &config.lease_namespace),
            config,
            leader,
            held: None,
            last_renew: None,
            observed: None,
        })
    }

    pub fn config(&self) -> &LeaderConfig {
        &self.config
    }

    /// "Am I leader": `true` while this replica holds the Lease.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    fn set_leader(&self, value: bool) {
        let changed = self.leader.send_if_modified(|v| {
            let changed = *v != value;
            *v = value;
            changed
        });
        if changed {
            if value {
                tracing::info!(identity = %self.config.identity, lease = %self.config.lease_name, "became leader");
            } else {
                tracing::info!(identity = %self.config.identity, lease = %self.config.lease_name, "stopped leading");
            }
        }
    }

    fn api_err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            namespace: self.config.lease_namespace.clone(),
            name: self.config.lease_name.clone(),
            source,
        }
    }

    /// Whether `lease` (held by someone) has gone unrenewed for its duration, on our clock:
    /// `at` is now; the record's first sighting is remembered across attempts.
    fn observed_expired(&mut self, lease: &Lease, at: Instant) -> bool {
        let spec = lease.spec.clone().unwrap_or_default();
        let since = match &self.observed {
            Some((seen, since)) if *seen == spec => *since,
            _ => {
                self.observed = Some((spec.clone(), at));
                at
            }
        };
        observed_expired(&spec, since, at)
    }

    fn step_down(&mut self) {
        self.held = None;
        self.last_renew = None;
        self.set_leader(false);
    }

    /// `started`: when the attempt that wrote `lease` began. The renew-deadline window counts
    /// from there (not from the response), so a slow round trip cannot stretch it past the
    /// `renewTime` others see.
    fn holding(&mut self, lease: Lease, started: Instant) -> bool {
        self.held = Some(lease);
        self.last_renew = Some(started);
        self.set_leader(true);
        true
    }

    /// One attempt: renew if we hold the Lease, else acquire it if it is absent, released or
    /// expired. Returns whether we hold it afterwards. Errors (transport, 5xx) leave the
    /// leadership flag alone: [`Self::run`] steps down once the renew deadline passes.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let started = Instant::now();
        let now = Timestamp::now();
        // A copy: `held` stays in place while the renewal is in flight, so a shutdown (or the
        // run loop's deadline) that drops this attempt still finds the Lease to release.
        if let Some(mut lease) = self.held.clone() {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(self.config.lease_duration_seconds());
            match self
                .api
                .replace(&self.config.lease_name, &PostParams::default(), &lease)
                .await
            {
                Ok(written) => return Ok(self.holding(written, started)),
                // Someone else wrote the Lease since our last renewal (or deleted it): re-read
                // and decide from what is there, without writing this round.
                Err(e) if is_conflict(&e) || is_not_found(&e) => {
                    let current = self
                        .api
                        .get_opt(&self.config.lease_name)
                        .await
                        .map_err(|e| self.api_err(e))?;
                    return Ok(match current {
                        Some(l) if holder(&l) == Some(self.config.identity.as_str()) => {
                            // Still ours (e.g. a label edit bumped the version): keep leading,
                            // renew from the fresh version next round.
                            self.held = Some(l);
                            true
                        }
                        _ => {
                            self.step_down();
                            false
                        }
                    });
                }
                // `held` keeps the version we hold, so a retry still renews it.
                Err(e) => return Err(self.api_err(e)),
            }
        }

        let current = self
            .api
            .get_opt(&self.config.lease_name)
            .await
            .map_err(|e| self.api_err(e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    namespace: Some(self.config.lease_namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.config.lease_duration_seconds()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(written) => Ok(self.holding(written, started)),
                // AlreadyExists: another replica created it first.
                Err(e) if is_conflict(&e) => {
                    self.step_down();
                    Ok(false)
                }
                Err(e) => Err(self.api_err(e)),
            };
        };

        let ours = holder(&lease) == Some(self.config.identity.as_str());
        // Expiry counts from when the answer arrived, as client-go's `observedTime`: a read
        // the server queued may return a renewal made after the read was sent.
        let free = holder(&lease).is_none() || self.observed_expired(&lease, Instant::now());
        if !ours && !free {
            self.step_down();
            return Ok(false);
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if !ours {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            spec.acquire_time = Some(MicroTime(now));
            spec.holder_identity = Some(self.config.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(self.config.lease_duration_seconds());
        // `lease` still carries the resourceVersion we read: optimistic concurrency.
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => Ok(self.holding(written, started)),
            Err(e) if is_conflict(&e) || is_not_found(&e) => {
                // Someone else won the race; no write, re-read on the next attempt.
                self.step_down();
                Ok(false)
            }
            Err(e) => Err(self.api_err(e)),
        }
    }

    /// Steps down, then clears `holderIdentity` on the Lease if we still hold it, so a
    /// successor can take over at once. A Lease someone else took meanwhile is left alone.
    pub async fn release(&mut self) -> Result<()> {
        // Stop acting as leader before anyone else can start.
        let held = self.held.take();
        self.step_down();
        let Some(lease) = held else {
            return Ok(());
        };
        match self.write_release(lease).await {
            // The version we held is stale: a renewal interrupted after the server applied it,
            // or an edit of the Lease. Re-read once; still ours → release that version.
            Err(e) if is_conflict(&e) => {
                let current = self
                    .api
                    .get_opt(&self.config.lease_name)
                    .await
                    .map_err(|e| self.api_err(e))?;
                match current {
                    Some(l) if holder(&l) == Some(self.config.identity.as_str()) => {
                        match self.write_release(l).await {
                            Ok(()) => Ok(()),
                            Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(()),
                            Err(e) => Err(self.api_err(e)),
                        }
                    }
                    _ => Ok(()),
                }
            }
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.api_err(e)),
        }
    }

    /// As client-go's release: empty holder, 1 s duration, times set to now; the transition
    /// count is kept (the next holder increments it). `lease` carries the version it replaces.
    async fn write_release(&self, mut lease: Lease) -> std::result::Result<(), kube::Error> {
        let now = Timestamp::now();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(String::new());
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(MicroTime(now));
        spec.renew_time = Some(MicroTime(now));
        self.api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    /// Acquire/renew every retry period until `shutdown` resolves, then release. While leading,
    /// a renewal that has not succeeded within the renew deadline (errors, hung requests)
    /// steps down.
    pub async fn run<F>(mut self, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()>,
    {
        tokio::pin!(shutdown);
        loop {
            // A leader's attempt may only take what is left of its renew deadline.
            let budget = match self.last_renew {
                Some(at) if self.is_leader() => {
                    self.config.renew_deadline.saturating_sub(at.elapsed())
                }
                _ => self.config.renew_deadline,
            };
            if budget.is_zero() {
                tracing::warn!(identity = %self.config.identity, "lease not renewed within the renew deadline");
                self.step_down();
                continue;
            }
            tokio::select! {
                () = &mut shutdown => break,
                attempt = tokio::time::timeout(budget, self.try_acquire_or_renew()) => {
                    match attempt {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "leader election attempt failed"),
                        Err(_) => tracing::warn!("leader election attempt timed out"),
                    }
                    self.step_down_if_overdue();
                }
            }
            // A leader wakes up no later than its renew deadline, so it steps down on time even
            // when the deadline falls between two retry periods.
            let pause = match self.last_renew {
                Some(at) if self.is_leader() => self
                    .config
                    .retry_period
                    .min(self.config.renew_deadline.saturating_sub(at.elapsed())),
                _ => self.config.retry_period,
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        self.release().await
    }

    fn step_down_if_overdue(&mut self) {
        if self.is_leader()
            && self
                .last_renew
                .is_none_or(|at| at.elapsed() >= self.config.renew_deadline)
        {
            tracing::warn!(identity = %self.config.identity, "lease not renewed within the renew deadline");
            self.step_down();
        }
    }
}

fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// A record first seen unchanged at `since` has expired at `now` once its
/// `leaseDurationSeconds` (absent or negative: 0) have passed.
fn observed_expired(spec: &LeaseSpec, since: Instant, now: Instant) -> bool {
    let secs = u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0);
    now.saturating_duration_since(since) > Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: Timestamp, secs: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(secs),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Expiry counts from when we first saw the record, on our own clock: a `renewTime` far in
    /// the past (the holder's clock behind ours) does not make a live Lease expired, and one
    /// in the future does not keep a dead one alive.
    #[test]
    fn expiry_is_the_duration_after_the_record_was_first_seen_unchanged() {
        let t0 = Instant::now();
        let spec = |s: i32| LeaseSpec {
            lease_duration_seconds: Some(s),
            ..LeaseSpec::default()
        };
        assert!(!observed_expired(
            &spec(15),
            t0,
            t0 + Duration::from_secs(15)
        ));
        assert!(observed_expired(
            &spec(15),
            t0,
            t0 + Duration::from_secs(16)
        ));
        assert!(observed_expired(
            &spec(-3),
            t0,
            t0 + Duration::from_millis(1)
        ));
        assert!(observed_expired(
            &LeaseSpec::default(),
            t0,
            t0 + Duration::from_millis(1)
        ));
    }

    #[test]
    fn empty_holder_is_free() {
        let now = Timestamp::now();
        assert_eq!(holder(&lease(Some(""), now, 15)), None);
        assert_eq!(holder(&lease(None, now, 15)), None);
        assert_eq!(holder(&lease(Some("x"), now, 15)), Some("x"));
    }

    #[test]
    fn timings_are_validated_like_client_go() {
        let mut c = LeaderConfig::new("ns", "me");
        assert!(c.validate().is_ok());
        c.renew_deadline = c.lease_duration;
        assert!(c.validate().is_err());
        let mut c = LeaderConfig::new("ns", "me");
        c.retry_period = c.renew_deadline;
        assert!(c.validate().is_err());
        let c = LeaderConfig::new("ns", "");
        assert!(c.validate().is_err());
    }

    #[test]
    fn config_from_flags() {
        use clap::Parser;
        let cli = crate::config::Cli::try_parse_from([
            "portico",
            "run",
            "--lease-namespace",
            "ops",
            "--lease-name",
            "edge",
            "--retry-period",
            "1s",
        ])
        .expect("parses");
        let crate::config::Command::Run(args) = cli.command else {
            panic!("expected run");
        };
        let c = LeaderConfig::from_run_args(&args);
        assert_eq!(
            (c.lease_namespace.as_str(), c.lease_name.as_str()),
            ("ops", "edge")
        );
        assert_eq!(c.retry_period, Duration::from_secs(1));
        assert!(!c.identity.is_empty());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn lease_seconds_round_up() {
        let mut c = LeaderConfig::new("ns", "me");
        c.lease_duration = Duration::from_millis(1200);
        assert_eq!(c.lease_duration_seconds(), 2);
        c.lease_duration = Duration::from_millis(300);
        assert_eq!(c.lease_duration_seconds(), 1);
        c.lease_duration = Duration::from_secs(15);
        assert_eq!(c.lease_duration_seconds(), 15);
    }
}
