//! The Helm chart (`charts/portico`), the plain `manifests/` and the kind / e2e YAML, checked
//! with the real `helm` binary (`make tools` fetches it into `.tools/bin`; `PORTICO_HELM`
//! overrides): `helm lint`, `helm template` over the value matrix of issue 5, every rendered
//! object deserialised into its k8s-openapi type with unknown fields rejected, the RBAC against
//! `portico::controller::rbac::API_NEEDS` both ways, the container flags against the real CLI,
//! the pod hardening, the CRD copy and the `manifests/` render.
//!
//! Uses only plain data from the library (`rbac::API_NEEDS`, `config::Cli`, the CRD type):
//! must not start the controller or the proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use portico::config::{Cli, Command as PorticoCommand, RunArgs};
use portico::controller::rbac::{API_NEEDS, Scope};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const RELEASE: &str = "portico";
const NAMESPACE: &str = "portico";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/portico")
}

/// The helm binary: `PORTICO_HELM`, else `.tools/bin/helm`. Missing is a failure, never a skip:
/// these checks are part of `make test`.
fn helm() -> PathBuf {
    let path = std::env::var_os("PORTICO_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".tools/bin/helm"));
    assert!(
        path.is_file(),
        "helm not found at {}: run `make tools` (fetches helm and kubectl into .tools/bin), \
         or set PORTICO_HELM",
        path.display()
    );
    path
}

/// Runs helm; `Ok(stdout)` on success, `Err(stderr)` otherwise.
fn run_helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm())
        .args(args)
        .current_dir(root())
        .output()
        .expect("run helm");
    let stdout = String::from_utf8(out.stdout).expect("helm stdout is UTF-8");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stderr}{stdout}"))
    }
}

/// `helm template portico charts/portico -n portico` with extra arguments (`-f`, `--set`).
fn template(extra: &[&str]) -> Result<String, String> {
    let chart = chart();
    let chart = chart.to_str().expect("UTF-8 path");
    let mut args = vec!["template", RELEASE, chart, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    run_helm(&args)
}

fn values_file(name: &str) -> String {
    chart()
        .join("ci")
        .join(name)
        .to_str()
        .expect("UTF-8 path")
        .to_string()
}

/// The value matrix of issue 5: (case, extra `helm template` arguments).
fn matrix() -> Vec<(&'static str, Vec<String>)> {
    let f = |name: &str| vec!["-f".to_string(), values_file(name)];
    vec![
        ("defaults", vec![]),
        ("daemonset", f("daemonset-values.yaml")),
        ("watchNamespace", f("watchnamespace-values.yaml")),
        ("kind", f("kind-values.yaml")),
        ("hpa+pdb", f("hpa-pdb-values.yaml")),
        (
            "serviceMonitor+networkPolicy",
            f("servicemonitor-networkpolicy-values.yaml"),
        ),
    ]
}

fn render_case(args: &[String]) -> Vec<Value> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = template(&args).unwrap_or_else(|e| panic!("helm template {args:?}: {e}"));
    documents(&text)
}

