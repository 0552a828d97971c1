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
    shortname = "rlp",
    derive = "PartialEq",
    doc = "RateLimitPolicy: a token-bucket rate limit and/or a concurrency cap on the routes of one Ingress",
    // Raw JSON form: clippy's `duplicated_attributes` misreads the repeated `type_ = "string"`
    // of the structured form as duplicate attributes.
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Requests","type":"integer","jsonPath":".spec.limit.requests"}"#,
    printcolumn = r#"{"name":"Period","type":"string","jsonPath":".spec.limit.period"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".spec.key.type"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
// Server-side CEL (Kubernetes ≥ 1.25) for the cross-field rule of brief §4.5; translate checks
// it too, so the file provider and older clusters get the same answer as a Diagnostic.
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.limit) || has(self.maxInFlight)",
    "message": "at least one of limit and maxInFlight is required"
}]))]
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
    #[schemars(range(min = 1, max = 4294967295_i64))]
    pub max_in_flight: Option<i64>,
}

/// Policy-attachment target reference. `kind` is deliberately a free string, not an enum: a
/// wrong kind must reach translate, which answers it with Accepted=False and a reason, instead
/// of the API server refusing the object without a status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TargetRef {
    /// Kind of the target; only `Ingress` is supported.
    pub kind: String,
    /// Name of the target, in the policy's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Only the policy's own namespace is supported; any other is refused (Accepted=False)
    /// rather than pruned by the API server and the policy silently applied to a same-named
    /// Ingress of the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Token-bucket parameters.
///
/// The counts are `i64` although the schema bounds them to `u32`: a value the API server let
/// through anyway (an object stored before the bound, a float it accepted as integral) must reach
/// translate as one invalid policy, not fail the deserialisation of the whole list and with it
/// the controller's first sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(self.period) > duration('0s') && duration(self.period) <= duration('8784h')",
    "message": "limit.period must be more than 0 and at most 8784h (366 days)"
}]))]
pub struct Limit {
    /// Tokens added per `period` (the sustained rate).
    #[schemars(range(min = 1, max = 4294967295_i64))]
    pub requests: i64,
    /// Duration such as `1m`, `30s`, `1h30m`, `500ms`; more than 0, at most 8784h.
    #[schemars(pattern(r"^([0-9]+(ms|s|m|h))+$"), length(max = 64))]
    pub period: String,
    /// Bucket capacity: requests that may arrive at once (default `requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4294967295_i64))]
    pub burst: Option<i64>,
}

/// Bucket key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.type != 'Header' || (has(self.name) && self.name != '')",
    "message": "key.name is required when type is Header"
}]))]
pub struct Key {
    #[serde(rename = "type")]
    pub key_type: KeyType,
    /// Header name, for `type: Header` (an HTTP field name: a token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[-!#$%&'*+.^_`|~0-9A-Za-z]+$"), length(max = 256))]
    pub name: Option<String>,
}

/// Kinds of bucket key: the client address (after `--trusted-proxies`), a request header, or
/// one bucket for everyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum KeyType {
    ClientIP,
    Header,
    Global,
}

/// Status written by the elected controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RateLimitPolicyStatus {
    /// Keyed by `type`, as `metav1.Condition` lists are, so server-side apply merges each
    /// writer's condition instead of replacing the list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
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

/// The CustomResourceDefinition as YAML: what `portico crd` prints and `crds/` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = RateLimitPolicy::crd();
    match serde_saphyr::to_string(&crd) {
        Ok(body) => format!("# Generated by `portico crd`; do not edit by hand.\n---\n{body}"),
        // Serialising a derived CRD cannot fail; an empty document would fail the drift test.
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::Value;

    fn crd() -> Value {
        serde_json::to_value(RateLimitPolicy::crd()).expect("crd as json")
    }

    fn spec_schema(crd: &Value) -> &Value {
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    }

    #[test]
    fn names_scope_and_status_subresource() {
        let crd = crd();
        assert_eq!(crd["metadata"]["name"], "ratelimitpolicies.portico.dev");
        assert_eq!(crd["spec"]["group"], "portico.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(
            crd["spec"]["names"]["shortNames"],
            serde_json::json!(["rlp"])
        );
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert!(v["subresources"]["status"].is_object());
    }

    #[test]
    fn required_fields_minimums_enum_and_period_pattern() {
        let crd = crd();
        let spec = spec_schema(&crd);
        assert_eq!(spec["required"], serde_json::json!(["targetRef"]));
        let p = &spec["properties"];
        assert_eq!(
            p["targetRef"]["required"],
            serde_json::json!(["kind", "name"])
        );
        // kind stays a free string: a wrong kind must reach translate (Accepted=False).
        assert_eq!(p["targetRef"]["properties"]["kind"]["type"], "string");
        assert!(p["targetRef"]["properties"]["kind"]["enum"].is_null());
        let limit = &p["limit"];
        assert_eq!(limit["required"], serde_json::json!(["period", "requests"]));
        for field in [
            &limit["properties"]["requests"],
            &limit["properties"]["burst"],
            &p["maxInFlight"],
        ] {
            assert_eq!(field["minimum"].as_f64(), Some(1.0), "{field}");
        }
        assert_eq!(
            limit["properties"]["period"]["pattern"],
            "^([0-9]+(ms|s|m|h))+$"
        );
        assert_eq!(
            p["key"]["properties"]["type"]["enum"],
            serde_json::json!(["ClientIP", "Header", "Global"])
        );
        assert_eq!(p["key"]["required"], serde_json::json!(["type"]));
    }

    #[test]
    fn cel_rules_for_limit_or_max_in_flight_and_header_name() {
        let crd = crd();
        let spec = spec_schema(&crd);
        let rule = |v: &Value| v["x-kubernetes-validations"][0]["rule"].clone();
        assert_eq!(rule(spec), "has(self.limit) || has(self.maxInFlight)");
        assert_eq!(
            rule(&spec["properties"]["key"]),
            "self.type != 'Header' || (has(self.name) && self.name != '')"
        );
        assert_eq!(
            rule(&spec["properties"]["limit"]),
            "duration(self.period) > duration('0s') && duration(self.period) <= duration('8784h')"
        );
    }

    #[test]
    fn printer_columns_for_kubectl_get_rlp() {
        let crd = crd();
        let cols = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .expect("columns")
            .clone();
        let got: Vec<(String, String, String)> = cols
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or_default().to_string(),
                    c["type"].as_str().unwrap_or_default().to_string(),
                    c["jsonPath"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let want = [
            ("Target", "string", ".spec.targetRef.name"),
            ("Requests", "integer", ".spec.limit.requests"),
            ("Period", "string", ".spec.limit.period"),
            ("Key", "string", ".spec.key.type"),
            (
                "Accepted",
                "string",
                ".status.conditions[?(@.type==\"Accepted\")].status",
            ),
            ("Age", "date", ".metadata.creationTimestamp"),
        ];
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        assert_eq!(got, want);
    }
}
