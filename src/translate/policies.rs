//! RateLimitPolicy validation and assembly (brief §4.5): a policy whose target is missing, of
//! the wrong kind or an Ingress of another class, or whose values make no sense, becomes an Error diagnostic (so its status is
//! Accepted=False and `portico check` fails) and is not applied; every valid one becomes a
//! [`RateLimit`] on the routes of its target Ingress. Enforcement is the proxy's.
//!
//! Owns: the validity rules and the policy → `model::RateLimit` mapping. Must not import
//! tokio, hyper or the filesystem.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use crate::crd::{KeyType, RateLimitPolicy};
use crate::model::duration::parse_duration;
use crate::model::{IngressRef, PolicyRef, RateLimit, RateLimitKey, TokenBucketSpec};

use super::index::{self, FastMap, FastSet};
use super::{Diags, Inputs, ObjRef, Options};

const KIND: &str = "RateLimitPolicy";

/// Valid policies per target Ingress, each list in policy name order (all apply).
/// Looked up, never iterated (see [`FastMap`]).
pub(super) type Limits = FastMap<IngressRef, Arc<[RateLimit]>>;

/// Check every policy (diagnostics go to `diags`) and map the valid ones to their target
/// Ingress, which must be one of `ours` (the Ingresses of our class). Policies with the same
/// namespace/name (two manifest files) are reduced to one, chosen by content so the result
/// does not depend on input order.
/// A policy on an Ingress another controller claims ([`super::class::claimed_by_another`]) is
/// that controller's: not applied and not reported.
pub(super) fn build(
    inputs: &Inputs,
    ours: &[&Ingress],
    opts: &Options,
    diags: &mut Diags,
) -> Limits {
    // Most clusters have no policy: skip indexing every Ingress for nothing.
    if inputs.rate_limit_policies.is_empty() {
        return Limits::default();
    }
    fn key(i: &Ingress) -> (&str, &str) {
        (index::namespace(&i.metadata), index::name(&i.metadata))
    }
    let ingresses = Targets {
        all: inputs.ingresses.iter().map(|i| (key(i), &**i)).collect(),
        ours: ours.iter().map(|i| key(i)).collect(),
        classes: &inputs.ingress_classes,
        opts,
    };
    let mut unique: BTreeMap<(&str, &str), (&RateLimitPolicy, String)> = BTreeMap::new();
    for policy in &inputs.rate_limit_policies {
        let id = (
            index::namespace(&policy.metadata),
            index::name(&policy.metadata),
        );
        let print = serde_json::to_string(&**policy).unwrap_or_default();
        match unique.get(&id) {
            Some((_, kept)) if *kept <= print => {
                if *kept != print {
                    duplicate(diags, id);
                }
            }
            Some(_) => {
                duplicate(diags, id);
                unique.insert(id, (policy, print));
            }
            None => {
                unique.insert(id, (policy, print));
            }
        }
    }
    // BTreeMap order is (namespace, name): each target's list comes out in name order.
    let mut out: BTreeMap<IngressRef, Vec<RateLimit>> = BTreeMap::new();
    for ((namespace, name), (policy, _)) in unique {
        let obj = ObjRef {
            namespace,
            name,
            uid: policy.metadata.uid.as_deref().unwrap_or_default(),
        };
        if theirs(policy, namespace, &ingresses) || !check(policy, &obj, &ingresses, diags) {
            continue;
        }
        let target = IngressRef {
            namespace: Arc::from(namespace),
            name: Arc::from(policy.spec.target_ref.name.as_str()),
        };
        out.entry(target)
            .or_default()
            .push(rate_limit(policy, namespace, name));
    }
    out.into_iter().map(|(k, v)| (k, Arc::from(v))).collect()
}

/// The Ingresses a policy may name, by (namespace, name).
struct Targets<'a> {
    all: FastMap<(&'a str, &'a str), &'a Ingress>,
    ours: FastSet<(&'a str, &'a str)>,
    classes: &'a [Arc<IngressClass>],
    opts: &'a Options,
}

fn duplicate(diags: &mut Diags, (namespace, name): (&str, &str)) {
    diags.warn(
        KIND,
        // Two objects of one name exist only in manifest files, which carry no uid.
        &ObjRef {
            namespace,
            name,
            uid: "",
        },
        "DuplicateObject",
        "several different RateLimitPolicy objects share this name; one is used",
    );
}

