//! Parsing of manifest files: multi-document YAML → typed Kubernetes objects.
//!
//! Comment-only and empty documents are skipped, `kind: List` (and any `*List` kind with
//! `items`, as `kubectl get -o yaml` writes) is flattened, kinds portico does not read are
//! ignored, objects without a namespace land in `default`, an object without
//! `metadata.name` fails its document (as the API server refuses it), Secret `data` may wrap
//! its base64 over lines (as Go's decoder, and so `kubectl apply`, accepts), and Secret
//! `stringData` is merged into `data` as the API server would. Fields translate never reads
//! (`managedFields`, the last-applied annotation, Ingress/Service `status`, per-endpoint
//! EndpointSlice `targetRef`/`nodeName`/`zone`/`hints`/`hostname`) are dropped before typing,
//! so the file source does not hold them between rebuilds. Any document that fails to
//! parse fails the whole file, so the caller can keep the file's last good objects. Errors
//! name the document (counting from 1, empty ones not counted) and the object when known, and
//! never quote the file's text (a Secret's data must not reach a log).
//!
//! Owns: text → objects. Pure: must not import tokio, notify or the filesystem (the caller
//! reads the bytes), nor the proxy.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::crd::RateLimitPolicy;
use crate::translate::{Inputs, Slice, Svc};

/// Namespace given to namespaced objects that declare none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// One object portico reads.
// Values are short-lived (parsed, then moved straight into an `Arc` by `extend_objects`), so
// boxing the big variants would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Object {
    Ingress(Ingress),
    IngressClass(IngressClass),
    /// Already in translate's compact form: the file source never holds the k8s-openapi
    /// `Service` past parsing (memory, issue 6).
    Service(Svc),
    /// Likewise for the k8s-openapi `EndpointSlice`.
    EndpointSlice(Slice),
    Secret(Secret),
    RateLimitPolicy(RateLimitPolicy),
}

/// Why a file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("invalid YAML: {0}")]
    Yaml(String),
    /// `at` says where: "document 3", "document 3, item 5 (Service default/b)".
    #[error("{at}: {message}")]
    Document { at: String, message: String },
}

/// What the YAML parser may spend on one file. Files are at most 8 MiB (the scanner's cap),
/// which real manifests fill with about a million nodes; the crate's defaults (1 024
/// documents, 250 000 nodes) refused ordinary large files such as `kubectl get -o yaml` of a
/// few thousand Ingresses. Aliases stay bounded by absolute caps (50 000 aliases, 262 144
/// recorded events), which stop alias bombs; the crate's alias-to-anchor ratio heuristic is
/// off, since one anchor shared by every object of a List is ordinary YAML.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1 << 17;
    budget.max_nodes = 1 << 21;
    budget.max_events = 1 << 22;
    budget.enforce_alias_anchor_ratio = false;
    // What aliases may copy: an alias bomb hits this first. A quarter of the crate's default
    // (a million events took seconds to refuse).
    budget.max_recorded_anchor_events = 1 << 18;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    // The crate's errors would quote the lines around a syntax error: in a Secret, its data.
    options.with_snippet = false;
    options
}

/// Parse the text of one manifest file.
pub fn parse_manifests(text: &str) -> Result<Vec<Object>, ParseError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, yaml_options())
        .map_err(|e| ParseError::Yaml(e.to_string()))?;
    let mut out = Vec::new();
    for (index, doc) in docs.into_iter().enumerate() {
        parse_value(doc, &format!("document {}", index + 1), &mut out)?;
    }
    Ok(out)
}

/// "Kind namespace/name" (or "Kind name") of an untyped object, when it has a name.
fn describe(kind: &str, obj: &serde_json::Map<String, Value>) -> Option<String> {
    let meta = obj.get("metadata")?;
    let name = meta.get("name").and_then(Value::as_str)?;
    Some(match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    })
}