/// The non-empty YAML documents of a multi-document text.
fn documents(text: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).expect("rendered YAML parses");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Deserialises `doc` into `T`, failing on any field `T` would ignore (serde_ignored reports
/// every path a type skips, at any depth), so typos cannot hide in a rendered object.
fn strict<T: DeserializeOwned>(doc: &Value) -> Result<T, String> {
    let mut ignored = Vec::new();
    let value: T = serde_ignored::deserialize(doc.clone(), |path| ignored.push(path.to_string()))
        .map_err(|e| format!("{e}"))?;
    if ignored.is_empty() {
        Ok(value)
    } else {
        Err(format!("unknown fields: {}", ignored.join(", ")))
    }
}

/// Prometheus Operator `monitoring.coreos.com/v1` ServiceMonitor: no k8s-openapi type, so the
/// fields the chart uses, strictly (from the operator's CRD schema).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // Fields exist to be validated, not read.
struct ServiceMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // Validated, not read.
struct ServiceMonitorSpec {
    selector: LabelSelector,
    #[serde(default)]
    namespace_selector: Option<NamespaceSelector>,
    endpoints: Vec<Endpoint>,
    #[serde(default)]
    job_label: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // Validated, not read.
struct NamespaceSelector {
    #[serde(default)]
    any: Option<bool>,
    #[serde(default)]
    match_names: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // Validated, not read.
struct Endpoint {
    #[serde(default)]
    port: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    scrape_timeout: Option<String>,
}

/// Validates one object against its API type; returns `apiVersion/kind`.
fn validate(doc: &Value) -> Result<String, String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let id = format!("{api_version}/{kind}");
    let checked = match (api_version, kind) {
        ("v1", "Namespace") => strict::<Namespace>(doc).map(drop),
        ("v1", "ServiceAccount") => strict::<ServiceAccount>(doc).map(drop),
        ("v1", "Service") => strict::<Service>(doc).map(drop),
        ("v1", "Secret") => strict::<Secret>(doc).map(drop),
        ("apps/v1", "Deployment") => strict::<Deployment>(doc).map(drop),
        ("apps/v1", "DaemonSet") => strict::<DaemonSet>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<ClusterRole>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            strict::<ClusterRoleBinding>(doc).map(drop)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => strict::<Role>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => strict::<RoleBinding>(doc).map(drop),
        ("networking.k8s.io/v1", "IngressClass") => strict::<IngressClass>(doc).map(drop),
        ("networking.k8s.io/v1", "Ingress") => strict::<Ingress>(doc).map(drop),
        ("networking.k8s.io/v1", "NetworkPolicy") => strict::<NetworkPolicy>(doc).map(drop),
        ("policy/v1", "PodDisruptionBudget") => strict::<PodDisruptionBudget>(doc).map(drop),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => {
            strict::<HorizontalPodAutoscaler>(doc).map(drop)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            strict::<CustomResourceDefinition>(doc).map(drop)
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor") => strict::<ServiceMonitor>(doc).map(drop),
        ("portico.dev/v1alpha1", "RateLimitPolicy") => {
            // kube's derived type does not keep apiVersion/kind (matched just above).
            let mut body = doc.clone();
            if let Some(map) = body.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
            strict::<portico::crd::RateLimitPolicy>(&body).map(drop)
        }
        _ => Err("no API type known to this test".to_string()),
    };
    let name = doc["metadata"]["name"].as_str().unwrap_or("?");
    checked
        .map(|()| id.clone())
        .map_err(|e| format!("{id} {name}: {e}"))
}

fn validate_all(case: &str, docs: &[Value]) {
    let errors: Vec<String> = docs.iter().filter_map(|d| validate(d).err()).collect();
    assert!(
        errors.is_empty(),
        "{case}: objects that do not match their API types:\n{}",
        errors.join("\n")
    );
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn objects<T: DeserializeOwned>(docs: &[Value], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| strict::<T>(d).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

/// The pod spec of the one workload (Deployment or DaemonSet).
fn pod_spec(docs: &[Value]) -> PodSpec {
    let mut specs: Vec<PodSpec> = objects::<Deployment>(docs, "Deployment")
        .into_iter()
        .filter_map(|d| d.spec.template.spec)
        .collect();
    specs.extend(
        objects::<DaemonSet>(docs, "DaemonSet")
            .into_iter()
            .filter_map(|d| d.spec.template.spec),
    );
    assert_eq!(specs.len(), 1, "exactly one workload");
    specs.remove(0)
}

fn controller_container(spec: &PodSpec) -> Container {
    assert_eq!(spec.containers.len(), 1, "one container");
    spec.containers[0].clone()
}

/// The container's args parsed by the binary's own CLI: every flag the chart passes exists.
fn run_args(container: &Container) -> RunArgs {
    let args = container.args.clone().unwrap_or_default();
    let argv = std::iter::once("portico".to_string()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: PorticoCommand::Run(run),
        }) => *run,
        Ok(other) => panic!("container args are not `portico run`: {other:?}"),
        Err(e) => panic!("the binary refuses the chart's args {args:?}:\n{e}"),
    }
}

/// One granted permission: (namespace or `*` for cluster-wide, group, resource, verb). A rule
/// narrowed by `resourceNames` grants `resource#name` for each name, so it matches only a need
/// for that one object.
type Grant = (String, String, String, String);

fn expand(at: &str, rules: &[PolicyRule], out: &mut BTreeSet<Grant>) {
    for rule in rules {
        assert!(
            rule.non_resource_urls.is_none(),
            "rules are per resource: {rule:?}"
        );
        let names: Vec<Option<&String>> = match &rule.resource_names {
            Some(names) => names.iter().map(Some).collect(),
            None => vec![None],
        };
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for name in &names {
                    let resource = match name {
                        Some(n) => format!("{resource}#{n}"),
                        None => resource.clone(),
                    };
                    for verb in &rule.verbs {
                        out.insert((at.into(), group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
    }
}

/// What the rendered bindings grant the chart's ServiceAccount. Every Role and ClusterRole must
/// be bound to it (a rule nobody holds is as wrong as a missing one).
fn granted(docs: &[Value], service_account: &str) -> BTreeSet<Grant> {
    let cluster_roles: BTreeMap<String, ClusterRole> = objects::<ClusterRole>(docs, "ClusterRole")
        .into_iter()
        .map(|r| (r.metadata.name.clone().expect("name"), r))
        .collect();
    let roles: BTreeMap<(String, String), Role> = objects::<Role>(docs, "Role")
        .into_iter()
        .map(|r| {
            let key = (
                r.metadata.namespace.clone().expect("Role namespace"),
                r.metadata.name.clone().expect("name"),
            );
            (key, r)
        })
        .collect();
    let is_ours = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        let subjects = subjects.as_deref().unwrap_or_default();
        assert!(
            subjects.iter().all(|s| s.kind == "ServiceAccount"
                && s.name == service_account
                && s.namespace.as_deref() == Some(NAMESPACE)),
            "bindings hold only the chart's ServiceAccount: {subjects:?}"
        );
        !subjects.is_empty()
    };
    let mut out = BTreeSet::new();
    let mut bound_cluster = BTreeSet::new();
    let mut bound_roles = BTreeSet::new();
    for b in objects::<ClusterRoleBinding>(docs, "ClusterRoleBinding") {
        assert!(is_ours(&b.subjects), "ClusterRoleBinding without subject");
        assert_eq!(b.role_ref.kind, "ClusterRole");
        let role = cluster_roles
            .get(&b.role_ref.name)
            .unwrap_or_else(|| panic!("ClusterRoleBinding to missing {}", b.role_ref.name));
        expand("*", role.rules.as_deref().unwrap_or_default(), &mut out);
        bound_cluster.insert(b.role_ref.name.clone());
    }
    for b in objects::<RoleBinding>(docs, "RoleBinding") {
        assert!(is_ours(&b.subjects), "RoleBinding without subject");
        let ns = b.metadata.namespace.clone().expect("RoleBinding namespace");
        assert_eq!(b.role_ref.kind, "Role", "RoleBindings reference Roles");
        let key = (ns.clone(), b.role_ref.name.clone());
        let role = roles
            .get(&key)
            .unwrap_or_else(|| panic!("RoleBinding to missing Role {key:?}"));
        expand(&ns, role.rules.as_deref().unwrap_or_default(), &mut out);
        bound_roles.insert(key);
    }
    let unbound_cluster: Vec<_> = cluster_roles
        .keys()
        .filter(|k| !bound_cluster.contains(*k))
        .collect();
    let unbound_roles: Vec<_> = roles.keys().filter(|k| !bound_roles.contains(*k)).collect();
    assert!(
        unbound_cluster.is_empty() && unbound_roles.is_empty(),
        "unbound roles: {unbound_cluster:?} {unbound_roles:?}"
    );
    out
}

/// What API_NEEDS asks for, placed by the flags the chart passes.
fn needed(run: &RunArgs) -> BTreeSet<Grant> {
    let lease_ns = run
        .lease_namespace
        .clone()
        .expect("the chart sets --lease-namespace");
    let mut out = BTreeSet::new();
    for need in API_NEEDS {
        // The default certificate's Secret rule is narrowed to that Secret, the lease's to
        // that Lease.
        let resource = match (need.scope, &run.translate.default_certificate) {
            (Scope::DefaultCertificateNamespace, Some((_, name))) if need.resource == "secrets" => {
                format!("{}#{name}", need.resource)
            }
            (Scope::LeaseObject, _) => format!("{}#{}", need.resource, run.lease_name),
            _ => need.resource.to_string(),
        };
        let places: Vec<String> = match need.scope {
            Scope::Cluster => vec!["*".into()],
            Scope::WatchedNamespaces if run.watch_namespace.is_empty() => vec!["*".into()],
            Scope::WatchedNamespaces => run.watch_namespace.clone(),
            Scope::LeaseNamespace | Scope::LeaseObject => vec![lease_ns.clone()],
            Scope::ClusterEventsNamespace
                if !run.watch_namespace.is_empty()
                    && !run.watch_namespace.iter().any(|n| n == "default") =>
            {
                vec!["default".into()]
            }
            Scope::ClusterEventsNamespace => vec![],
            Scope::PublishServiceNamespace => match &run.publish_service {
                Some((ns, _)) => vec![ns.clone()],
                None => vec![],
            },
            Scope::DefaultCertificateNamespace => match &run.translate.default_certificate {
                Some((ns, _))
                    if !run.watch_namespace.is_empty() && !run.watch_namespace.contains(ns) =>
                {
                    vec![ns.clone()]
                }
                _ => vec![],
            },
        };
        for at in places {
            for verb in need.verbs {
                out.insert((
                    at.clone(),
                    need.group.to_string(),
                    resource.clone(),
                    verb.to_string(),
                ));
            }
        }
    }
    out
}

fn check_rbac(case: &str, docs: &[Value]) {
    let spec = pod_spec(docs);
    let run = run_args(&controller_container(&spec));
    let sa = spec
        .service_account_name
        .clone()
        .expect("serviceAccountName");
    let granted = granted(docs, &sa);
    let needed = needed(&run);
    let missing: Vec<_> = needed.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{case}: RBAC differs from API_NEEDS (src/controller/rbac.rs)\n\
         needed but not granted: {missing:?}\ngranted without a need: {extra:?}"
    );
}

/// Pod template labels of the one workload.
fn pod_labels(docs: &[Value]) -> BTreeMap<String, String> {
    let mut labels: Vec<BTreeMap<String, String>> = objects::<Deployment>(docs, "Deployment")
        .into_iter()
        .filter_map(|d| d.spec.template.metadata?.labels)
        .collect();
    labels.extend(
        objects::<DaemonSet>(docs, "DaemonSet")
            .into_iter()
            .filter_map(|d| d.spec.template.metadata?.labels),
    );
    assert_eq!(labels.len(), 1, "one workload with pod labels");
    labels.remove(0)
}

fn subset(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    !want.is_empty() && want.iter().all(|(k, v)| have.get(k) == Some(v))
}

fn match_labels(sel: &LabelSelector) -> BTreeMap<String, String> {
    assert!(
        sel.match_expressions.is_none(),
        "selectors are matchLabels only"
    );
    sel.match_labels.clone().unwrap_or_default()
}

/// Every selector in the render selects what it is meant to: Services, the PDB, the
/// NetworkPolicy and topology spread select the pods; the HPA scales the Deployment; the
/// ServiceMonitor selects the metrics Service and names one of its ports; named target ports
/// and probe ports exist on the container. A wrong label would otherwise fail silently.
fn check_wiring(case: &str, docs: &[Value]) {
    let pods = pod_labels(docs);
    let spec = pod_spec(docs);
    let c = controller_container(&spec);
    let container_ports: BTreeSet<String> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let port = probe.clone().and_then(|p| p.http_get).map(|g| g.port);
        if let Some(IntOrString::String(name)) = port {
            assert!(container_ports.contains(&name), "{case}: probe port {name}");
        }
    }
    let services = objects::<Service>(docs, "Service");
    for svc in &services {
        let spec = svc.spec.clone().expect("Service spec");
        let sel = spec.selector.clone().unwrap_or_default();
        assert!(
            subset(&sel, &pods),
            "{case}: Service selector {sel:?} vs pods {pods:?}"
        );
        for p in spec.ports.iter().flatten() {
            if let Some(IntOrString::String(name)) = &p.target_port {
                assert!(container_ports.contains(name), "{case}: targetPort {name}");
            }
        }
    }
    for pdb in objects::<PodDisruptionBudget>(docs, "PodDisruptionBudget") {
        let sel = pdb.spec.and_then(|s| s.selector).expect("PDB selector");
        assert!(subset(&match_labels(&sel), &pods), "{case}: PDB selector");
    }
    for np in objects::<NetworkPolicy>(docs, "NetworkPolicy") {
        let spec = np.spec.expect("NetworkPolicy spec");
        assert!(
            subset(
                &match_labels(spec.pod_selector.as_ref().expect("podSelector")),
                &pods
            ),
            "{case}: NetworkPolicy"
        );
        for rule in spec.ingress.iter().flatten() {
            for port in rule.ports.iter().flatten() {
                if let Some(IntOrString::String(name)) = &port.port {
                    assert!(
                        container_ports.contains(name),
                        "{case}: NetworkPolicy port {name}"
                    );
                }
            }
        }
    }
    for tsc in spec.topology_spread_constraints.iter().flatten() {
        let sel = tsc.label_selector.clone().expect("labelSelector");
        assert!(
            subset(&match_labels(&sel), &pods),
            "{case}: topology spread"
        );
    }
    let deployments: Vec<String> = objects::<Deployment>(docs, "Deployment")
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    for hpa in objects::<HorizontalPodAutoscaler>(docs, "HorizontalPodAutoscaler") {
        let target = hpa.spec.scale_target_ref;
        assert_eq!(target.kind, "Deployment");
        assert_eq!(deployments, [target.name], "{case}: HPA target");
    }
    for sm in docs.iter().filter(|d| d["kind"] == "ServiceMonitor") {
        let sm: ServiceMonitor = strict(sm).expect("ServiceMonitor");
        let want = match_labels(&sm.spec.selector);
        let selected: Vec<&Service> = services
            .iter()
            .filter(|s| {
                subset(
                    &want,
                    s.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                )
            })
            .collect();
        assert_eq!(
            selected.len(),
            1,
            "{case}: the ServiceMonitor selects the metrics Service"
        );
        let ports: BTreeSet<String> = selected[0]
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter_map(|p| p.name.clone())
            .collect();
        for e in &sm.spec.endpoints {
            let port = e.port.clone().expect("endpoint port");
            assert!(ports.contains(&port), "{case}: ServiceMonitor port {port}");
        }
    }
}

#[test]
fn helm_lint_passes_for_every_value_set() {
    let chart = chart();
    let chart = chart.to_str().expect("UTF-8 path");
    for (case, args) in matrix() {
        let mut argv = vec!["lint", "--strict", chart];
        argv.extend(args.iter().map(String::as_str));
        let out = run_helm(&argv).unwrap_or_else(|e| panic!("helm lint ({case}): {e}"));
        assert!(out.contains("0 chart(s) failed"), "{case}: {out}");
    }
}

#[test]
fn every_render_of_the_matrix_matches_the_api_types_flags_and_rbac() {
    for (case, args) in matrix() {
        let docs = render_case(&args);
        assert!(!docs.is_empty(), "{case}: nothing rendered");
        validate_all(case, &docs);
        check_rbac(case, &docs);
        check_wiring(case, &docs);
        let k = kinds(&docs);
        let has = |kind: &str| k.iter().any(|x| x == kind);
        match case {
            "daemonset" => assert!(has("DaemonSet") && !has("Deployment"), "{case}: {k:?}"),
            "hpa+pdb" => {
                assert!(has("HorizontalPodAutoscaler") && has("PodDisruptionBudget"));
                let d = &objects::<Deployment>(&docs, "Deployment")[0];
                assert_eq!(d.spec.replicas, None, "the HPA owns the replica count");
            }
            "serviceMonitor+networkPolicy" => {
                assert!(
                    has("ServiceMonitor") && has("NetworkPolicy"),
                    "{case}: {k:?}"
                );
                let services = objects::<Service>(&docs, "Service");
                assert_eq!(services.len(), 2, "public Service + metrics Service");
            }
            "watchNamespace" => {
                let roles = objects::<Role>(&docs, "Role");
                for ns in ["shop", "blog"] {
                    assert!(
                        roles
                            .iter()
                            .any(|r| r.metadata.namespace.as_deref() == Some(ns)),
                        "a Role in {ns}"
                    );
                }
            }
            _ => {}
        }
    }
}

#[test]
fn defaults_render_a_hardened_pod_behind_a_load_balancer() {
    let docs = render_case(&[]);
    let spec = pod_spec(&docs);
    let c = controller_container(&spec);
    let run = run_args(&c);

    let psc = spec.security_context.clone().expect("pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(
        psc.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
    let sc = c
        .security_context
        .clone()
        .expect("container securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(65532));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.privileged, None);
    let caps = sc.capabilities.expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(caps.add, None);

    let ports: BTreeMap<String, i32> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().expect("port name"), p.container_port))
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            ("http".to_string(), 8080),
            ("https".to_string(), 8443),
            ("admin".to_string(), 9090)
        ])
    );
    // The listeners the binary opens are the ports the container declares.
    assert_eq!(run.http_addr.port(), 8080);
    assert_eq!(run.https_addr.port(), 8443);
    assert_eq!(run.admin_addr.port(), 9090);

    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.clone().and_then(|p| p.http_get).expect("httpGet probe");
        (get.path.expect("path"), get.port)
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        probe_path(&c.liveness_probe),
        ("/healthz".into(), IntOrString::String("admin".into()))
    );
    assert_eq!(
        probe_path(&c.readiness_probe),
        ("/readyz".into(), IntOrString::String("admin".into()))
    );
    let requests = c
        .resources
        .clone()
        .and_then(|r| r.requests)
        .expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

    // Rolling updates drop nothing: a shutdown delay, and the kubelet waits longer than the
    // whole drain (delay + grace) before it kills.
    assert!(
        !run.shutdown_delay.is_zero(),
        "the chart sets --shutdown-delay"
    );
    let tgps = spec
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    // The drain, up to 2 s to cut what is left, then the bounded tail (Lease release).
    let drain = run.shutdown_delay
        + run.shutdown_grace
        + std::time::Duration::from_secs(2)
        + portico::app::SHUTDOWN_TAIL;
    assert!(
        u64::try_from(tgps).expect("positive") >= drain.as_secs(),
        "terminationGracePeriodSeconds {tgps} must cover {drain:?}"
    );
    let strategy = objects::<Deployment>(&docs, "Deployment")[0]
        .spec
        .strategy
        .clone()
        .and_then(|s| s.rolling_update)
        .expect("rollingUpdate");
    assert_eq!(strategy.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(
        strategy.max_unavailable,
        Some(IntOrString::Int(0)),
        "a rollout never drops below the replica count"
    );
    let tsc = spec
        .topology_spread_constraints
        .clone()
        .expect("topology spread");
    assert!(tsc.iter().all(|t| t.label_selector.is_some()));

    // Downward API: POD_NAME is the leader identity, POD_NAMESPACE the default lease namespace.
    let env: BTreeMap<String, String> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let path = e.value_from.clone()?.field_ref?.field_path;
            Some((e.name.clone(), path))
        })
        .collect();
    assert_eq!(
        env.get("POD_NAME").map(String::as_str),
        Some("metadata.name")
    );
    assert_eq!(
        env.get("POD_NAMESPACE").map(String::as_str),
        Some("metadata.namespace")
    );
    assert_eq!(run.lease_namespace.as_deref(), Some(NAMESPACE));

    // The Service maps 80/443 to the named container ports, and is the one published.
    let services = objects::<Service>(&docs, "Service");
    assert_eq!(services.len(), 1);
    let svc = &services[0];
    let svc_name = svc.metadata.name.clone().expect("name");
    assert_eq!(
        run.publish_service,
        Some((NAMESPACE.to_string(), svc_name.clone()))
    );
    let svc_spec = svc.spec.clone().expect("spec");
    assert_eq!(svc_spec.type_.as_deref(), Some("LoadBalancer"));
    let svc_ports: Vec<(i32, IntOrString)> = svc_spec
        .ports
        .iter()
        .flatten()
        .map(|p| (p.port, p.target_port.clone().expect("targetPort")))
        .collect();
    assert_eq!(
        svc_ports,
        [
            (80, IntOrString::String("http".into())),
            (443, IntOrString::String("https".into()))
        ]
    );
    // The admin port is never on the public Service.
    assert!(!svc_ports.iter().any(|(p, _)| *p == 9090));

    let classes = objects::<IngressClass>(&docs, "IngressClass");
    assert_eq!(classes.len(), 1);
    let class = &classes[0];
    assert_eq!(class.metadata.name.as_deref(), Some("portico"));
    assert_eq!(
        class.spec.as_ref().and_then(|s| s.controller.as_deref()),
        Some("portico.dev/ingress-controller")
    );
    assert_eq!(class.metadata.annotations, None, "not the default class");
    assert_eq!(run.translate.ingress_class, "portico");
    assert_eq!(
        run.translate.controller_name,
        "portico.dev/ingress-controller"
    );
}

