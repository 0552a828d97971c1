//! [`Svc`]: the part of a core/v1 `Service` that portico reads, built by `From<&Service>` /
//! `From<Service>`. Sources convert as soon as they have an object and keep only this form
//! (issue 6: the k8s-openapi `Service`, with its `ServiceSpec` of some thirty optional fields
//! and its label and annotation maps, was 600 bytes per Service held with 10 000 Ingresses
//! loaded), the same pattern as [`super::Slice`].
//!
//! Owns: which Service fields portico depends on. Translate reads the identity, whether the
//! type is `ExternalName` and the ports (name, port, whether `appProtocol` is
//! `kubernetes.io/h2c`). The controller's status writer reads the `--publish-service` Service
//! from the same store, so its addresses (`status.loadBalancer.ingress`, `spec.externalIPs`,
//! `spec.clusterIP`) are kept too; nothing else is. Must not import tokio, hyper, kube or the
//! filesystem.

use k8s_openapi::api::core::v1::Service;

use super::backends::APP_PROTOCOL_H2C;
use super::index;

/// A Service as portico reads it. Field order is comparison order (`Ord` picks one of two
/// different objects sharing a name, deterministically).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Svc {
    /// `metadata.namespace`; `default` when absent, as translate reads every object.
    namespace: Box<str>,
    /// `metadata.name` (empty when absent).
    name: Box<str>,
    /// `metadata.resourceVersion` when the source has one (the controller's store key carries
    /// it); translate does not read it.
    resource_version: Option<Box<str>>,
    /// `spec.type` is `ExternalName` (refused unless enabled, brief §4.3).
    external_name: bool,
    /// `spec.type` is `LoadBalancer` (status writer: its cluster IP is never published).
    load_balancer_type: bool,
    /// `spec.ports`, in object order.
    ports: Box<[SvcPort]>,
    /// `status.loadBalancer.ingress` entries that carry an IP or a hostname (status writer).
    load_balancer: Box<[LoadBalancerIngress]>,
    /// `spec.externalIPs` (status writer).
    external_ips: Box<[Box<str>]>,
    /// `spec.clusterIP` as written (`None` when absent; may be `"None"` for a headless Service)
    /// (status writer).
    cluster_ip: Option<Box<str>>,
}

/// One `ServicePort`: what an Ingress backend selects it by and how to speak to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SvcPort {
    /// `name`; an empty name is `None` (an Ingress cannot select a port by an empty name, and
    /// an unnamed Service port matches an unnamed EndpointSlice port).
    pub name: Option<Box<str>>,
    /// `port` (the Service's own port number, what `service.port.number` selects).
    pub port: i32,
    /// `appProtocol` is `kubernetes.io/h2c` (KEP-3726): speak HTTP/2 cleartext upstream
    /// unless the `backend-protocol` annotation says otherwise. Any other value is HTTP/1.1.
    pub h2c: bool,
}

/// One `status.loadBalancer.ingress` entry (`LoadBalancerIngress`): an IP, a hostname or both.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LoadBalancerIngress {
    pub ip: Option<Box<str>>,
    pub hostname: Option<Box<str>>,
}

impl Svc {
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    /// `spec.type` is `ExternalName`.
    pub fn is_external_name(&self) -> bool {
        self.external_name
    }

    pub fn ports(&self) -> &[SvcPort] {
        &self.ports
    }

    /// `status.loadBalancer.ingress`, without entries that carry neither IP nor hostname.
    pub fn load_balancer_ingress(&self) -> &[LoadBalancerIngress] {
        &self.load_balancer
    }

    pub fn external_ips(&self) -> &[Box<str>] {
        &self.external_ips
    }

    pub fn cluster_ip(&self) -> Option<&str> {
        self.cluster_ip.as_deref()
    }

    /// `spec.type` is `LoadBalancer`.
    pub fn is_load_balancer(&self) -> bool {
        self.load_balancer_type
    }
}

impl From<Service> for Svc {
    fn from(svc: Service) -> Self {
        Svc::from(&svc)
    }
}

