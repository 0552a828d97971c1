//! [`Slice`]: the part of a discovery.k8s.io/v1 `EndpointSlice` that translate reads, built by
//! `From<&EndpointSlice>` / `From<EndpointSlice>`. Sources convert as soon as they have an
//! object and keep only this form (issue 6: the k8s-openapi `Endpoint` is 352 bytes, one per pod,
//! and was most of the memory held with 10 000 Ingresses loaded).
//!
//! Owns: which EndpointSlice fields translate depends on, and the per-endpoint rules that can be
//! applied once per object instead of once per build (address parsing by `addressType`, the
//! usable-endpoint conditions of brief §4.3). Must not import tokio, hyper, kube or the
//! filesystem.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::backends::SERVICE_NAME_LABEL;
use super::index;

/// An EndpointSlice as translate reads it: identity, its Service (label
/// `kubernetes.io/service-name`), address family, ports and the usable endpoints.
///
/// Endpoints that are neither ready nor serving-and-terminating are dropped on conversion:
/// translate never uses them, not even for a diagnostic. Addresses are parsed here, by the
/// slice's `addressType`, so a rebuild never parses them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// `metadata.namespace`; `default` when absent, as translate reads every object.
    namespace: Box<str>,
    /// `metadata.name` (empty when absent).
    name: Box<str>,
    /// `metadata.resourceVersion` when the source has one (the controller's store key carries
    /// it); translate does not read it.
    resource_version: Option<Box<str>>,
    /// The `kubernetes.io/service-name` label: the Service this slice belongs to.
    service: Option<Box<str>>,
    address_type: AddressType,
    /// In object order: the first port of a name is the one used.
    ports: Box<[SlicePort]>,
    /// One entry per usable address, in object order.
    endpoints: Box<[SliceEndpoint]>,
    /// Addresses of usable endpoints that are not valid for `address_type` (each becomes a
    /// warning when a backend reads this slice).
    invalid_addresses: Box<[Box<str>]>,
    /// `metadata.uid`, kept only when there are invalid addresses: their warnings become
    /// Events, which `kubectl describe` finds by the object's uid.
    uid_if_invalid: Option<Box<str>>,
}

/// `EndpointSlice.addressType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
    /// `FQDN` (deprecated) or anything else: portico balances over IPs only, so such a slice
    /// feeds no backend.
    Other,
}

impl AddressType {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressType::IPv4 => "IPv4",
            AddressType::IPv6 => "IPv6",
            AddressType::Other => "other",
        }
    }
}

/// `EndpointPort`: the name (empty when unnamed) and the port, `None` when absent, zero or out of
/// the TCP range (such a port serves nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Box<str>,
    pub port: Option<u16>,
}

/// One usable address of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addr: IpAddr,
    /// `conditions.ready` is not `false`; otherwise the endpoint is serving and terminating
    /// (only used when a backend has no ready endpoint: graceful drain, brief §4.3).
    pub ready: bool,
}

impl Slice {
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    /// The Service this slice belongs to (label `kubernetes.io/service-name`).
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }

    pub fn address_type(&self) -> AddressType {
        self.address_type
    }

    pub fn ports(&self) -> &[SlicePort] {
        &self.ports
    }

    pub fn endpoints(&self) -> &[SliceEndpoint] {
        &self.endpoints
    }

    pub fn invalid_addresses(&self) -> &[Box<str>] {
        &self.invalid_addresses
    }

    /// `metadata.uid` when [`Self::invalid_addresses`] is not empty, else "".
    pub fn uid_if_invalid(&self) -> &str {
        self.uid_if_invalid.as_deref().unwrap_or_default()
    }
}

impl From<EndpointSlice> for Slice {
    fn from(slice: EndpointSlice) -> Self {
        Slice::from(&slice)
    }
}

