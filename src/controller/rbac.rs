//! The Kubernetes API access the controller needs, as data: one [`ApiNeed`] per (group,
//! resource), with verbs, where the permission must be granted and why. `docs/rbac.md` is
//! rendered from [`API_NEEDS`] by [`markdown`] (a test keeps the two equal), and the chart's
//! ClusterRole/Role are meant to follow the same list.
//!
//! Owns: the list and its rendering. Must not import anything beyond std: it is plain data, so
//! tests, docs and (later) a `portico rbac` printer can all use it.

use std::fmt::Write as _;

/// Where a permission has to be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// A cluster-scoped resource: needs a ClusterRole.
    Cluster,
    /// Namespaced, in every watched namespace: a ClusterRole when `--watch-namespace` is absent
    /// (all namespaces), else a Role in each listed namespace.
    WatchedNamespaces,
    /// Namespaced, only in the `--lease-namespace` (a Role there is enough).
    LeaseNamespace,
    /// The `--lease-name` Lease itself (a Role in the lease namespace, narrowed to it by
    /// `resourceNames`).
    LeaseObject,
    /// Namespaced, only in the namespace of `--publish-service` (a Role there is enough).
    PublishServiceNamespace,
    /// The `default` namespace, when `--watch-namespace` leaves it out: Events about
    /// cluster-scoped objects (an IngressClass) go there, as client-go puts them.
    ClusterEventsNamespace,
    /// The namespace of the `--default-certificate` Secret, when it is not watched (a Role
    /// there; the Secret's own rule is narrowed to it by `resourceNames`: the watcher selects
    /// it by `metadata.name`).
    DefaultCertificateNamespace,
}

impl Scope {
    /// Short text used in `docs/rbac.md`.
    pub fn describe(self) -> &'static str {
        match self {
            Scope::Cluster => "cluster",
            Scope::WatchedNamespaces => "watched namespaces",
            Scope::LeaseNamespace => "lease namespace",
            Scope::LeaseObject => "the --lease-name Lease (lease namespace, resourceNames)",
            Scope::ClusterEventsNamespace => "`default` (when --watch-namespace leaves it out)",
            Scope::PublishServiceNamespace => "publish-service namespace",
            Scope::DefaultCertificateNamespace => {
                "default-certificate namespace (when not watched)"
            }
        }
    }
}

/// One permission the controller needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiNeed {
    /// API group; `""` is the core group.
    pub group: &'static str,
    /// Plural resource name, with `/subresource` where it is one (`ingresses/status`).
    pub resource: &'static str,
    /// Kubernetes verbs (RBAC names): get, list, watch, create, update, patch.
    pub verbs: &'static [&'static str],
    pub scope: Scope,
    /// Which part of portico uses it, and for what.
    pub why: &'static str,
}