#[test]
fn toggles_reach_the_rendered_objects() {
    let docs = documents(
        &template(&[
            "--set",
            "controller.ingressClassResource.default=true",
            "--set",
            "controller.service.type=NodePort",
            "--set",
            "controller.service.externalTrafficPolicy=Local",
            "--set",
            "controller.extraArgs.max-connections=20000",
            "--set",
            "controller.extraArgs.no-access-log=true",
        ])
        .expect("renders"),
    );
    validate_all("toggles", &docs);
    let class = &objects::<IngressClass>(&docs, "IngressClass")[0];
    assert_eq!(
        class
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("ingressclass.kubernetes.io/is-default-class"))
            .map(String::as_str),
        Some("true")
    );
    let svc = objects::<Service>(&docs, "Service")[0]
        .spec
        .clone()
        .expect("spec");
    assert_eq!(svc.type_.as_deref(), Some("NodePort"));
    assert_eq!(svc.external_traffic_policy.as_deref(), Some("Local"));
    let run = run_args(&controller_container(&pod_spec(&docs)));
    assert_eq!(run.max_connections, 20_000);
    assert!(run.no_access_log);

    // Fixed status addresses replace --publish-service (and its Role).
    let docs = documents(
        &template(&["--set", "controller.publishStatusAddress=203.0.113.9"]).expect("renders"),
    );
    let run = run_args(&controller_container(&pod_spec(&docs)));
    assert_eq!(run.publish_service, None);
    assert_eq!(run.publish_status_address, ["203.0.113.9"]);
    check_rbac("publishStatusAddress", &docs);
}