/// The proxy's view of a valid policy.
fn rate_limit(policy: &RateLimitPolicy, namespace: &str, name: &str) -> RateLimit {
    let spec = &policy.spec;
    RateLimit {
        policy: PolicyRef {
            namespace: Arc::from(namespace),
            name: Arc::from(name),
            uid: Arc::from(policy.metadata.uid.as_deref().unwrap_or_default()),
        },
        bucket: spec.limit.as_ref().map(|l| TokenBucketSpec {
            requests: count(l.requests),
            period: parse_duration(&l.period).unwrap_or_default(),
            burst: count(l.burst.unwrap_or(l.requests)),
        }),
        key: match &spec.key {
            None => RateLimitKey::ClientIp,
            Some(k) => match k.key_type {
                KeyType::ClientIP => RateLimitKey::ClientIp,
                KeyType::Global => RateLimitKey::Global,
                // Header names are case-insensitive (RFC 9110 §5.1); `http` looks up lower case.
                KeyType::Header => {
                    RateLimitKey::Header(k.name.as_deref().unwrap_or_default().to_ascii_lowercase())
                }
            },
        },
        max_in_flight: spec.max_in_flight.map(count),
    }
}

/// A count [`value_problems`] found in range, as the proxy's `u32`.
fn count(n: i64) -> u32 {
    u32::try_from(n.clamp(1, i64::from(u32::MAX))).unwrap_or(u32::MAX)
}

/// The longest `limit.period`: a policy's window is in the headers as whole seconds and its
/// refill is computed in nanoseconds, so a period beyond any sensible quota is refused rather than
/// silently clamped.
const MAX_PERIOD: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

/// "must be between 1 and 4294967295" when `n` is not a valid count.
fn count_problem(field: &str, n: i64) -> Option<String> {
    (!(1..=i64::from(u32::MAX)).contains(&n))
        .then(|| format!("{field} must be between 1 and {} (got {n})", u32::MAX))
}

/// The policy names an Ingress of its namespace that another controller claims.
fn theirs(policy: &RateLimitPolicy, namespace: &str, ingresses: &Targets<'_>) -> bool {
    let target = &policy.spec.target_ref;
    target.kind == "Ingress"
        && target.namespace.as_deref().is_none_or(|n| n == namespace)
        && ingresses
            .all
            .get(&(namespace, target.name.as_str()))
            .is_some_and(|ing| {
                super::class::claimed_by_another(
                    ing,
                    ingresses.classes,
                    &ingresses.opts.ingress_class,
                    &ingresses.opts.controller_name,
                )
            })
}

/// Diagnostics for one policy; true when it has no errors and so is applied.
fn check(
    policy: &RateLimitPolicy,
    obj: &ObjRef<'_>,
    ingresses: &Targets<'_>,
    diags: &mut Diags,
) -> bool {
    let before = diags.0.len();
    let namespace = obj.namespace;
    let spec = &policy.spec;
    let target = &spec.target_ref;
    if let Some(other) = target.namespace.as_deref().filter(|n| *n != namespace) {
        diags.error(
            KIND,
            obj,
            "InvalidTarget",
            format!(
                "targetRef.namespace {other:?} is not supported: a policy applies to an Ingress \
                 of its own namespace ({namespace:?})"
            ),
        );
    } else if target.kind != "Ingress" {
        diags.error(
            KIND,
            obj,
            "InvalidTargetKind",
            format!(
                "targetRef.kind {:?} is not supported; use Ingress",
                target.kind
            ),
        );
    } else if !ingresses
        .all
        .contains_key(&(namespace, target.name.as_str()))
    {
        diags.error(
            KIND,
            obj,
            "TargetNotFound",
            format!("Ingress {namespace}/{} does not exist", target.name),
        );
    } else if !ingresses.ours.contains(&(namespace, target.name.as_str())) {
        diags.error(
            KIND,
            obj,
            "TargetNotServed",
            format!(
                "Ingress {namespace}/{} is not served by this controller (no ingress class of \
                 ours, or an ingress-nginx canary); the policy applies to nothing",
                target.name
            ),
        );
    }
    for problem in value_problems(spec) {
        diags.error(KIND, obj, "InvalidPolicy", problem);
    }
    // Only errors are pushed above.
    diags.0.len() == before
}

/// Nonsensical values, each as a message.
fn value_problems(spec: &crate::crd::RateLimitPolicySpec) -> Vec<String> {
    let mut out = Vec::new();
    if spec.limit.is_none() && spec.max_in_flight.is_none() {
        out.push("at least one of limit and maxInFlight is required".to_string());
    }
    if let Some(limit) = &spec.limit {
        out.extend(count_problem("limit.requests", limit.requests));
        match parse_duration(&limit.period) {
            Some(d) if !d.is_zero() && d <= MAX_PERIOD => {}
            Some(d) if !d.is_zero() => out.push(format!(
                "limit.period {:?} is longer than the maximum of 8784h (366 days)",
                limit.period
            )),
            _ => out.push(format!(
                "limit.period {:?} is not a positive duration such as 1m, 30s or 1h30m",
                limit.period
            )),
        }
        out.extend(limit.burst.and_then(|b| count_problem("limit.burst", b)));
    }
    out.extend(
        spec.max_in_flight
            .and_then(|n| count_problem("maxInFlight", n)),
    );
    if let Some(key) = &spec.key {
        let named = key
            .name
            .as_deref()
            .is_some_and(|n| !n.is_empty() && http_token(n));
        if key.key_type == crate::crd::KeyType::Header && !named {
            out.push("key.type Header needs a valid header name in key.name".to_string());
        }
    }
    out
}

