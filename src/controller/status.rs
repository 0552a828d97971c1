//! Status writes of the elected controller (brief §1, §4.1, §4.5): Ingress
//! `status.loadBalancer.ingress` on the Ingresses we serve (cleared on those we do not serve,
//! unless another controller claims them: such an Ingress is its controller's even when it
//! still carries our address, so two controllers never take turns rewriting it) and the
//! RateLimitPolicy `Accepted` condition. Owns: deciding the desired status from a
//! snapshot + inputs + diagnostics, and writing only what differs. May import model, translate,
//! crd, kube, k8s-openapi, tokio; must not import `crate::proxy`.
//!
//! Writes are server-side apply on the `/status` subresource
//! (<https://kubernetes.io/docs/reference/using-api/server-side-apply/>) with field manager
//! [`FIELD_MANAGER`] and `force`, since the controller is the authority on these fields. A write
//! is skipped when the object already carries exactly the desired status, and also when we
//! already wrote that status over the very resourceVersion we are shown again (a reflector
//! that has not caught up with our own write yet), so rebuilds never cause write storms.
//!
//! Addresses (ingress-nginx's `--publish-status-address` / `--publish-service` semantics):
//! `--publish-status-address` entries (IPs → `ip`, anything else → `hostname`), else the
//! `--publish-service` Service's: for `type: LoadBalancer`, its `status.loadBalancer.ingress`
//! and `spec.externalIPs` (never its cluster IP: while the load balancer is pending there is
//! nothing to publish yet); for any other type, its `spec.externalIPs`, else its
//! `spec.clusterIP`. With no address at all, Ingress status is left alone (we would have
//! nothing to publish, and no way to tell our old address from someone else's).
//!
//! The publish Service is read from the controller's stores ([`StatusWriter::with_lookup`]:
//! the watched namespaces, or the dedicated watcher on that one Service), whose changes
//! trigger a rebuild and so a sync; only a writer without stores (tests, tools) GETs it.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{Ingress, IngressLoadBalancerIngress};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::crd::{Condition, RateLimitPolicy};
use crate::model::{IngressRef, Snapshot};
use crate::translate::{Diagnostic, Inputs, Severity, Svc};

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "portico";
/// Condition type on RateLimitPolicy status.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Reason of `Accepted=True`.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Interval at which [`run`] re-syncs (retrying failed writes) while leading.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(60);
/// A failed write of an object is not sent again, while its desired status stays the same,
/// for this long, doubling with each failure up to [`WRITE_RETRY_MAX`]: every build syncs, and
/// a write the API refuses (403 without RBAC, 422) must not be repeated on each one.
pub const WRITE_RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest wait before a failed write is tried again.
pub const WRITE_RETRY_MAX: Duration = Duration::from_secs(300);