/// `controller.bindAddress: "::"` binds the listeners to the IPv6 wildcard (IPv6-only and
/// dual-stack clusters, where probes and Service endpoints use the pod's IPv6 address); the
/// rendered addresses parse with the binary's own CLI. Anything else is refused by the schema.
#[test]
fn bind_address_ipv6_for_ipv6_and_dual_stack_clusters() {
    let docs = documents(&template(&["--set", "controller.bindAddress=::"]).expect("renders"));
    let run = run_args(&controller_container(&pod_spec(&docs)));
    for addr in [run.http_addr, run.https_addr, run.admin_addr] {
        assert!(addr.ip().is_unspecified() && addr.is_ipv6(), "{addr}");
    }
    assert_eq!(run.http_addr.port(), 8080);
    let docs = documents(&template(&[]).expect("renders"));
    let run = run_args(&controller_container(&pod_spec(&docs)));
    assert!(run.http_addr.ip().is_unspecified() && run.http_addr.is_ipv4());
    assert!(template(&["--set", "controller.bindAddress=10.0.0.1"]).is_err());
}

/// A PodDisruptionBudget over a single pod would refuse every eviction (node drains hang): the
/// chart renders one for a Deployment only when it runs 2 or more replicas.
#[test]
fn no_disruption_budget_over_a_single_replica() {
    let pdbs = |extra: &[&str]| {
        let mut args = vec!["--set", "controller.podDisruptionBudget.enabled=true"];
        args.extend_from_slice(extra);
        objects::<PodDisruptionBudget>(
            &documents(&template(&args).expect("renders")),
            "PodDisruptionBudget",
        )
        .len()
    };
    assert_eq!(pdbs(&["--set", "controller.replicaCount=1"]), 0);
    assert_eq!(pdbs(&["--set", "controller.replicaCount=2"]), 1);
    let hpa = [
        "--set",
        "controller.autoscaling.enabled=true",
        "--set",
        "controller.replicaCount=5",
    ];
    assert_eq!(
        pdbs(&[&hpa[..], &["--set", "controller.autoscaling.minReplicas=1"]].concat()),
        0
    );
    assert_eq!(
        pdbs(&[&hpa[..], &["--set", "controller.autoscaling.minReplicas=3"]].concat()),
        1
    );
    assert_eq!(pdbs(&["--set", "controller.kind=DaemonSet"]), 1);
    // On by default: the two default replicas are never evicted together by a node drain.
    let defaults = documents(&template(&[]).expect("renders"));
    let pdb = objects::<PodDisruptionBudget>(&defaults, "PodDisruptionBudget");
    assert_eq!(pdb.len(), 1);
    assert_eq!(
        pdb[0].spec.as_ref().and_then(|s| s.min_available.clone()),
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
}

/// Service names are DNS labels (63 characters): a long release name must not push the
/// metrics Service's past that.
#[test]
fn a_long_release_name_still_gives_valid_service_names() {
    let chart = chart();
    let release = "a-very-long-release-name-for-the-edge-ingress-tier1";
    assert_eq!(release.len(), 51);
    let text = run_helm(&[
        "template",
        release,
        chart.to_str().expect("UTF-8 path"),
        "--namespace",
        NAMESPACE,
        "--set",
        "controller.metrics.service.enabled=true",
    ])
    .expect("renders");
    let docs = documents(&text);
    let services = objects::<k8s_openapi::api::core::v1::Service>(&docs, "Service");
    assert!(services.len() >= 2, "the public and the metrics Service");
    for svc in services {
        let name = svc.metadata.name.unwrap_or_default();
        assert!(name.len() <= 63, "{name} ({} characters)", name.len());
        assert!(!name.contains("--"), "{name}");
    }
}

/// `controller.extraArgs` from a values file: YAML numbers (which Helm reads as floats) are
/// written as integers, a `false` switch is left out, and a flag the chart sets itself is refused
/// at render time with the value to use, instead of a pod that crash-loops on a repeated flag.
#[test]
fn extra_args_from_a_values_file_render_flags_portico_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let values = dir.path().join("values.yaml");
    fs::write(
        &values,
        "controller:\n  extraArgs:\n    max-connections: 10485760\n    no-access-log: false\n    \
         trusted-proxies: 10.0.0.0/8\n",
    )
    .expect("write values");
    let docs =
        documents(&template(&["-f", values.to_str().expect("UTF-8 path")]).expect("renders"));
    let container = controller_container(&pod_spec(&docs));
    let args = container.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--max-connections=10485760".to_string()),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a.contains("no-access-log")),
        "{args:?}"
    );
    let run = run_args(&container);
    assert_eq!(run.max_connections, 10_485_760);
    assert!(!run.no_access_log);

    // A quoted "true" (or --set-string) is a switch too.
    let docs = documents(
        &template(&["--set-string", "controller.extraArgs.no-access-log=true"]).expect("renders"),
    );
    let container = controller_container(&pod_spec(&docs));
    assert!(
        container
            .args
            .clone()
            .unwrap_or_default()
            .contains(&"--no-access-log".to_string())
    );
    assert!(run_args(&container).no_access_log);

    for (flag, value) in [
        ("log-format", "controller.logFormat"),
        ("shutdown-grace", "controller.shutdownGrace"),
        (
            "http-addr",
            "controller.bindAddress and controller.containerPort.http",
        ),
    ] {
        let err = template(&["--set", &format!("controller.extraArgs.{flag}=x")])
            .expect_err("a flag the chart owns is refused");
        assert!(
            err.contains(&format!("--{flag}")) && err.contains(value),
            "{err}"
        );
    }
}

