//! RateLimitPolicy validation and assembly (brief §4.5): a policy whose target is missing or of
//! the wrong kind, or whose values make no sense, becomes an Error diagnostic (so its status is
//! Accepted=False and `portico check` fails) and is not applied; every valid one becomes a
//! [`RateLimit`] on the routes of its target Ingress. Enforcement is the proxy's.
//!
//! Owns: the validity rules and the policy → `model::RateLimit` mapping. Must not import
//! tokio, hyper or the filesystem.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::crd::{KeyType, RateLimitPolicy};
use crate::model::duration::parse_duration;
use crate::model::{IngressRef, PolicyRef, RateLimit, RateLimitKey, TokenBucketSpec};

use super::index::{self, FastMap, FastSet};
use super::{Diags, Inputs, ObjRef};

const KIND: &str = "RateLimitPolicy";

/// Valid policies per target Ingress, each list in policy name order (all apply).
/// Looked up, never iterated (see [`FastMap`]).
pub(super) type Limits = FastMap<IngressRef, Arc<[RateLimit]>>;

/// Check every policy (diagnostics go to `diags`) and map the valid ones to their target
/// Ingress. Policies with the same namespace/name (two manifest files) are reduced to one,
/// chosen by content so the result does not depend on input order.
pub(super) fn build(inputs: &Inputs, diags: &mut Diags) -> Limits {
    // Most clusters have no policy: skip indexing every Ingress for nothing.
    if inputs.rate_limit_policies.is_empty() {
        return Limits::default();
    }
    let ingresses: FastSet<(&str, &str)> = inputs
        .ingresses
        .iter()
        .map(|i| (index::namespace(&i.metadata), index::name(&i.metadata)))
        .collect();
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
        if !check(policy, &obj, &ingresses, diags) {
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
            requests: l.requests,
            period: parse_duration(&l.period).unwrap_or_default(),
            burst: l.burst.unwrap_or(l.requests),
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
        max_in_flight: spec.max_in_flight,
    }
}

/// Diagnostics for one policy; true when it has no errors and so is applied.
fn check(
    policy: &RateLimitPolicy,
    obj: &ObjRef<'_>,
    ingresses: &FastSet<(&str, &str)>,
    diags: &mut Diags,
) -> bool {
    let before = diags.0.len();
    let namespace = obj.namespace;
    let spec = &policy.spec;
    let target = &spec.target_ref;
    if target.kind != "Ingress" {
        diags.error(
            KIND,
            obj,
            "InvalidTargetKind",
            format!(
                "targetRef.kind {:?} is not supported; use Ingress",
                target.kind
            ),
        );
    } else if !ingresses.contains(&(namespace, target.name.as_str())) {
        diags.error(
            KIND,
            obj,
            "TargetNotFound",
            format!("Ingress {namespace}/{} does not exist", target.name),
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
        if limit.requests < 1 {
            out.push("limit.requests must be at least 1".to_string());
        }
        match parse_duration(&limit.period) {
            Some(d) if !d.is_zero() => {}
            _ => out.push(format!(
                "limit.period {:?} is not a positive duration such as 1m, 30s or 1h30m",
                limit.period
            )),
        }
        if limit.burst == Some(0) {
            out.push("limit.burst must be at least 1".to_string());
        }
    }
    if spec.max_in_flight == Some(0) {
        out.push("maxInFlight must be at least 1".to_string());
    }
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
                },
                limit,
                key,
                max_in_flight: None,
            },
        );
        p.metadata.namespace = Some("shop".into());
        Arc::new(p)
    }

    fn limit(requests: u32, period: &str, burst: Option<u32>) -> Option<Limit> {
        Some(Limit {
            requests,
            period: period.into(),
            burst,
        })
    }

    fn reasons(inputs: &Inputs) -> Vec<(String, String)> {
        let mut d = Diags::default();
        build(inputs, &mut d);
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
}