fn parse_value(doc: Value, at: &str, out: &mut Vec<Object>) -> Result<(), ParseError> {
    let plain = |message: String| ParseError::Document {
        at: at.to_string(),
        message,
    };
    let mut obj = match doc {
        Value::Null => return Ok(()),
        Value::Object(map) => map,
        _ => {
            return Err(plain(
                "a document must be a mapping (a Kubernetes object)".into(),
            ));
        }
    };
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind.is_empty() {
        return Err(plain("missing `kind`".into()));
    }
    // `kind: List`, and the typed lists the API returns (`IngressList`, `ServiceList`...),
    // whose items may leave out their kind and apiVersion (the API's own encoding does; they
    // are the list's). Another kind ending in "List" without a sequence of items is not a
    // list, and like any kind portico does not read, it is ignored.
    let typed_list = kind.strip_suffix("List").filter(|k| !k.is_empty());
    if kind == "List" || (typed_list.is_some() && matches!(obj.get("items"), Some(Value::Array(_))))
    {
        let items = match obj.remove("items") {
            Some(Value::Array(items)) => items,
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err(plain("List `items` must be a sequence".into())),
        };
        for (i, mut item) in items.into_iter().enumerate() {
            if let (Some(item_kind), Value::Object(fields)) = (typed_list, &mut item) {
                fields
                    .entry("kind")
                    .or_insert_with(|| Value::String(item_kind.to_string()));
                fields
                    .entry("apiVersion")
                    .or_insert_with(|| Value::String(api_version.clone()));
            }
            parse_value(item, &format!("{at}, item {}", i + 1), out)?;
        }
        return Ok(());
    }
    let named = describe(&kind, &obj);
    let err = |message: String| ParseError::Document {
        at: match &named {
            Some(named) => format!("{at} ({named})"),
            None => at.to_string(),
        },
        message,
    };
    trim(&mut obj, &kind);
    if kind == "Secret" {
        unwrap_base64_lines(&mut obj);
    }
    let value = Value::Object(obj);
    let parsed = match (api_version.as_str(), kind.as_str()) {
        ("networking.k8s.io/v1", "Ingress") => Object::Ingress(typed(value, &kind).map_err(err)?),
        ("networking.k8s.io/v1", "IngressClass") => {
            Object::IngressClass(typed(value, &kind).map_err(err)?)
        }
        ("v1", "Service") => {
            // Defaulted and checked as typed (so `Svc` gets the namespace), then converted.
            let mut svc: Service = typed(value, &kind).map_err(err)?;
            default_namespace(&mut svc.metadata, true).map_err(err)?;
            out.push(Object::Service(Svc::from(svc)));
            return Ok(());
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            // Same as Service.
            let mut slice: EndpointSlice = typed(value, &kind).map_err(err)?;
            default_namespace(&mut slice.metadata, true).map_err(err)?;
            out.push(Object::EndpointSlice(Slice::from(slice)));
            return Ok(());
        }
        ("v1", "Secret") => Object::Secret(merge_string_data(typed(value, &kind).map_err(err)?)),
        ("portico.dev/v1alpha1", "RateLimitPolicy") => {
            Object::RateLimitPolicy(typed(value, &kind).map_err(err)?)
        }
        (_, "Ingress" | "IngressClass" | "EndpointSlice" | "RateLimitPolicy") => {
            return Err(err(format!(
                "unsupported apiVersion {api_version:?} for {kind}"
            )));
        }
        // Other kinds (Deployments, ConfigMaps, Namespaces...) are not portico's business.
        _ => return Ok(()),
    };
    out.push(with_default_namespace(parsed).map_err(err)?);
    Ok(())
}