/// A `defaultCertificate` in a namespace `watchNamespace` leaves out gets a Role on exactly
/// that Secret (the controller watches it by name); inside the watched namespaces it needs
/// none of its own.
#[test]
fn default_certificate_outside_the_watched_namespaces_gets_a_role_on_that_secret() {
    let render = |watched: &str| {
        documents(
            &template(&[
                "--set",
                &format!("controller.watchNamespace={watched}"),
                "--set",
                "controller.defaultCertificate=certs/wildcard",
            ])
            .expect("renders"),
        )
    };
    let roles = |docs: &[Value]| -> Vec<Role> {
        objects::<Role>(docs, "Role")
            .into_iter()
            .filter(|r| r.metadata.namespace.as_deref() == Some("certs"))
            .collect()
    };
    let docs = render("shop");
    check_rbac("defaultCertificate outside", &docs);
    let run = run_args(&controller_container(&pod_spec(&docs)));
    assert_eq!(
        run.translate.default_certificate,
        Some(("certs".into(), "wildcard".into()))
    );
    let in_certs = roles(&docs);
    assert_eq!(in_certs.len(), 1, "one Role in the certificate's namespace");
    let rules = in_certs[0].rules.clone().unwrap_or_default();
    // That Secret, and Events about it.
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["secrets".to_string()][..])
    );
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(&["wildcard".to_string()][..])
    );
    assert_eq!(
        rules[1].resources.as_deref(),
        Some(&["events".to_string()][..])
    );
    assert_eq!(rules[1].verbs, ["create"]);

    let docs = render("shop\\,certs");
    check_rbac("defaultCertificate inside", &docs);
    assert!(
        roles(&docs).iter().all(|r| r
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| !n.ends_with("-default-certificate"))),
        "no Role of its own when the namespace is watched"
    );
}