/// Errors of status writing.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("reading publish Service {namespace}/{name}: {source}")]
    PublishService {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing status of {kind} {namespace}/{name}: {source}")]
    Write {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

pub type Result<T, E = StatusError> = std::result::Result<T, E>;

/// Where the address written into Ingress status comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishAddress {
    /// No address configured: Ingress status is not managed.
    None,
    /// `--publish-status-address`.
    Static(Vec<String>),
    /// `--publish-service ns/name`.
    Service { namespace: String, name: String },
}

impl PublishAddress {
    /// From the flags; `--publish-status-address` wins when both are given.
    pub fn from_flags(addresses: &[String], service: Option<&(String, String)>) -> Self {
        let addresses: Vec<String> = addresses
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if !addresses.is_empty() {
            PublishAddress::Static(addresses)
        } else if let Some((namespace, name)) = service {
            PublishAddress::Service {
                namespace: namespace.clone(),
                name: name.clone(),
            }
        } else {
            PublishAddress::None
        }
    }
}

/// An address of Ingress status: `(ip, hostname)`, exactly one set.
type Addr = (Option<String>, Option<String>);

fn addr_of_text(a: &str) -> Addr {
    match a.parse::<IpAddr>() {
        Ok(ip) => (Some(ip.to_string()), None),
        Err(_) => (None, Some(a.to_string())),
    }
}

/// The addresses a Service offers, as the module doc says. Reads the compact form the stores
/// hold ([`Svc`] keeps exactly these fields).
pub fn service_addresses(svc: &Svc) -> Vec<IngressLoadBalancerIngress> {
    // `Svc` has already dropped entries with neither IP nor hostname.
    let from_lb: Vec<Addr> = svc
        .load_balancer_ingress()
        .iter()
        .map(|i| {
            (
                i.ip.as_deref().map(str::to_string),
                i.hostname.as_deref().map(str::to_string),
            )
        })
        .collect();
    let mut from_external: Vec<Addr> = svc
        .external_ips()
        .iter()
        .map(|ip| addr_of_text(ip))
        .collect();
    if svc.is_load_balancer() {
        // As ingress-nginx: the load balancer's addresses and the external IPs, both. The
        // cluster IP is internal; published while the load balancer is pending, tools that
        // read Ingress status (external-dns) would act on it.
        let mut both = from_lb;
        both.append(&mut from_external);
        return to_lb(both);
    }
    let from_cluster: Vec<Addr> = svc
        .cluster_ip()
        // Headless Services have clusterIP "None": no address.
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .map(|ip| vec![addr_of_text(ip)])
        .unwrap_or_default();
    let chosen = [from_lb, from_external, from_cluster]
        .into_iter()
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    to_lb(chosen)
}

/// Sorted and deduplicated, so the desired status does not depend on list order.
fn to_lb(mut addrs: Vec<Addr>) -> Vec<IngressLoadBalancerIngress> {
    addrs.sort();
    addrs.dedup();
    addrs
        .into_iter()
        .map(|(ip, hostname)| IngressLoadBalancerIngress {
            ip,
            hostname,
            ports: None,
        })
        .collect()
}

/// The Ingresses a snapshot serves: those named by any of its routes or its default route.
pub fn served_ingresses(snapshot: &Snapshot) -> BTreeSet<IngressRef> {
    let hosts = &snapshot.hosts;
    hosts
        .exact
        .values()
        .chain(hosts.wildcard.values())
        .chain(hosts.catch_all.iter())
        .flat_map(|h| h.routes().iter())
        .chain(hosts.default_route.iter())
        .map(|r| r.ingress.clone())
        .collect()
}

/// The `Accepted` condition a policy should carry, given all diagnostics: `False` with the
/// (first, in sorted order) Error's reason when translate refused the policy, else `True`.
/// `lastTransitionTime` is kept from `existing` when the status value does not change.
pub fn accepted_condition(
    policy: &RateLimitPolicy,
    diagnostics: &[Diagnostic],
    now: Timestamp,
) -> Condition {
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let mut errors: Vec<&Diagnostic> = diagnostics
        .iter()
        .filter(|d| {
            d.severity == Severity::Error
                && d.kind == "RateLimitPolicy"
                && d.namespace == ns
                && d.name == name
        })
        .collect();
    errors.sort();
    let (status, reason, message) = match errors.first() {
        Some(first) => (
            "False",
            first.reason.clone(),
            errors
                .iter()
                .map(|d| d.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        None => (
            "True",
            REASON_ACCEPTED.to_string(),
            "the policy is applied to its target".to_string(),
        ),
    };
    let existing = policy
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_ACCEPTED));
    // metav1.Condition: lastTransitionTime changes only when `status` changes.
    let last_transition_time = match existing {
        Some(c) if c.status == status && c.last_transition_time.is_some() => {
            c.last_transition_time.clone()
        }
        _ => Some(rfc3339_seconds(now)),
    };
    Condition {
        type_: CONDITION_ACCEPTED.to_string(),
        status: status.to_string(),
        reason,
        message,
        observed_generation: policy.metadata.generation,
        last_transition_time,
    }
}

/// metav1.Time is RFC 3339 with second precision.
fn rfc3339_seconds(t: Timestamp) -> String {
    Timestamp::from_second(t.as_second())
        .map(|t| t.to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// What one [`StatusWriter::sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Ingresses whose address we wrote.
    pub ingresses_written: usize,
    /// Ingresses no longer served whose address we removed.
    pub ingresses_cleared: usize,
    /// RateLimitPolicies whose condition we wrote.
    pub policies_written: usize,
    /// Objects already carrying the desired status.
    pub unchanged: usize,
    /// Writes that failed (logged; retried with backoff, [`WRITE_RETRY_BASE`]).
    pub failed: usize,
    /// Writes not sent because the same write failed recently.
    pub deferred: usize,
}

/// What one object's write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Written,
    /// Nothing to write (already written, or the object is gone).
    Unchanged,
    /// The same write failed recently; not sent yet.
    Deferred,
}

/// A write that failed: what it was, how often in a row, and when it may be sent again.
#[derive(Debug)]
struct FailedWrite {
    status: Value,
    failures: u32,
    retry_at: Instant,
}

/// Key of the write cache: kind, namespace, name.
type ObjKey = (&'static str, String, String);

/// Finds a Service by namespace and name in the controller's stores.
pub type ServiceLookup = Arc<dyn Fn(&str, &str) -> Option<Arc<Svc>> + Send + Sync>;

/// Writes status; see the module doc. Call [`Self::sync`] only while leading ([`run`] does).
pub struct StatusWriter {
    client: Client,
    publish: PublishAddress,
    /// Where the publish Service is read; `None`: from the API on every sync.
    lookup: Option<ServiceLookup>,
    /// The publish Service was missing at the last sync (its warning is logged once, when it
    /// goes missing, not on every build).
    publish_missing: bool,
    /// Last write per object: the resourceVersion we were shown and the status we applied.
    written: HashMap<ObjKey, (Option<String>, Value)>,
    /// Writes that failed, per object, for the backoff.
    failed: HashMap<ObjKey, FailedWrite>,
    /// `(--ingress-class, --controller-name)`: whose Ingresses we may clear.
    class: (String, String),
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `kube::Client` is not Debug.
        f.debug_struct("StatusWriter")
            .field("publish", &self.publish)
            .field("written", &self.written.len())
            .field("failed", &self.failed.len())
            .finish_non_exhaustive()
    }
}

fn current_addrs(ing: &Ingress) -> Vec<Addr> {
    ing.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|l| {
            l.iter()
                .map(|i| (i.ip.clone(), i.hostname.clone()))
                .collect()
        })
        .unwrap_or_default()
}