/// Annotation `kubectl apply` writes with the whole last-applied object (a second copy of it).
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Per-endpoint EndpointSlice fields translate never reads (it reads `addresses` and
/// `conditions`); `kubectl get endpointslices -o yaml` writes them for every pod.
const UNREAD_ENDPOINT_FIELDS: [&str; 6] = [
    "targetRef",
    "nodeName",
    "zone",
    "hints",
    "hostname",
    "deprecatedTopology",
];

/// Drop, before typing, what translate never reads but the file source would otherwise keep
/// for every rebuild (memory, issue 6): `metadata.managedFields` and the last-applied
/// annotation on every kind (manifests saved with `kubectl get -o yaml` carry both), `status`
/// of Ingresses and Services (never an input; other kinds keep theirs), and the per-endpoint
/// [`UNREAD_ENDPOINT_FIELDS`] of EndpointSlices.
fn trim(obj: &mut serde_json::Map<String, Value>, kind: &str) {
    match kind {
        "Ingress" | "Service" => {
            obj.remove("status");
        }
        "EndpointSlice" => {
            if let Some(Value::Array(endpoints)) = obj.get_mut("endpoints") {
                for ep in endpoints.iter_mut().filter_map(Value::as_object_mut) {
                    for field in UNREAD_ENDPOINT_FIELDS {
                        ep.remove(field);
                    }
                }
            }
        }
        _ => {}
    }
    if let Some(Value::Object(meta)) = obj.get_mut("metadata") {
        meta.remove("managedFields");
        if let Some(Value::Object(annotations)) = meta.get_mut("annotations") {
            annotations.remove(LAST_APPLIED_ANNOTATION);
        }
    }
}

/// Secret `data` values with their line breaks removed: base64 wrapped at 76 columns (what
/// `base64` prints) is valid there, since Go's decoder skips `\r` and `\n`.
fn unwrap_base64_lines(obj: &mut serde_json::Map<String, Value>) {
    let Some(Value::Object(data)) = obj.get_mut("data") else {
        return;
    };
    for value in data.values_mut() {
        if let Value::String(s) = value
            && s.contains(['\r', '\n'])
        {
            s.retain(|c| c != '\r' && c != '\n');
        }
    }
}

fn typed<T: DeserializeOwned>(value: Value, kind: &str) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| format!("invalid {kind}: {e}"))
}

fn merge_string_data(mut secret: Secret) -> Secret {
    if let Some(string_data) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        for (k, v) in string_data {
            data.insert(k, ByteString(v.into_bytes()));
        }
    }
    secret
}

/// Defaults the namespace and insists on a name, as the API server would (`kubectl apply`
/// refuses an object without `metadata.name`; `generateName` needs a server to pick one).
fn with_default_namespace(mut obj: Object) -> Result<Object, String> {
    let (meta, namespaced) = match &mut obj {
        Object::Ingress(o) => (&mut o.metadata, true),
        // IngressClass is cluster-scoped.
        Object::IngressClass(o) => (&mut o.metadata, false),
        // Defaulted before conversion (`default_namespace`).
        Object::Service(_) | Object::EndpointSlice(_) => return Ok(obj),
        Object::Secret(o) => (&mut o.metadata, true),
        Object::RateLimitPolicy(o) => (&mut o.metadata, true),
    };
    default_namespace(meta, namespaced)?;
    Ok(obj)
}

/// [`with_default_namespace`] on the metadata of an object still in its k8s-openapi form.
fn default_namespace(meta: &mut ObjectMeta, namespaced: bool) -> Result<(), String> {
    if meta.name.as_deref().is_none_or(str::is_empty) {
        return Err("missing `metadata.name`".into());
    }
    if namespaced && meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
    }
    Ok(())
}