#[test]
fn kind_values_bind_host_ports_on_the_ingress_ready_node() {
    let docs = render_case(&["-f".into(), values_file("kind-values.yaml")]);
    let spec = pod_spec(&docs);
    let c = controller_container(&spec);
    let host_ports: BTreeMap<i32, i32> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.host_port?, p.container_port)))
        .collect();
    assert_eq!(host_ports, BTreeMap::from([(80, 8080), (443, 8443)]));
    assert_eq!(
        spec.node_selector
            .as_ref()
            .and_then(|n| n.get("ingress-ready"))
            .map(String::as_str),
        Some("true")
    );
    let kind = kind_config();
    let node = kind
        .nodes
        .iter()
        .find(|n| n.labels.get("ingress-ready").map(String::as_str) == Some("true"))
        .expect("kind-config.yaml: a node labelled ingress-ready=true");
    assert_eq!(node.role, "control-plane");
    let mapped: BTreeSet<(u16, u16)> = node
        .extra_port_mappings
        .iter()
        .map(|m| (m.container_port, m.host_port))
        .collect();
    // kind publishes the node's 80/443 (where the hostPorts are) on this machine's 80/443.
    assert_eq!(mapped, BTreeSet::from([(80, 80), (443, 443)]));
    let run = run_args(&c);
    assert_eq!(run.publish_status_address, ["127.0.0.1"]);
    // One hostPort holder per node: the rollout replaces instead of surging.
    let strategy = objects::<Deployment>(&docs, "Deployment")[0]
        .spec
        .strategy
        .clone()
        .and_then(|s| s.rolling_update)
        .expect("rollingUpdate");
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(strategy.max_surge, Some(IntOrString::Int(0)));
    assert_eq!(strategy.max_unavailable, Some(IntOrString::Int(1)));
}