impl From<&Service> for Svc {
    fn from(svc: &Service) -> Self {
        let meta = &svc.metadata;
        let spec = svc.spec.as_ref();
        let ports = spec
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
            .iter()
            // HTTP runs over TCP: a UDP or SCTP port (which may share its number with the TCP
            // one, as DNS's 53 does) is never a backend. `protocol` defaults to TCP.
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .map(|p| SvcPort {
                name: p.name.as_deref().filter(|n| !n.is_empty()).map(Box::from),
                port: p.port,
                h2c: p.app_protocol.as_deref() == Some(APP_PROTOCOL_H2C),
            })
            .collect();
        let load_balancer = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default()
            .iter()
            .filter(|i| i.ip.is_some() || i.hostname.is_some())
            .map(|i| LoadBalancerIngress {
                ip: i.ip.as_deref().map(Box::from),
                hostname: i.hostname.as_deref().map(Box::from),
            })
            .collect();
        let external_ips = spec
            .and_then(|s| s.external_ips.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|ip| Box::from(ip.as_str()))
            .collect();
        Svc {
            namespace: index::namespace(meta).into(),
            name: index::name(meta).into(),
            resource_version: meta.resource_version.as_deref().map(Box::from),
            external_name: spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName"),
            load_balancer_type: spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer"),
            ports,
            load_balancer,
            external_ips,
            cluster_ip: spec.and_then(|s| s.cluster_ip.as_deref()).map(Box::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Svc {
        let s: Service = serde_json::from_value(v).expect("valid Service");
        Svc::from(s)
    }

    #[test]
    fn keeps_identity_type_ports_and_addresses() {
        let s = parse(json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "9",
                         "labels": {"app": "web"}, "annotations": {"a": "b"}},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.10",
                "externalIPs": ["192.0.2.5"],
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                    {"name": "grpc", "port": 9000, "appProtocol": "kubernetes.io/h2c"},
                    {"port": 81, "appProtocol": "kubernetes.io/ws"},
                    {"name": "", "port": 82},
                ],
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "203.0.113.7"}, {"hostname": "edge.example.net"}, {}
            ]}},
        }));
        assert_eq!(
            (s.namespace(), s.name(), s.resource_version()),
            ("shop", "web", Some("9"))
        );
        assert!(!s.is_external_name());
        let ports: Vec<_> = s
            .ports()
            .iter()
            .map(|p| (p.name.as_deref(), p.port, p.h2c))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("http"), 80, false),
                (Some("grpc"), 9000, true),
                (None, 81, false),
                (None, 82, false),
            ],
            "object order; empty name is no name; only kubernetes.io/h2c is h2c"
        );
        // An entry with neither IP nor hostname carries no address: dropped.
        assert_eq!(
            s.load_balancer_ingress(),
            [
                LoadBalancerIngress {
                    ip: Some("203.0.113.7".into()),
                    hostname: None
                },
                LoadBalancerIngress {
                    ip: None,
                    hostname: Some("edge.example.net".into())
                },
            ]
        );
        let ext: Vec<&str> = s.external_ips().iter().map(|a| &**a).collect();
        assert_eq!(ext, ["192.0.2.5"]);
        assert_eq!(s.cluster_ip(), Some("10.96.0.10"));
    }

    #[test]
    fn external_name_and_empty_service() {
        let ext = parse(json!({
            "metadata": {"name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "example.org", "clusterIP": "None"},
        }));
        assert_eq!(ext.namespace(), "default", "no namespace means default");
        assert!(ext.is_external_name());
        assert!(ext.ports().is_empty());
        assert_eq!(ext.cluster_ip(), Some("None"), "kept as written");

        let empty = Svc::from(Service::default());
        assert_eq!((empty.namespace(), empty.name()), ("default", ""));
        assert!(!empty.is_external_name());
        assert!(empty.ports().is_empty() && empty.load_balancer_ingress().is_empty());
        assert!(empty.external_ips().is_empty());
        assert_eq!((empty.resource_version(), empty.cluster_ip()), (None, None));
    }

    #[test]
    fn owned_and_borrowed_conversions_agree_and_unread_fields_do_not_count() {
        let raw: Service = serde_json::from_value(json!({
            "metadata": {"namespace": "b", "name": "s", "labels": {"x": "1"}},
            "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": "a"}},
        }))
        .expect("valid");
        let by_ref = Svc::from(&raw);
        let mut relabelled = raw.clone();
        relabelled.metadata.labels = None;
        if let Some(spec) = relabelled.spec.as_mut() {
            spec.selector = None;
            spec.session_affinity = Some("ClientIP".into());
        }
        assert_eq!(
            Svc::from(relabelled),
            by_ref,
            "labels, selector, affinity are not kept"
        );
        assert_eq!(Svc::from(raw), by_ref);
    }
}