impl StatusWriter {
    pub fn new(client: Client, publish: PublishAddress) -> Self {
        StatusWriter {
            client,
            publish,
            lookup: None,
            publish_missing: false,
            written: HashMap::new(),
            failed: HashMap::new(),
            class: (
                crate::translate::DEFAULT_INGRESS_CLASS.to_string(),
                crate::translate::DEFAULT_CONTROLLER_NAME.to_string(),
            ),
        }
    }

    /// Our `--ingress-class` and `--controller-name` (default: the flags' defaults).
    pub fn with_class(mut self, ingress_class: &str, controller_name: &str) -> Self {
        self.class = (ingress_class.to_string(), controller_name.to_string());
        self
    }

    /// Read the publish Service through `lookup` (the controller's stores) instead of the API.
    pub fn with_lookup(mut self, lookup: ServiceLookup) -> Self {
        self.lookup = Some(lookup);
        self
    }

    /// Forgets previous writes (on losing leadership: someone else may write meanwhile).
    pub fn reset(&mut self) {
        self.written.clear();
        self.failed.clear();
    }

    /// The addresses to publish now. A `--publish-service` is looked up in `services` (the
    /// reflector's view), then through the lookup when there is one, else read from the API
    /// (e.g. outside a `--watch-namespace`); a missing Service gives no address.
    pub async fn addresses(
        &mut self,
        services: &[Arc<Svc>],
    ) -> Result<Vec<IngressLoadBalancerIngress>> {
        match &self.publish {
            PublishAddress::None => Ok(Vec::new()),
            PublishAddress::Static(list) => {
                Ok(to_lb(list.iter().map(|a| addr_of_text(a)).collect()))
            }
            PublishAddress::Service { namespace, name } => {
                let found = services
                    .iter()
                    .find(|s| s.namespace() == namespace && s.name() == name);
                let found = match (found, &self.lookup) {
                    (Some(svc), _) => Some(svc.clone()),
                    (None, Some(lookup)) => lookup(namespace, name),
                    (None, None) => {
                        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
                        match api.get_opt(name).await {
                            Ok(svc) => svc.map(|s| Arc::new(Svc::from(s))),
                            Err(source) => {
                                return Err(StatusError::PublishService {
                                    namespace: namespace.clone(),
                                    name: name.clone(),
                                    source,
                                });
                            }
                        }
                    }
                };
                let missing = found.is_none();
                if missing && !self.publish_missing {
                    tracing::warn!(%namespace, %name, "publish Service not found; Ingress status is left as it is until it appears");
                }
                self.publish_missing = missing;
                Ok(found.map(|s| service_addresses(&s)).unwrap_or_default())
            }
        }
    }