/// kind's `kind.x-k8s.io/v1alpha4` Cluster config, the fields kind-config.yaml uses, strictly.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindCluster {
    kind: String,
    api_version: String,
    #[serde(default)]
    #[allow(dead_code)] // Validated, not read.
    name: Option<String>,
    nodes: Vec<KindNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindNode {
    role: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    extra_port_mappings: Vec<KindPortMapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindPortMapping {
    container_port: u16,
    host_port: u16,
    #[serde(default)]
    #[allow(dead_code)] // Validated, not read.
    protocol: Option<String>,
}

fn kind_config() -> KindCluster {
    let text = read(&root().join("kind-config.yaml"));
    let cfg: KindCluster = serde_saphyr::from_str(&text).expect("kind-config.yaml");
    assert_eq!(cfg.kind, "Cluster");
    assert_eq!(cfg.api_version, "kind.x-k8s.io/v1alpha4");
    cfg
}

#[test]
fn values_schema_rejects_unknown_keys_and_bad_values() {
    for bad in [
        "controller.typo=1",
        "typo=1",
        "controller.service.tpye=NodePort",
        "controller.service.type=Ingress",
        "controller.kind=StatefulSet",
        "controller.shutdownDelay=5 seconds",
        "controller.logFormat=xml",
    ] {
        let err = template(&["--set", bad])
            .err()
            .unwrap_or_else(|| panic!("--set {bad} was accepted"));
        assert!(
            err.contains("schema") || err.contains("additional properties"),
            "--set {bad}: {err}"
        );
    }
    // A drain longer than the kubelet waits is refused at render time.
    let err = template(&["--set", "controller.shutdownGrace=60s"]).expect_err("refused");
    assert!(err.contains("terminationGracePeriodSeconds"), "{err}");
    // 5 + 38 + 5 > 45: no room left for the Lease release.
    let err = template(&["--set", "controller.shutdownGrace=38s"]).expect_err("refused");
    assert!(err.contains("+ 5s"), "{err}");
    template(&["--set", "controller.shutdownGrace=35s"]).expect("5 + 35 + 5 = 45 fits");
    let err = template(&[
        "--set",
        "controller.kind=DaemonSet",
        "--set",
        "controller.autoscaling.enabled=true",
    ])
    .expect_err("refused");
    assert!(err.contains("Deployment"), "{err}");
}

#[test]
fn a_typo_inside_a_rendered_object_fails_validation() {
    // Synthetic: the rendered Deployment with `securityContext` misspelled.
    let docs = render_case(&[]);
    let mut deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .cloned()
        .expect("a Deployment");
    validate(&deployment).expect("the rendered Deployment is valid");
    let container = &mut deployment["spec"]["template"]["spec"]["containers"][0];
    let sc = container
        .as_object_mut()
        .expect("container")
        .remove("securityContext")
        .expect("securityContext");
    container["securityContex"] = sc;
    let err = validate(&deployment).expect_err("the typo is caught");
    assert!(err.contains("securityContex"), "{err}");

    // Through the chart: a free-form value (passed to the pod as is) with a misspelled field.
    let dir = tempfile::tempdir().expect("tempdir");
    let values = dir.path().join("typo.yaml");
    fs::write(
        &values,
        "controller:\n  containerSecurityContext:\n    runAsNonRoot: true\n    \
         readOnlyRootFilesytem: true\n",
    )
    .expect("write values");
    let docs = render_case(&["-f".into(), values.to_str().expect("UTF-8").into()]);
    let errors: Vec<String> = docs.iter().filter_map(|d| validate(d).err()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("readOnlyRootFilesytem"), "{errors:?}");

    // And a wrong type, not only an unknown name.
    let mut svc = docs
        .iter()
        .find(|d| d["kind"] == "Service")
        .cloned()
        .expect("a Service");
    svc["spec"]["ports"][0]["port"] = Value::String("eighty".into());
    assert!(validate(&svc).is_err());
}

#[test]
fn chart_crd_is_the_crds_dir_byte_for_byte() {
    let ours = fs::read(root().join("crds/ratelimitpolicies.portico.dev.yaml")).expect("crds/");
    let chart = fs::read(chart().join("crds/ratelimitpolicies.portico.dev.yaml"))
        .expect("charts/portico/crds/");
    assert!(
        ours == chart,
        "charts/portico/crds/ratelimitpolicies.portico.dev.yaml differs from crds/: copy it"
    );
    for doc in documents(&String::from_utf8(chart).expect("UTF-8")) {
        validate(&doc).expect("the CRD is a valid CustomResourceDefinition");
    }
}

#[test]
fn manifests_dir_is_the_default_render() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new("bash")
        .arg(root().join("charts/render-manifests.sh"))
        .arg(dir.path())
        .env("HELM", helm())
        .output()
        .expect("run charts/render-manifests.sh");
    assert!(
        out.status.success(),
        "render-manifests.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = |d: &Path| -> BTreeSet<String> {
        fs::read_dir(d)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    let committed = root().join("manifests");
    assert_eq!(
        names(&committed),
        names(dir.path()),
        "manifests/ files: run `make manifests`"
    );
    let mut docs = Vec::new();
    for name in names(dir.path()) {
        let fresh = read(&dir.path().join(&name));
        assert!(
            read(&committed.join(&name)) == fresh,
            "manifests/{name} has drifted from charts/portico: run `make manifests`"
        );
        docs.extend(documents(&fresh));
    }
    validate_all("manifests", &docs);
    check_rbac("manifests", &docs);
    let k = kinds(&docs);
    assert_eq!(k.first().map(String::as_str), Some("Namespace"));
    assert_eq!(
        k.get(1).map(String::as_str),
        Some("CustomResourceDefinition")
    );
    for d in &docs[2..] {
        let cluster_scoped = ["ClusterRole", "ClusterRoleBinding", "IngressClass"];
        if !cluster_scoped.contains(&d["kind"].as_str().unwrap_or_default()) {
            assert_eq!(d["metadata"]["namespace"], NAMESPACE, "{d}");
        }
    }
}

#[test]
fn e2e_yaml_is_valid_and_scripts_parse() {
    let mut docs = Vec::new();
    for name in ["backends.yaml", "routes.yaml"] {
        docs.extend(documents(&read(&root().join("tests/e2e").join(name))));
    }
    validate_all("tests/e2e", &docs);
    let k = kinds(&docs);
    for kind in ["Deployment", "Service", "Ingress", "RateLimitPolicy"] {
        assert!(k.iter().any(|x| x == kind), "tests/e2e has a {kind}");
    }
    // The e2e Ingresses are served by the chart's IngressClass.
    for ing in objects::<Ingress>(&docs, "Ingress") {
        assert_eq!(
            ing.spec.and_then(|s| s.ingress_class_name).as_deref(),
            Some("portico")
        );
    }
    for script in ["tests/e2e/run.sh", "charts/render-manifests.sh", ".ci/run"] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(root().join(script))
            .output()
            .expect("bash -n");
        assert!(
            out.status.success(),
            "bash -n {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every leaf key of values.yaml, as a dotted path.
fn value_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                // Free-form Kubernetes objects (resources, securityContexts, probes...) are
                // documented as a whole.
                if FREE_FORM.contains(&path.as_str()) {
                    out.push(path);
                } else {
                    value_paths(child, &path, out);
                }
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

const FREE_FORM: &[&str] = &[
    "controller.resources",
    "controller.podSecurityContext",
    "controller.containerSecurityContext",
    "controller.livenessProbe",
    "controller.readinessProbe",
    "controller.nodeSelector",
];

#[test]
fn every_value_is_documented_in_the_chart_readme() {
    let values: Value =
        serde_saphyr::from_str(&read(&chart().join("values.yaml"))).expect("values.yaml");
    let readme = read(&chart().join("README.md"));
    let mut paths = Vec::new();
    value_paths(&values, "", &mut paths);
    assert!(paths.len() > 40, "{paths:?}");
    let missing: Vec<_> = paths
        .iter()
        .filter(|p| !readme.contains(&format!("| `{p}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "values not in charts/portico/README.md: {missing:?}"
    );
}

#[test]
fn other_value_combinations_render_valid_objects() {
    let cases: &[&[&str]] = &[
        &["controller.metrics.service.enabled=true"],
        &["controller.ingressClassResource.enabled=false"],
        &["controller.service.enabled=false"],
        &["image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"],
        &["controller.publishService.pathOverride=edge/lb"],
        &["controller.topologySpreadConstraints=null"],
        &[
            "controller.kind=DaemonSet",
            "controller.hostPort.enabled=true",
        ],
        &["fullnameOverride=edge", "serviceAccount.name=edge-sa"],
        &["rbac.create=false", "serviceAccount.create=false"],
    ];
    for sets in cases {
        let mut args = Vec::new();
        for s in *sets {
            args.extend(["--set", s]);
        }
        let docs =
            documents(&template(&args).unwrap_or_else(|e| panic!("helm template {sets:?}: {e}")));
        let case = format!("{sets:?}");
        validate_all(&case, &docs);
        check_wiring(&case, &docs);
        let run = run_args(&controller_container(&pod_spec(&docs)));
        if sets.iter().any(|s| s.starts_with("rbac.create=false")) {
            assert!(
                !kinds(&docs).iter().any(|k| k.contains("Role")),
                "{case}: no RBAC objects"
            );
        } else {
            check_rbac(&case, &docs);
        }
        match sets[0] {
            "controller.service.enabled=false" => assert_eq!(run.publish_service, None),
            "controller.publishService.pathOverride=edge/lb" => {
                assert_eq!(run.publish_service, Some(("edge".into(), "lb".into())))
            }
            "fullnameOverride=edge" => assert_eq!(run.lease_name, "edge-leader"),
            _ => {}
        }
    }
}

/// NOTES.txt as rendered for these `helm template` arguments. Helm prints NOTES only on
/// install, and Helm 3's `install --dry-run` needs a cluster, so a copy of the chart gets one
/// extra template holding `portico.notes` (what NOTES.txt includes) as a YAML string.
fn notes(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("portico");
    copy_dir(&chart(), &copy);
    fs::write(
        copy.join("templates/notes-check.yaml"),
        "notes: {{ include \"portico.notes\" . | toJson }}\n",
    )
    .expect("write notes-check.yaml");
    let copy_str = copy.to_str().expect("UTF-8 path");
    let mut args = vec![
        "template",
        RELEASE,
        copy_str,
        "--namespace",
        NAMESPACE,
        "--show-only",
        "templates/notes-check.yaml",
    ];
    args.extend_from_slice(extra);
    let out = run_helm(&args).unwrap_or_else(|e| panic!("render NOTES: {e}"));
    let doc = documents(&out).pop().expect("one document");
    doc["notes"].as_str().expect("notes string").to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("read chart dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[test]
fn notes_tell_how_to_reach_portico_and_create_an_ingress() {
    // NOTES.txt is exactly the named template the check renders.
    assert_eq!(
        read(&chart().join("templates/NOTES.txt")).trim(),
        "{{ include \"portico.notes\" . }}"
    );
    let text = notes(&[]);
    for want in [
        "rollout status deployment/portico",
        "get service portico",
        "kubectl create ingress web --class=portico",
        "/healthz",
    ] {
        assert!(text.contains(want), "NOTES lack {want:?}:\n{text}");
    }
    let text = notes(&["-f", &values_file("kind-values.yaml")]);
    assert!(text.contains("ports 80 and 443"), "{text}");
    let text = notes(&["-f", &values_file("daemonset-values.yaml")]);
    assert!(text.contains("rollout status daemonset/portico"), "{text}");
    // Without a Service to publish, the NOTES say Ingress status stays empty, and how to fix it.
    assert!(!notes(&[]).contains("Ingress status is not written"));
    let text = notes(&["--set", "controller.service.enabled=false"]);
    assert!(text.contains("Ingress status is not written"), "{text}");
    let text = notes(&[
        "--set",
        "controller.service.enabled=false",
        "--set",
        "controller.publishStatusAddress=203.0.113.10",
    ]);
    assert!(!text.contains("Ingress status is not written"), "{text}");
}

#[test]
fn helm_is_version_3_or_4() {
    // `make tools` pins Helm 4; PORTICO_HELM may point at a Helm 3 to check the chart there.
    let version = run_helm(&["version", "--short"]).expect("helm version");
    assert!(
        version.starts_with("v4.") || version.starts_with("v3."),
        "unexpected helm {version}"
    );
}

#[test]
fn dockerfile_builds_locked_with_the_pinned_toolchain_and_runs_only_the_binary_as_non_root() {
    let dockerfile = read(&root().join("Dockerfile"));
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = instructions
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    // The builder uses the toolchain Cargo.toml declares.
    let manifest = read(&root().join("Cargo.toml"));
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version in Cargo.toml")
        .trim_matches('"');
    assert_eq!(
        froms,
        [
            format!("FROM rust:{rust_version}-bookworm AS build").as_str(),
            "FROM gcr.io/distroless/cc-debian12:nonroot"
        ]
    );
    let final_stage: Vec<&str> = instructions
        .iter()
        .copied()
        .skip_while(|l| !l.starts_with("FROM gcr.io"))
        .collect();
    assert!(instructions.contains(&"RUN cargo build --release --locked --bin portico"));
    let copies: Vec<&&str> = final_stage
        .iter()
        .filter(|l| l.starts_with("COPY"))
        .collect();
    assert_eq!(
        copies,
        [&"COPY --from=build /src/target/release/portico /portico"],
        "only the binary"
    );
    assert!(final_stage.contains(&"USER 65532:65532"));
    assert!(final_stage.contains(&"ENTRYPOINT [\"/portico\"]"));
    // The image is built with the tree's cargo settings (jemalloc's compiled-in options are
    // in .cargo/config.toml): the builder copies them before it builds.
    let build_stage: Vec<&str> = instructions
        .iter()
        .copied()
        .take_while(|l| !l.starts_with("FROM gcr.io"))
        .collect();
    let copy_cargo = build_stage
        .iter()
        .position(|l| *l == "COPY .cargo ./.cargo")
        .expect("the builder copies .cargo/");
    let build = build_stage
        .iter()
        .position(|l| l.starts_with("RUN cargo build"))
        .expect("the builder builds");
    assert!(
        copy_cargo < build,
        "cargo settings are in place before the build"
    );
    assert!(root().join(".cargo/config.toml").exists());
    // The build context is Cargo.toml, Cargo.lock, .cargo/ and src/ only: nothing in src/ may
    // pull in a file from elsewhere, and there is no build script.
    let ignore = read(&root().join(".dockerignore"));
    for keep in [
        "!Cargo.toml",
        "!Cargo.lock",
        "!.cargo/",
        "!src/",
        "!benches/",
    ] {
        assert!(
            ignore.lines().any(|l| l == keep),
            ".dockerignore keeps {keep}"
        );
    }
    assert!(!root().join("build.rs").exists());
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = read(&path);
                for (n, line) in text.lines().enumerate() {
                    if line.contains("include_str!(\"..") || line.contains("include_bytes!(\"..") {
                        panic!("{}:{}: includes a file outside src/", path.display(), n + 1);
                    }
                }
            }
        }
    }
}

/// The builder stage's build context (what its `COPY` lines bring in, each kept by
/// `.dockerignore`) is a manifest cargo accepts: cargo checks every declared target exists
/// before building any, so a missing `benches/` failed `make image` although `--bin` asks for
/// the binary only. `cargo fetch --offline` reads the manifest the same way without compiling.
#[test]
fn the_image_build_context_is_a_complete_cargo_project() {
    let dockerfile = read(&root().join("Dockerfile"));
    let ignore = read(&root().join(".dockerignore"));
    let ctx = tempfile::tempdir().expect("tempdir");
    let mut copied = Vec::new();
    for line in dockerfile
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("FROM gcr.io"))
    {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        let args: Vec<&str> = args.split_whitespace().collect();
        let (dest, sources) = args.split_last().expect("COPY has a destination");
        for src in sources {
            let kept = format!("!{}", src.trim_end_matches('/'));
            assert!(
                ignore.lines().any(|l| l.trim_end_matches('/') == kept),
                "{src} is copied but .dockerignore leaves it out of the context"
            );
            // `COPY a b ./` puts each source in the work directory; `COPY src ./dir` renames.
            let to = match *dest {
                "./" => ctx.path().join(src),
                d => ctx.path().join(d.trim_start_matches("./")),
            };
            copy_tree(&root().join(src), &to);
            copied.push(src.to_string());
        }
    }
    assert!(copied.iter().any(|c| c == "src"), "{copied:?}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["fetch", "--offline", "--locked"])
        .current_dir(ctx.path())
        .output()
        .expect("run cargo fetch");
    assert!(
        out.status.success(),
        "the image's build context is not a buildable project: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        fs::create_dir_all(to).expect("mkdir");
        for entry in fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("entry");
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::copy(from, to).expect("copy");
    }
}

#[test]
fn github_workflow_runs_make_test_and_the_kind_e2e() {
    let wf: Value =
        serde_saphyr::from_str(&read(&root().join(".github/workflows/ci.yml"))).expect("ci.yml");
    let runs = |job: &str| -> Vec<String> {
        wf["jobs"][job]["steps"]
            .as_array()
            .unwrap_or_else(|| panic!("job {job} has steps"))
            .iter()
            .filter_map(|s| s["run"].as_str().map(str::to_string))
            .collect()
    };
    assert!(runs("test").iter().any(|r| r == "make test"));
    assert!(
        runs("kind")
            .iter()
            .any(|r| r == "make kind-up kind-load deploy e2e")
    );
    // Every make target the workflow and README name exists in the Makefile.
    let makefile = read(&root().join("Makefile"));
    for target in [
        "test:",
        "tools:",
        "manifests:",
        "image:",
        "kind-up:",
        "kind-load:",
        "deploy:",
        "e2e:",
        "kind-down:",
    ] {
        assert!(
            makefile.lines().any(|l| l.starts_with(target)),
            "Makefile target {target}"
        );
    }
    // `make test` (what `.ci/run` runs) fetches helm first, so a fresh machine has it.
    let test_line = makefile
        .lines()
        .find(|l| l.starts_with("test:"))
        .expect("test target");
    assert!(
        test_line.split_whitespace().any(|w| w == "tools"),
        "{test_line}"
    );
}