impl Inputs {
    /// Add parsed objects to the inputs.
    pub fn extend_objects(&mut self, objects: impl IntoIterator<Item = Object>) {
        for obj in objects {
            match obj {
                Object::Ingress(o) => self.ingresses.push(Arc::new(o)),
                Object::IngressClass(o) => self.ingress_classes.push(Arc::new(o)),
                Object::Service(o) => self.services.push(Arc::new(o)),
                Object::EndpointSlice(o) => self.endpoint_slices.push(Arc::new(o)),
                Object::Secret(o) => self.secrets.push(Arc::new(o)),
                Object::RateLimitPolicy(o) => self.rate_limit_policies.push(Arc::new(o)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_with_comments_and_other_kinds() {
        let text = "# just a comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n# only comments here\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80, name: http}]\n";
        let objs = parse_manifests(text).expect("parses");
        assert_eq!(objs.len(), 1);
        match &objs[0] {
            Object::Service(s) => assert_eq!((s.namespace(), s.name()), ("default", "web")),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// `tls.crt` of the one Secret `text` holds.
    fn tls_crt_of(text: &str) -> Vec<u8> {
        let objs = parse_manifests(text).expect("parses");
        let Object::Secret(s) = &objs[0] else {
            panic!("not a secret")
        };
        let data = s.data.as_ref().expect("data");
        data.get("tls.crt").expect("tls.crt").0.clone()
    }

    #[test]
    fn string_data_is_merged() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: ns}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: abc\n";
        assert_eq!(tls_crt_of(text), b"abc");
    }

    #[test]
    fn malformed_document_fails_the_file() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: x}\nspec:\n  rules: 5\n";
        assert!(parse_manifests(text).is_err());
        assert!(parse_manifests("key: [unclosed").is_err());
    }

    #[test]
    fn an_object_needs_a_name_and_cluster_scoped_ones_get_no_namespace() {
        let err = parse_manifests("apiVersion: v1\nkind: Service\nmetadata: {namespace: a}\n");
        assert!(
            matches!(&err, Err(ParseError::Document { at, message }) if at == "document 1" && message.contains("metadata.name")),
            "{err:?}"
        );
        let text =
            "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: portico}\n";
        let objs = parse_manifests(text).expect("parses");
        let Object::IngressClass(c) = &objs[0] else {
            panic!("not an IngressClass")
        };
        assert_eq!(c.metadata.namespace, None);
    }

    #[test]
    fn unread_fields_are_dropped() {
        let text = r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{"big": "copy"}'
    portico.dev/load-balance: random
  managedFields:
  - manager: kubectl
    operation: Update
spec:
  defaultBackend: {service: {name: web, port: {number: 80}}}
status:
  loadBalancer:
    ingress: [{ip: 10.0.0.1}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 10.0.0.2}]
"#;
        let objs = parse_manifests(text).expect("parses");
        let Object::Ingress(ing) = &objs[0] else {
            panic!("not an Ingress")
        };
        assert_eq!(ing.metadata.managed_fields, None);
        assert_eq!(ing.status, None);
        let annotations = ing.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            ["portico.dev/load-balance"]
        );
        assert!(
            ing.spec
                .as_ref()
                .is_some_and(|s| s.default_backend.is_some())
        );
        let Object::Service(svc) = &objs[1] else {
            panic!("not a Service")
        };
        // Compact form; the status is trimmed before typing (the file source writes none).
        assert!(svc.load_balancer_ingress().is_empty());
        assert_eq!(svc.ports().len(), 1);

        let text = r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-a
  zone: z1
  hostname: web-0
  targetRef: {kind: Pod, name: web-0, namespace: default, uid: 1234}
  hints: {forZones: [{name: z1}]}
"#;
        let objs = parse_manifests(text).expect("parses");
        let Object::EndpointSlice(slice) = &objs[0] else {
            panic!("not an EndpointSlice")
        };
        // Kept in translate's compact form: the draining endpoint, its Service, its port.
        assert_eq!(
            (slice.namespace(), slice.name(), slice.service()),
            ("default", "web-1", Some("web"))
        );
        assert_eq!(
            slice.endpoints(),
            [crate::translate::SliceEndpoint {
                addr: std::net::Ipv4Addr::new(10, 0, 0, 1).into(),
                ready: false,
            }]
        );
        assert_eq!(
            slice.ports(),
            [crate::translate::SlicePort {
                name: "http".into(),
                port: Some(8080),
            }]
        );
    }

