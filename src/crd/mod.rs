//! The `RateLimitPolicy` custom resource (`portico.dev/v1alpha1`, namespaced), brief §4.5.
//!
//! Owns: the Rust type, its OpenAPI schema (schemars) and the CRD YAML `portico crd` prints.
//! May import: kube derive, schemars, serde. Enforcement lives in the proxy; validation of
//! values into policy parameters lives in translate.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of a RateLimitPolicy: a token bucket and/or a concurrency cap on one Ingress.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    namespaced,
    status = "RateLimitPolicyStatus",
    shortname = "rlp"
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    /// The object the policy attaches to, in the same namespace.
    pub target_ref: TargetRef,
    /// Token bucket: `requests` per `period`, capacity `burst` (default `requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    /// What a bucket is keyed by (default ClientIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Key>,
    /// Cap on concurrent requests per replica; excess → 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

/// Policy-attachment target reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TargetRef {
    pub kind: String,
    pub name: String,
}

/// Token-bucket parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Limit {
    pub requests: u32,
    /// Duration such as `1m`, `30s`, `1h30m`, `500ms`.
    pub period: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Bucket key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Key {
    #[serde(rename = "type")]
    pub key_type: KeyType,
    /// Header name, for `type: Header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Kinds of bucket key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum KeyType {
    ClientIP,
    Header,
    Global,
}

/// Status written by the elected controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RateLimitPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A status condition (subset of `metav1.Condition`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}