impl From<&EndpointSlice> for Slice {
    fn from(slice: &EndpointSlice) -> Self {
        let meta = &slice.metadata;
        let address_type = match slice.address_type.as_str() {
            "IPv4" => AddressType::IPv4,
            "IPv6" => AddressType::IPv6,
            _ => AddressType::Other,
        };
        let mut ports = Vec::new();
        let mut endpoints = Vec::new();
        let mut invalid = Vec::new();
        // An `Other` slice is never read past its address type: keep nothing else of it.
        if address_type != AddressType::Other {
            ports = slice
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|p| SlicePort {
                    name: p.name.as_deref().unwrap_or_default().into(),
                    port: p
                        .port
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p != 0),
                })
                .collect();
            for ep in slice.endpoints.as_deref().unwrap_or_default() {
                // EndpointConditions (discovery/v1): a nil `ready` means ready ("consumers
                // should interpret this unknown state as ready"), and for a nil `serving`
                // "consumers should defer to the ready condition"; `serving` and `terminating`
                // together mark a draining endpoint (used only when none is ready).
                let cond = ep.conditions.as_ref();
                let ready = cond.and_then(|c| c.ready) != Some(false);
                let draining =
                    cond.is_some_and(|c| c.serving.unwrap_or(ready) && c.terminating == Some(true));
                if !ready && !draining {
                    continue;
                }
                for raw in &ep.addresses {
                    let ip = if address_type == AddressType::IPv4 {
                        raw.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
                    } else {
                        raw.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
                    };
                    match ip {
                        Some(addr) => endpoints.push(SliceEndpoint { addr, ready }),
                        None => invalid.push(Box::from(raw.as_str())),
                    }
                }
            }
        }
        Slice {
            namespace: index::namespace(meta).into(),
            name: index::name(meta).into(),
            resource_version: meta.resource_version.as_deref().map(Box::from),
            service: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(|s| Box::from(s.as_str())),
            address_type,
            ports: ports.into_boxed_slice(),
            endpoints: endpoints.into_boxed_slice(),
            uid_if_invalid: meta
                .uid
                .as_deref()
                .filter(|_| !invalid.is_empty())
                .map(Box::from),
            invalid_addresses: invalid.into_boxed_slice(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Slice {
        let s: EndpointSlice = serde_json::from_value(v).expect("valid EndpointSlice");
        Slice::from(s)
    }

    #[test]
    fn keeps_identity_service_ports_and_usable_parsed_endpoints() {
        let s = parse(json!({
            "metadata": {"name": "web-1", "resourceVersion": "7", "uid": "slice-uid",
                         "labels": {"kubernetes.io/service-name": "web", "other": "x"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"port": 0}, {"name": "big", "port": 70000},
                      {"name": "http", "port": 9090}],
            "endpoints": [
                {"addresses": ["10.0.0.1", "10.0.0.2"]},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.4"],
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["fd00::1", "bogus"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": false, "serving": true}},
            ],
        }));
        assert_eq!(
            (s.namespace(), s.name(), s.resource_version(), s.service()),
            ("default", "web-1", Some("7"), Some("web"))
        );
        assert_eq!(s.address_type(), AddressType::IPv4);
        let ports: Vec<_> = s.ports().iter().map(|p| (&*p.name, p.port)).collect();
        // Order kept (the first of a name decides); zero and out-of-range ports are unusable.
        assert_eq!(
            ports,
            [
                ("http", Some(8080)),
                ("", None),
                ("big", None),
                ("http", Some(9090))
            ]
        );
        let v4 = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
        assert_eq!(
            s.endpoints(),
            [
                SliceEndpoint {
                    addr: v4(1),
                    ready: true
                },
                SliceEndpoint {
                    addr: v4(2),
                    ready: true
                },
                SliceEndpoint {
                    addr: v4(4),
                    ready: false
                },
            ],
            "not-ready endpoints that are not draining are dropped"
        );
        // An IPv6 address in an IPv4 slice is as invalid as a name.
        let invalid: Vec<&str> = s.invalid_addresses().iter().map(|a| &**a).collect();
        assert_eq!(invalid, ["fd00::1", "bogus"]);
        assert_eq!(s.uid_if_invalid(), "slice-uid");
    }

    #[test]
    fn fqdn_slice_keeps_nothing_but_its_identity() {
        let s = parse(json!({
            "metadata": {"namespace": "a", "name": "ext", "uid": "ext-uid",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "FQDN",
            "ports": [{"name": "http", "port": 80}],
            "endpoints": [{"addresses": ["example.com"]}],
        }));
        assert_eq!(s.address_type(), AddressType::Other);
        assert_eq!((s.namespace(), s.service()), ("a", Some("web")));
        assert!(s.ports().is_empty() && s.endpoints().is_empty());
        assert!(s.invalid_addresses().is_empty());
        assert_eq!(s.uid_if_invalid(), "", "kept only for invalid addresses");
    }

    #[test]
    fn owned_and_borrowed_conversions_agree() {
        let raw: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "b", "name": "s"},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00::2"]}],
        }))
        .expect("valid");
        let by_ref = Slice::from(&raw);
        assert_eq!(by_ref.service(), None, "no label: feeds no backend");
        assert_eq!(Slice::from(raw), by_ref);
    }
}