    #[test]
    fn service_is_kept_in_translate_compact_form() {
        let text = r#"apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: shop, labels: {app: grpc}}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.7
  externalIPs: [192.0.2.9]
  selector: {app: grpc}
  ports:
  - {name: grpc, port: 9000, targetPort: 9000, appProtocol: kubernetes.io/h2c}
  - {port: 80}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.org}
"#;
        let objs = parse_manifests(text).expect("parses");
        let [Object::Service(grpc), Object::Service(ext)] = objs.as_slice() else {
            panic!("two Services: {objs:?}")
        };
        assert_eq!((grpc.namespace(), grpc.name()), ("shop", "grpc"));
        assert!(!grpc.is_external_name());
        let ports: Vec<_> = grpc
            .ports()
            .iter()
            .map(|p| (p.name.as_deref(), p.port, p.h2c))
            .collect();
        assert_eq!(ports, [(Some("grpc"), 9000, true), (None, 80, false)]);
        assert_eq!(grpc.cluster_ip(), Some("10.96.0.7"));
        assert_eq!(grpc.external_ips().len(), 1);
        assert_eq!((ext.namespace(), ext.is_external_name()), ("default", true));
    }

    #[test]
    fn endpoint_slice_without_name_fails_its_document() {
        let text = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {namespace: a}\naddressType: IPv4\n";
        let e = parse_manifests(text).expect_err("no name");
        assert!(e.to_string().contains("metadata.name"), "{e}");
    }

    #[test]
    fn list_is_flattened() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b}\n";
        assert_eq!(parse_manifests(text).expect("parses").len(), 2);
        // What `kubectl get ingress,svc -o yaml` of one kind writes.
        let text = "apiVersion: networking.k8s.io/v1\nkind: IngressList\nmetadata: {resourceVersion: \"1\"}\nitems:\n- apiVersion: networking.k8s.io/v1\n  kind: Ingress\n  metadata: {name: a}\n";
        let objs = parse_manifests(text).expect("parses");
        assert!(matches!(objs.as_slice(), [Object::Ingress(_)]), "{objs:?}");
        // The API's own encoding (`kubectl get --raw`): items without kind and apiVersion.
        let text = "apiVersion: v1\nkind: ServiceList\nitems:\n- metadata: {name: a}\n  spec: {ports: [{port: 80}]}\n";
        let objs = parse_manifests(text).expect("parses");
        assert!(matches!(objs.as_slice(), [Object::Service(_)]), "{objs:?}");
        // Some other kind that happens to end in List is not a list: ignored.
        let text = "apiVersion: example.com/v1\nkind: AllowList\nitems: 3\n";
        assert!(parse_manifests(text).expect("parses").is_empty());
    }

    /// Errors say which document (from 1, as an editor counts the non-empty ones) and which
    /// object, and List items by position.
    #[test]
    fn errors_name_the_document_and_the_object() {
        let text = "# header\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: 80}\n";
        let e = parse_manifests(text).expect_err("bad ports").to_string();
        assert!(
            e.starts_with("document 2 (Service shop/web): invalid Service"),
            "{e}"
        );
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}}\n- {apiVersion: v1, kind: Service, metadata: {name: b}, spec: {ports: 80}}\n";
        let e = parse_manifests(text).expect_err("bad ports").to_string();
        assert!(e.starts_with("document 1, item 2 (Service b): "), "{e}");
    }

    /// A syntax error's message does not quote the lines around it: in a Secret they are its
    /// data, and the message goes to the log and to `portico check`.
    #[test]
    fn a_syntax_error_does_not_quote_the_file() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData:\n  password: s3cr3t-do-not-log\n  other: [unclosed\n";
        let e = parse_manifests(text).expect_err("syntax error").to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
    }

    /// base64 wrapped at 76 columns (`base64` without `-w0`) is what many Secret manifests
    /// hold; the API server's decoder skips the line breaks.
    #[test]
    fn secret_data_may_wrap_its_base64() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata:\n  tls.crt: |\n    aGVsbG8g\n    d29ybGQ=\n";
        assert_eq!(tls_crt_of(text), b"hello world");
    }

    /// Large ordinary files parse: more than the YAML crate's default 1 024 documents and
    /// 250 000 nodes, and one anchor shared by every object.
    #[test]
    fn large_files_and_shared_anchors_parse() {
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{ports: [{{port: 80}}]}}\n"));
        }
        assert_eq!(parse_manifests(&text).expect("2000 documents").len(), 2000);
        let mut text = String::from(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s0, labels: &l {app: web}}\n",
        );
        for i in 1..300 {
            text.push_str(&format!(
                "- apiVersion: v1\n  kind: Service\n  metadata: {{name: s{i}, labels: *l}}\n"
            ));
        }
        assert_eq!(parse_manifests(&text).expect("shared anchor").len(), 300);
        let item = "- apiVersion: networking.k8s.io/v1\n  kind: Ingress\n  metadata: {name: NAME, annotations: {a: b, c: d}}\n  spec:\n    rules:\n    - host: h.example\n      http:\n        paths:\n        - {path: /a, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n        - {path: /b, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n";
        let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for i in 0..9000 {
            text.push_str(&item.replace("NAME", &format!("i{i}")));
        }
        assert_eq!(parse_manifests(&text).expect("9000 Ingresses").len(), 9000);
    }

    /// An alias bomb (each level doubles ten times) is refused, not expanded.
    #[test]
    fn an_alias_bomb_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        let e = parse_manifests(&text).expect_err("bomb");
        assert!(matches!(e, ParseError::Yaml(_)), "{e}");
    }
}