    /// Brings the status of every Ingress and RateLimitPolicy in `inputs` to what `snapshot`
    /// and `diagnostics` say. Per-object failures are counted and logged, not fatal.
    pub async fn sync(
        &mut self,
        inputs: &Inputs,
        snapshot: &Snapshot,
        diagnostics: &[Diagnostic],
    ) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        self.forget_deleted(inputs);
        // Without addresses the Ingress part is skipped; the policy conditions below do not
        // depend on them, so a failed lookup must not hold those back.
        let addresses = match self.addresses(&inputs.services).await {
            Ok(a) => a,
            Err(e) => {
                report.failed += 1;
                tracing::warn!(error = %e, "Ingress status skipped this sync");
                Vec::new()
            }
        };
        if !addresses.is_empty() {
            let ours: Vec<Addr> = addresses
                .iter()
                .map(|a| (a.ip.clone(), a.hostname.clone()))
                .collect();
            let served = served_ingresses(snapshot);
            for ing in &inputs.ingresses {
                let key = IngressRef {
                    namespace: ing.namespace().unwrap_or_default().into(),
                    name: ing.name_any().into(),
                };
                let current = current_addrs(ing);
                let desired: Vec<IngressLoadBalancerIngress> = if served.contains(&key) {
                    addresses.clone()
                } else if current.iter().any(|a| ours.contains(a))
                    && !crate::translate::claimed_by_another(
                        ing,
                        &inputs.ingress_classes,
                        &self.class.0,
                        &self.class.1,
                    )
                {
                    // Not served (every rule rejected, its class removed or undefined): our
                    // address is no longer true of it.
                    Vec::new()
                } else {
                    // Another controller's (it writes its status), or not carrying our
                    // address: someone else's business.
                    continue;
                };
                let desired_addrs: Vec<Addr> = desired
                    .iter()
                    .map(|a| (a.ip.clone(), a.hostname.clone()))
                    .collect();
                if current == desired_addrs {
                    report.unchanged += 1;
                    continue;
                }
                let status = json!({"loadBalancer": {"ingress": desired}});
                match self.apply_ingress(ing, status).await {
                    Ok(Applied::Unchanged) => report.unchanged += 1,
                    Ok(Applied::Deferred) => report.deferred += 1,
                    Ok(Applied::Written) if desired.is_empty() => report.ingresses_cleared += 1,
                    Ok(Applied::Written) => report.ingresses_written += 1,
                    Err(e) => {
                        report.failed += 1;
                        tracing::warn!(error = %e, "Ingress status write failed");
                    }
                }
            }
        }
        let now = Timestamp::now();
        for policy in &inputs.rate_limit_policies {
            if self.targets_anothers(policy, inputs) {
                // Attached to another controller's Ingress: that controller (another portico
                // with its own class, say) reports on it; two writers would flip the condition.
                continue;
            }
            let mut desired = accepted_condition(policy, diagnostics, now);
            let key: ObjKey = (
                "RateLimitPolicy",
                policy.namespace().unwrap_or_default(),
                policy.name_any(),
            );
            if let Some(t) = self.pending_transition(&key, policy, &desired.status) {
                desired.last_transition_time = Some(t);
            }
            // Only our condition: the list is keyed by type (the CRD's list-map), so server-side
            // apply leaves other writers' conditions alone, and they are no reason to write.
            let current = policy
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == desired.type_));
            if current == Some(&desired) {
                report.unchanged += 1;
                continue;
            }
            let status = json!({"conditions": [desired]});
            match self.apply_policy(policy, status).await {
                Ok(Applied::Unchanged) => report.unchanged += 1,
                Ok(Applied::Deferred) => report.deferred += 1,
                Ok(Applied::Written) => report.policies_written += 1,
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!(error = %e, "RateLimitPolicy status write failed");
                }
            }
        }
        Ok(report)
    }

    /// The policy names an Ingress of its namespace that another controller claims
    /// ([`crate::translate::claimed_by_another`]).
    fn targets_anothers(&self, policy: &RateLimitPolicy, inputs: &Inputs) -> bool {
        let ns = policy.namespace().unwrap_or_default();
        let target = &policy.spec.target_ref;
        target.kind == "Ingress"
            && target.namespace.as_deref().is_none_or(|n| n == ns)
            && inputs.ingresses.iter().any(|ing| {
                ing.namespace().as_deref() == Some(ns.as_str())
                    && ing.name_any() == target.name
                    && crate::translate::claimed_by_another(
                        ing,
                        &inputs.ingress_classes,
                        &self.class.0,
                        &self.class.1,
                    )
            })
    }

    /// Forget the writes and refusals of objects that are gone. Each object present has at
    /// most one entry, so only caches larger than the inputs can hold any: then they are swept
    /// (a leader through many short-lived Ingresses, preview environments, would otherwise
    /// keep an entry per name ever written).
    fn forget_deleted(&mut self, inputs: &Inputs) {
        let present = inputs.ingresses.len() + inputs.rate_limit_policies.len();
        if self.written.len() <= present && self.failed.len() <= present {
            return;
        }
        let keys: std::collections::HashSet<(&str, &str, &str)> = inputs
            .ingresses
            .iter()
            .map(|i| ("Ingress", &i.metadata))
            .chain(
                inputs
                    .rate_limit_policies
                    .iter()
                    .map(|p| ("RateLimitPolicy", &p.metadata)),
            )
            .map(|(kind, m)| {
                (
                    kind,
                    m.namespace.as_deref().unwrap_or_default(),
                    m.name.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        let kept = |k: &ObjKey| keys.contains(&(k.0, k.1.as_str(), k.2.as_str()));
        self.written.retain(|k, _| kept(k));
        self.failed.retain(|k, _| kept(k));
    }

    /// The `lastTransitionTime` of our last write of `key`'s condition (refused, or sent and not
    /// seen back yet) when it made the same transition to `status` that the object does not
    /// show: the transition happened then. A fresh time on every sync would make each one a
    /// different status, so a refused write would be retried every second instead of backing
    /// off, and a write the watch has not echoed yet would be sent again.
    fn pending_transition(
        &self,
        key: &ObjKey,
        policy: &RateLimitPolicy,
        status: &str,
    ) -> Option<String> {
        let shown = policy
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_ACCEPTED))
            .is_some_and(|c| c.status == status);
        if shown {
            return None;
        }
        let sent = match self.failed.get(key) {
            Some(f) => &f.status,
            None => &self.written.get(key)?.1,
        };
        let condition = sent.pointer("/conditions/0")?;
        if condition.get("status")?.as_str()? != status {
            return None;
        }
        Some(condition.get("lastTransitionTime")?.as_str()?.to_string())
    }

    /// Whether the same write to `key` failed and its retry is not due yet (a different
    /// status is sent at once).
    fn backing_off(&self, key: &ObjKey, status: &Value) -> bool {
        self.failed
            .get(key)
            .is_some_and(|f| f.status == *status && f.retry_at > Instant::now())
    }

    /// Whether a write of `status` over `rv` is a repeat of our last one.
    fn repeat(&self, key: &ObjKey, rv: &Option<String>, status: &Value) -> bool {
        self.written
            .get(key)
            .is_some_and(|(seen_rv, written)| seen_rv == rv && written == status)
    }

    async fn apply_ingress(&mut self, ing: &Ingress, status: Value) -> Result<Applied> {
        let ns = ing.namespace().unwrap_or_default();
        let name = ing.name_any();
        let key: ObjKey = ("Ingress", ns.clone(), name.clone());
        let rv = ing.resource_version();
        if self.repeat(&key, &rv, &status) {
            return Ok(Applied::Unchanged);
        }
        if self.backing_off(&key, &status) {
            return Ok(Applied::Deferred);
        }
        let patch = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {"name": name, "namespace": ns},
            "status": status,
        });
        let api: Api<Ingress> = Api::namespaced(self.client.clone(), &ns);
        self.apply(&api, key, rv, status, patch).await
    }

    async fn apply_policy(&mut self, policy: &RateLimitPolicy, status: Value) -> Result<Applied> {
        let ns = policy.namespace().unwrap_or_default();
        let name = policy.name_any();
        let key: ObjKey = ("RateLimitPolicy", ns.clone(), name.clone());
        let rv = policy.resource_version();
        if self.repeat(&key, &rv, &status) {
            return Ok(Applied::Unchanged);
        }
        if self.backing_off(&key, &status) {
            return Ok(Applied::Deferred);
        }
        let patch = json!({
            "apiVersion": "portico.dev/v1alpha1",
            "kind": "RateLimitPolicy",
            "metadata": {"name": name, "namespace": ns},
            "status": status,
        });
        let api: Api<RateLimitPolicy> = Api::namespaced(self.client.clone(), &ns);
        self.apply(&api, key, rv, status, patch).await
    }

    async fn apply<K>(
        &mut self,
        api: &Api<K>,
        key: ObjKey,
        rv: Option<String>,
        status: Value,
        patch: Value,
    ) -> Result<Applied>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&key.2, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {
                self.failed.remove(&key);
                self.written.insert(key, (rv, status));
                Ok(Applied::Written)
            }
            // Deleted since we saw it: nothing to write.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.failed.remove(&key);
                self.written.remove(&key);
                Ok(Applied::Unchanged)
            }
            Err(source) => {
                let failures = self
                    .failed
                    .get(&key)
                    .filter(|f| f.status == status)
                    .map_or(1, |f| f.failures.saturating_add(1));
                let delay = WRITE_RETRY_BASE
                    .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
                    .min(WRITE_RETRY_MAX);
                self.failed.insert(
                    key.clone(),
                    FailedWrite {
                        status,
                        failures,
                        retry_at: Instant::now() + delay,
                    },
                );
                Err(StatusError::Write {
                    kind: key.0,
                    namespace: key.1,
                    name: key.2,
                    source,
                })
            }
        }
    }
}