/// Everything the controller calls. Reflected kinds need `list` + `watch` (kube's watcher
/// lists, then watches from the list's resourceVersion; it never `get`s single objects);
/// Secrets also need `get` (referenced Secrets' data is fetched one by one). The status writer, Events and the leader lease are listed with the verbs issue 3
/// names for them; whoever writes those parts adjusts their entries to what the code calls.
pub const API_NEEDS: &[ApiNeed] = &[
    ApiNeed {
        group: "networking.k8s.io",
        resource: "ingresses",
        verbs: &["list", "watch"],
        scope: Scope::WatchedNamespaces,
        why: "source: reflector on Ingress (the routes)",
    },
    ApiNeed {
        group: "networking.k8s.io",
        resource: "ingressclasses",
        verbs: &["list", "watch"],
        scope: Scope::Cluster,
        why: "source: reflector on IngressClass (which Ingresses are ours, default class)",
    },
    ApiNeed {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
        scope: Scope::WatchedNamespaces,
        why: "source: reflector on Service (backend ports, ExternalName)",
    },
    ApiNeed {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
        scope: Scope::WatchedNamespaces,
        why: "source: reflector on EndpointSlice (pod endpoints we balance over)",
    },
    ApiNeed {
        group: "",
        resource: "secrets",
        verbs: &["get", "list", "watch"],
        scope: Scope::WatchedNamespaces,
        why: "source: reflector on Secret with fieldSelector type=kubernetes.io/tls, metadata \
              only (RBAC cannot narrow by type; the API still sends whole TLS Secrets, keys \
              included, on list and watch, so this grant reads every TLS key in scope, as \
              ingress-nginx's does); get fetches tls.crt/tls.key of the Secrets an \
              Ingress of our class or --default-certificate references, the only key material \
              kept in memory (a referenced Secret not listed is fetched for its type only, to \
              report a wrong type)",
    },
    ApiNeed {
        group: "portico.dev",
        resource: "ratelimitpolicies",
        verbs: &["list", "watch"],
        scope: Scope::WatchedNamespaces,
        why: "source: reflector on RateLimitPolicy (without the CRD the list is a 404 and \
              portico serves without policies until it is installed; without this grant the \
              source never syncs)",
    },
    ApiNeed {
        group: "networking.k8s.io",
        resource: "ingresses/status",
        verbs: &["patch"],
        scope: Scope::WatchedNamespaces,
        why: "status writer (leader only): Ingress status.loadBalancer",
    },
    ApiNeed {
        group: "portico.dev",
        resource: "ratelimitpolicies/status",
        verbs: &["patch"],
        scope: Scope::WatchedNamespaces,
        why: "status writer (leader only): RateLimitPolicy Accepted condition",
    },
    ApiNeed {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create"],
        scope: Scope::WatchedNamespaces,
        why: "events: diagnostics as Events on the object they are about (its namespace)",
    },
    ApiNeed {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create"],
        scope: Scope::ClusterEventsNamespace,
        why: "events: diagnostics about cluster-scoped objects (an IngressClass) as Events in \
              `default`",
    },
    ApiNeed {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create"],
        scope: Scope::LeaseNamespace,
        why: "leader election: creates the --lease-name Lease when it does not exist (create \
              cannot be narrowed to one name)",
    },
    ApiNeed {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "update"],
        scope: Scope::LeaseObject,
        why: "leader election: reads and renews the --lease-name Lease, and no other",
    },
    ApiNeed {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
        scope: Scope::PublishServiceNamespace,
        why: "source: reflector on the --publish-service Service (fieldSelector metadata.name) \
              when its namespace is not watched; the status writer reads its address from it",
    },
    ApiNeed {
        group: "",
        resource: "secrets",
        verbs: &["get", "list", "watch"],
        scope: Scope::DefaultCertificateNamespace,
        why: "source: reflector on the --default-certificate Secret (fieldSelector \
              metadata.name, and resourceNames: that Secret only) when its namespace is not \
              watched; get fetches its tls.crt/tls.key",
    },
    ApiNeed {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create"],
        scope: Scope::DefaultCertificateNamespace,
        why: "events: a diagnostic about the --default-certificate Secret is an Event in its \
              namespace",
    },
];

/// The needs for one (group, resource) in one scope, if listed.
pub fn find(group: &str, resource: &str, scope: Scope) -> Option<&'static ApiNeed> {
    API_NEEDS
        .iter()
        .find(|n| n.group == group && n.resource == resource && n.scope == scope)
}

/// `docs/rbac.md`, rendered from [`API_NEEDS`].
pub fn markdown() -> String {
    let mut out = String::new();
    out.push_str("# RBAC: what portico calls on the Kubernetes API\n\n");
    out.push_str(
        "Generated from `API_NEEDS` in `src/controller/rbac.rs`; a test keeps this file equal to \
         it (`cargo test --test controller_source rbac_doc`).\n\n",
    );
    out.push_str(
        "Scope: *cluster* needs a ClusterRole; *watched namespaces* needs a ClusterRole when \
         `--watch-namespace` is absent, else a Role in each listed namespace; *lease namespace* \
         and *publish-service namespace* need a Role in that one namespace.\n\n",
    );
    out.push_str("| API group | Resource | Verbs | Scope | Why |\n");
    out.push_str("|---|---|---|---|---|\n");
    for n in API_NEEDS {
        let group = if n.group.is_empty() {
            "\"\" (core)"
        } else {
            n.group
        };
        let why = n.why.split_whitespace().collect::<Vec<_>>().join(" ");
        // `writeln!` into a String cannot fail.
        let _ = writeln!(
            out,
            "| {group} | {} | {} | {} | {why} |",
            n.resource,
            n.verbs.join(", "),
            n.scope.describe(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_duplicate_entries_and_known_verbs() {
        let known = [
            "get", "list", "watch", "create", "update", "patch", "delete",
        ];
        for (i, a) in API_NEEDS.iter().enumerate() {
            assert!(!a.verbs.is_empty(), "{} has no verbs", a.resource);
            for v in a.verbs {
                assert!(known.contains(v), "{}: unknown verb {v}", a.resource);
            }
            for b in &API_NEEDS[i + 1..] {
                assert!(
                    !(a.group == b.group && a.resource == b.resource && a.scope == b.scope),
                    "{}/{} listed twice in one scope",
                    a.group,
                    a.resource
                );
            }
        }
    }

    #[test]
    fn markdown_has_one_row_per_need() {
        let md = markdown();
        let rows = md.lines().filter(|l| l.starts_with("| ")).count();
        // One header row plus one per need.
        assert_eq!(rows, API_NEEDS.len() + 1);
        assert!(md.contains("| coordination.k8s.io | leases | create | lease namespace |"));
    }
}