/// RFC 9110 §5.1 field-name: a token.
fn http_token(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::crd::{Key, KeyType, Limit, RateLimitPolicy, RateLimitPolicySpec, TargetRef};
    use k8s_openapi::api::networking::v1::Ingress;
    use std::sync::Arc;

    fn policy(
        name: &str,
        kind: &str,
        target: &str,
        limit: Option<Limit>,
        key: Option<Key>,
    ) -> Arc<RateLimitPolicy> {
        let mut p = RateLimitPolicy::new(
            name,
            RateLimitPolicySpec {
                target_ref: TargetRef {
                    kind: kind.into(),
                    name: target.into(),
                    namespace: None,
                },
                limit,
                key,
                max_in_flight: None,
            },
        );
        p.metadata.namespace = Some("shop".into());
        Arc::new(p)
    }

    fn limit(requests: i64, period: &str, burst: Option<i64>) -> Option<Limit> {
        Some(Limit {
            requests,
            period: period.into(),
            burst,
        })
    }

    fn reasons(inputs: &Inputs) -> Vec<(String, String)> {
        let mut d = Diags::default();
        let ours: Vec<&Ingress> = inputs.ingresses.iter().map(|i| &**i).collect();
        build(inputs, &ours, &Options::default(), &mut d);
        d.finish().into_iter().map(|d| (d.name, d.reason)).collect()
    }

    #[test]
    fn valid_invalid_and_missing_targets() {
        let mut ing = Ingress::default();
        ing.metadata.name = Some("web".into());
        ing.metadata.namespace = Some("shop".into());
        let inputs = Inputs {
            ingresses: vec![Arc::new(ing)],
            rate_limit_policies: vec![
                policy("ok", "Ingress", "web", limit(100, "1m", Some(20)), None),
                policy("gone", "Ingress", "missing", limit(1, "1s", None), None),
                policy("svc", "Service", "web", limit(1, "1s", None), None),
                policy("zero", "Ingress", "web", limit(0, "1m", Some(0)), None),
                policy("period", "Ingress", "web", limit(1, "soon", None), None),
                policy("empty", "Ingress", "web", None, None),
                policy(
                    "header",
                    "Ingress",
                    "web",
                    limit(1, "1s", None),
                    Some(Key {
                        key_type: KeyType::Header,
                        name: None,
                    }),
                ),
            ],
            ..Inputs::default()
        };
        let got = reasons(&inputs);
        let has = |n: &str, r: &str| got.iter().any(|(a, b)| a == n && b == r);
        assert!(!got.iter().any(|(n, _)| n == "ok"), "{got:?}");
        assert!(has("gone", "TargetNotFound"));
        assert!(has("svc", "InvalidTargetKind"));
        assert!(has("zero", "InvalidPolicy"));
        assert!(has("period", "InvalidPolicy"));
        assert!(has("empty", "InvalidPolicy"));
        assert!(has("header", "InvalidPolicy"));
    }

    /// Counts outside `u32` and periods past a year are refused with the field named, never
    /// clamped into a different policy; the largest valid values pass.
    #[test]
    fn out_of_range_counts_and_periods_are_invalid() {
        let problems = |limit: Option<Limit>, max_in_flight: Option<i64>| {
            let mut spec = policy("p", "Ingress", "web", limit, None).spec.clone();
            spec.max_in_flight = max_in_flight;
            value_problems(&spec)
        };
        let max = i64::from(u32::MAX);
        assert!(problems(limit(max, "8784h", Some(max)), Some(max)).is_empty());
        let got = problems(limit(max + 1, "8785h", Some(-1)), Some(1 << 40));
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[0].starts_with("limit.requests must be between 1 and 4294967295"));
        assert!(got[1].contains("longer than the maximum"), "{got:?}");
        assert!(
            got[2].starts_with("limit.burst must be between 1"),
            "{got:?}"
        );
        assert!(
            got[3].starts_with("maxInFlight must be between 1"),
            "{got:?}"
        );
        assert!(!problems(limit(1, "99999999999999999999h", None), None).is_empty());
    }
}