/// What [`run`] syncs: the inputs of a build and its results, exactly what the rebuild loop
/// hands out after every build ([`crate::rebuild::Rebuilder::built`]).
pub type StatusView = crate::rebuild::Built;

/// Syncs status on every new [`StatusView`], at once on becoming leader, and every `resync`
/// while `leader` is true, until `shutdown`.
pub async fn run<F>(
    mut writer: StatusWriter,
    mut leader: watch::Receiver<bool>,
    mut views: watch::Receiver<Arc<StatusView>>,
    resync: Duration,
    shutdown: F,
) where
    F: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    loop {
        // Every wake-up below (new view, leadership change, resync tick) is a reason to sync.
        if *leader.borrow_and_update() {
            let view = views.borrow_and_update().clone();
            // Losing the Lease mid-sync abandons the rest of it (and the write in flight), as
            // client-go cancels a leader's work when it stops leading: a sync can take many
            // API round trips, and the new leader may be writing already.
            let outcome = tokio::select! {
                r = writer.sync(&view.inputs, &view.snapshot, &view.diagnostics) => Some(r),
                _ = leader.wait_for(|l| !*l) => None,
            };
            match outcome {
                None => {
                    tracing::info!("stopped leading during a status sync; abandoned the rest");
                    writer.reset();
                }
                Some(Ok(r)) if r.failed > 0 => {
                    tracing::warn!(
                        failed = r.failed,
                        "some status writes failed; each is retried with backoff"
                    );
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "status sync failed"),
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            r = leader.changed() => {
                if r.is_err() {
                    return;
                }
                if !*leader.borrow() {
                    writer.reset();
                }
            }
            r = views.changed() => {
                if r.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(resync) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RateLimitPolicyStatus;

    /// Through the compact form, as the stores hold it.
    fn service(v: Value) -> Svc {
        let svc: Service = serde_json::from_value(v).expect("service parses");
        Svc::from(svc)
    }

    fn addrs(list: &[IngressLoadBalancerIngress]) -> Vec<Addr> {
        list.iter()
            .map(|a| (a.ip.clone(), a.hostname.clone()))
            .collect()
    }

    #[test]
    fn service_address_preference() {
        let full = service(json!({
            "metadata": {"name": "edge"},
            "spec": {"clusterIP": "10.96.0.1", "externalIPs": ["192.0.2.1"]},
            "status": {"loadBalancer": {"ingress": [{"hostname": "lb.example"}]}}
        }));
        assert_eq!(
            addrs(&service_addresses(&full)),
            vec![(None, Some("lb.example".into()))]
        );
        let external = service(json!({
            "metadata": {"name": "edge"},
            "spec": {"clusterIP": "10.96.0.1", "externalIPs": ["192.0.2.2", "192.0.2.1"]}
        }));
        assert_eq!(
            addrs(&service_addresses(&external)),
            vec![
                (Some("192.0.2.1".into()), None),
                (Some("192.0.2.2".into()), None)
            ]
        );
        let cluster =
            service(json!({"metadata": {"name": "edge"}, "spec": {"clusterIP": "10.96.0.1"}}));
        assert_eq!(
            addrs(&service_addresses(&cluster)),
            vec![(Some("10.96.0.1".into()), None)]
        );
        let headless =
            service(json!({"metadata": {"name": "edge"}, "spec": {"clusterIP": "None"}}));
        assert!(service_addresses(&headless).is_empty());

        // type LoadBalancer: the load balancer's addresses and the external IPs, never the
        // cluster IP (a pending load balancer has nothing to publish yet).
        let lb = service(json!({
            "metadata": {"name": "edge"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.1", "externalIPs": ["192.0.2.1"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
        }));
        assert_eq!(
            addrs(&service_addresses(&lb)),
            vec![
                (Some("192.0.2.1".into()), None),
                (Some("203.0.113.7".into()), None)
            ]
        );
        let pending = service(json!({
            "metadata": {"name": "edge"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.1"},
            "status": {"loadBalancer": {}}
        }));
        assert!(service_addresses(&pending).is_empty());
        let node_port = service(json!({
            "metadata": {"name": "edge"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.1"}
        }));
        assert_eq!(
            addrs(&service_addresses(&node_port)),
            vec![(Some("10.96.0.1".into()), None)]
        );
    }

    #[test]
    fn publish_flags() {
        let svc = ("ns".to_string(), "edge".to_string());
        assert_eq!(
            PublishAddress::from_flags(&[" 10.0.0.1 ".into()], Some(&svc)),
            PublishAddress::Static(vec!["10.0.0.1".into()])
        );
        assert_eq!(
            PublishAddress::from_flags(&[], Some(&svc)),
            PublishAddress::Service {
                namespace: "ns".into(),
                name: "edge".into()
            }
        );
        assert_eq!(PublishAddress::from_flags(&[], None), PublishAddress::None);
        assert_eq!(
            addr_of_text("::1"),
            (Some("::1".into()), None),
            "IPv6 is an ip"
        );
        assert_eq!(addr_of_text("a.example"), (None, Some("a.example".into())));
    }

    fn policy(generation: i64, status: Option<Condition>) -> RateLimitPolicy {
        let mut p: RateLimitPolicy = serde_json::from_value(json!({
            "apiVersion": "portico.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": "p", "namespace": "ns", "generation": generation},
            "spec": {"targetRef": {"kind": "Ingress", "name": "shop"}, "maxInFlight": 5}
        }))
        .expect("policy parses");
        p.status = status.map(|c| RateLimitPolicyStatus {
            conditions: vec![c],
        });
        p
    }

    fn error(reason: &str, message: &str) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            kind: "RateLimitPolicy".into(),
            namespace: "ns".into(),
            name: "p".into(),
            uid: String::new(),
            reason: reason.into(),
            message: message.into(),
        }
    }

    #[test]
    fn accepted_condition_follows_errors_and_keeps_transition_time() {
        let now = Timestamp::from_second(1_700_000_000).expect("ts");
        let c = accepted_condition(&policy(3, None), &[], now);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", REASON_ACCEPTED)
        );
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(
            c.last_transition_time.as_deref(),
            Some("2023-11-14T22:13:20Z")
        );

        // Errors on other objects do not count; two errors on ours: first reason, both messages.
        let other = Diagnostic {
            name: "q".into(),
            ..error("TargetNotFound", "x")
        };
        let diags = [
            error("InvalidPeriod", "bad period"),
            error("TargetNotFound", "no target"),
            other,
        ];
        let earlier = Condition {
            last_transition_time: Some("2020-01-01T00:00:00Z".into()),
            ..c.clone()
        };
        let f = accepted_condition(&policy(4, Some(earlier.clone())), &diags, now);
        assert_eq!(
            (f.status.as_str(), f.reason.as_str()),
            ("False", "InvalidPeriod")
        );
        assert_eq!(f.message, "bad period; no target");
        assert_eq!(
            f.last_transition_time.as_deref(),
            Some("2023-11-14T22:13:20Z")
        );

        // Same status as before: the transition time is kept.
        let t = accepted_condition(&policy(4, Some(earlier)), &[], now);
        assert_eq!(
            t.last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
    }

    #[test]
    fn served_ingresses_include_the_default_route() {
        use crate::model::{HostRoutes, PathKind, Route, RouteTarget};
        let route = |name: &str| {
            Arc::new(Route {
                kind: PathKind::Prefix,
                path: "/".into(),
                ingress: IngressRef {
                    namespace: "ns".into(),
                    name: name.into(),
                },
                target: RouteTarget::Unavailable {
                    reason: "test".into(),
                },
                policy: Arc::default(),
            })
        };
        let mut hosts = crate::model::HostTable::default();
        hosts
            .exact
            .insert("a.example".into(), HostRoutes::new(vec![route("a")]));
        hosts.catch_all = Some(HostRoutes::new(vec![route("b")]));
        hosts.default_route = Some(route("c"));
        let snap = Snapshot {
            hosts: Arc::new(hosts),
            ..Snapshot::default()
        };
        let names: Vec<String> = served_ingresses(&snap)
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
