//! Table-driven tests of translate: one named case per Ingress rule (brief §5). Behaviour is
//! asserted through `Snapshot::route()` and `TlsTable::resolve()` wherever possible.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::*;
use crate::model::{
    PathKind, Route, RoutePolicy, RouteTarget, Snapshot, SslRedirect, UpstreamProtocol, describe,
    normalize_host,
};

// ---------------------------------------------------------------------------------------------
// Object builders
// ---------------------------------------------------------------------------------------------

fn from<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

/// Ingress builder: `Ing::new("ns", "name").rule(...).build()`. Class `portico` by default.
#[derive(Clone)]
struct Ing {
    meta: Value,
    spec: Value,
}

impl Ing {
    fn new(ns: &str, name: &str) -> Self {
        Ing {
            meta: json!({"namespace": ns, "name": name, "annotations": {}}),
            spec: json!({"ingressClassName": "portico", "rules": [], "tls": []}),
        }
    }
    /// No `ingressClassName` at all.
    fn no_class(mut self) -> Self {
        if let Some(m) = self.spec.as_object_mut() {
            m.remove("ingressClassName");
        }
        self
    }
    fn class(mut self, c: &str) -> Self {
        self.spec["ingressClassName"] = json!(c);
        self
    }
    fn ann(mut self, k: &str, v: &str) -> Self {
        self.meta["annotations"][k] = json!(v);
        self
    }
    fn created(mut self, ts: &str) -> Self {
        self.meta["creationTimestamp"] = json!(ts);
        self
    }
    /// A rule with `(pathType, path, service, port)` paths; `port` is a number or a name.
    fn rule(mut self, host: Option<&str>, paths: &[(&str, &str, &str, Value)]) -> Self {
        let paths: Vec<Value> = paths
            .iter()
            .map(|(t, p, svc, port)| {
                let port = if port.is_number() {
                    json!({"number": port})
                } else {
                    json!({"name": port})
                };
                json!({"pathType": t, "path": p,
                       "backend": {"service": {"name": svc, "port": port}}})
            })
            .collect();
        let mut rule = json!({"http": {"paths": paths}});
        if let Some(h) = host {
            rule["host"] = json!(h);
        }
        self.spec["rules"]
            .as_array_mut()
            .expect("rules array")
            .push(rule);
        self
    }
    /// A rule with one raw path object (for missing fields, resource backends...).
    fn raw_path(mut self, host: &str, path: Value) -> Self {
        self.spec["rules"]
            .as_array_mut()
            .expect("rules array")
            .push(json!({"host": host, "http": {"paths": [path]}}));
        self
    }
    fn path(self, host: &str, t: &str, p: &str, svc: &str, port: Value) -> Self {
        self.rule(Some(host), &[(t, p, svc, port)])
    }
    fn tls(mut self, hosts: Option<&[&str]>, secret: &str) -> Self {
        let mut e = json!({"secretName": secret});
        if let Some(h) = hosts {
            e["hosts"] = json!(h);
        }
        self.spec["tls"].as_array_mut().expect("tls array").push(e);
        self
    }
    fn default_backend(mut self, svc: &str, port: i32) -> Self {
        self.spec["defaultBackend"] = json!({"service": {"name": svc, "port": {"number": port}}});
        self
    }
    fn build(self) -> Ingress {
        from(
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                    "metadata": self.meta, "spec": self.spec}),
        )
    }
}

/// Service with `(name, port)` ports; an empty name leaves the port unnamed.
fn svc(ns: &str, name: &str, ports: &[(&str, i32)]) -> Service {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| {
            if n.is_empty() {
                json!({"port": p})
            } else {
                json!({"name": n, "port": p})
            }
        })
        .collect();
    from(json!({"metadata": {"namespace": ns, "name": name}, "spec": {"ports": ports}}))
}

fn svc_app_protocol(ns: &str, name: &str, port: i32, app: &str) -> Service {
    from(json!({"metadata": {"namespace": ns, "name": name},
                "spec": {"ports": [{"name": "grpc", "port": port, "appProtocol": app}]}}))
}

fn svc_external(ns: &str, name: &str) -> Service {
    from(json!({"metadata": {"namespace": ns, "name": name},
                "spec": {"type": "ExternalName", "externalName": "example.org",
                         "ports": [{"name": "http", "port": 80}]}}))
}

/// Endpoint with optional `ready`, `serving`, `terminating` conditions (`None` = absent).
fn ep(addr: &str, ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Value {
    let mut c = serde_json::Map::new();
    if let Some(r) = ready {
        c.insert("ready".into(), json!(r));
    }
    if let Some(s) = serving {
        c.insert("serving".into(), json!(s));
    }
    if let Some(t) = terminating {
        c.insert("terminating".into(), json!(t));
    }
    json!({"addresses": [addr], "conditions": c})
}

fn ready(addr: &str) -> Value {
    ep(addr, Some(true), Some(true), Some(false))
}

/// EndpointSlice of Service `service` with `(name, port)` ports ("" = unnamed).
fn slice(
    ns: &str,
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[(&str, i32)],
    endpoints: Vec<Value>,
) -> EndpointSlice {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| {
            if n.is_empty() {
                json!({"port": p})
            } else {
                json!({"name": n, "port": p})
            }
        })
        .collect();
    from(json!({"metadata": {"namespace": ns, "name": name,
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": address_type, "ports": ports, "endpoints": endpoints}))
}

fn class(name: &str, controller: &str, is_default: bool) -> IngressClass {
    let mut meta = json!({"name": name});
    if is_default {
        meta["annotations"] = json!({"ingressclass.kubernetes.io/is-default-class": "true"});
    }
    from(json!({"metadata": meta, "spec": {"controller": controller}}))
}

fn secret(ns: &str, name: &str, type_: &str, data: &[(&str, &[u8])]) -> Secret {
    let mut s: Secret = from(json!({"metadata": {"namespace": ns, "name": name}, "type": type_}));
    s.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.to_vec())))
            .collect(),
    );
    s
}

/// A self-signed certificate and its key, PEM.
fn cert(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// A self-signed certificate valid from January 1st of `from` to January 1st of `until`.
fn tls_secret_valid(ns: &str, name: &str, names: &[&str], from: i32, until: i32) -> Secret {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).expect("params");
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    let (c, k) = (cert.pem(), key.serialize_pem());
    secret(
        ns,
        name,
        "kubernetes.io/tls",
        &[("tls.crt", c.as_bytes()), ("tls.key", k.as_bytes())],
    )
}

fn tls_secret(ns: &str, name: &str, names: &[&str]) -> Secret {
    let (c, k) = cert(names);
    secret(
        ns,
        name,
        "kubernetes.io/tls",
        &[("tls.crt", c.as_bytes()), ("tls.key", k.as_bytes())],
    )
}

/// The objects of one test case.
#[derive(Default, Clone)]
struct World(Inputs);

impl World {
    /// Service `web` (port `http`: 80 → 8080) with one ready endpoint 10.0.0.1, in `default`.
    fn web() -> Self {
        World::default().web_in("default")
    }
    fn web_in(self, ns: &str) -> Self {
        self.svc(svc(ns, "web", &[("http", 80)])).slice(slice(
            ns,
            "web-1",
            "web",
            "IPv4",
            &[("http", 8080)],
            vec![ready("10.0.0.1")],
        ))
    }
    fn ing(mut self, i: Ing) -> Self {
        self.0.ingresses.push(Arc::new(i.build()));
        self
    }
    fn svc(mut self, s: Service) -> Self {
        self.0.services.push(Arc::new(Svc::from(s)));
        self
    }
    fn slice(mut self, s: EndpointSlice) -> Self {
        self.0.endpoint_slices.push(Arc::new(Slice::from(s)));
        self
    }
    fn secret(mut self, s: Secret) -> Self {
        self.0.secrets.push(Arc::new(s));
        self
    }
    fn class(mut self, c: IngressClass) -> Self {
        self.0.ingress_classes.push(Arc::new(c));
        self
    }
    fn run(&self) -> (Snapshot, Vec<Diagnostic>) {
        translate(&self.0, &Options::default())
    }
    fn run_with(&self, opts: &Options) -> (Snapshot, Vec<Diagnostic>) {
        translate(&self.0, opts)
    }
}

// ---------------------------------------------------------------------------------------------
// Assertion helpers
// ---------------------------------------------------------------------------------------------

/// Route a request as the proxy would: normalise the host, then `Snapshot::route()`.
fn route<'a>(snap: &'a Snapshot, host: &str, path: &str) -> Option<&'a Arc<Route>> {
    let host = normalize_host(host).expect("host");
    snap.route(&host, path).route
}

/// What a request reaches: `"ns/svc:port"`, `"503"` (unavailable) or `"404"`.
fn hit(snap: &Snapshot, host: &str, path: &str) -> String {
    match route(snap, host, path) {
        None => "404".to_string(),
        Some(r) => match &r.target {
            RouteTarget::Backend(id) => snap
                .backends
                .get(*id)
                .map(|b| b.key.to_string())
                .unwrap_or_else(|| "dangling".to_string()),
            RouteTarget::Unavailable { .. } => "503".to_string(),
        },
    }
}

/// Endpoint addresses a request reaches, as strings.
fn endpoints(snap: &Snapshot, host: &str, path: &str) -> Vec<String> {
    let r = route(snap, host, path).expect("routed");
    let RouteTarget::Backend(id) = r.target else {
        panic!("unavailable route")
    };
    let b = snap.backends.get(id).expect("backend");
    b.endpoints.iter().map(|e| e.addr.to_string()).collect()
}

/// Whether a plain-HTTP request to `host` + `path` gets a 308 to HTTPS, as the proxy decides.
fn redirects(snap: &Snapshot, host: &str, path: &str) -> bool {
    let host = normalize_host(host).expect("host");
    let r = snap.route(&host, path).route.expect("routed");
    r.policy.redirects(&snap.tls, &host)
}

fn reasons(d: &[Diagnostic]) -> Vec<(Severity, &str)> {
    d.iter().map(|d| (d.severity, d.reason.as_str())).collect()
}

fn only(d: &[Diagnostic], sev: Severity, reason: &str) -> Diagnostic {
    assert_eq!(reasons(d), vec![(sev, reason)], "diagnostics: {d:#?}");
    d[0].clone()
}

fn svc80() -> Value {
    json!(80)
}

// ---------------------------------------------------------------------------------------------
// Class
// ---------------------------------------------------------------------------------------------

#[test]
fn class_by_name_equal_to_our_flag() {
    let (s, d) = World::web()
        .ing(Ing::new("default", "a").path("a.test", "Prefix", "/", "web", svc80()))
        .run();
    assert_eq!(hit(&s, "a.test", "/"), "default/web:80");
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn class_by_controller_of_named_ingress_class() {
    let w = World::web()
        .class(class("edge", DEFAULT_CONTROLLER_NAME, false))
        .class(class("nginx", "k8s.io/ingress-nginx", false))
        .ing(Ing::new("default", "ours").class("edge").path(
            "a.test",
            "Prefix",
            "/",
            "web",
            svc80(),
        ))
        .ing(Ing::new("default", "theirs").class("nginx").path(
            "b.test",
            "Prefix",
            "/",
            "web",
            svc80(),
        ))
        // A class name that exists nowhere and is not our flag: not ours.
        .ing(Ing::new("default", "ghost").class("ghost").path(
            "c.test",
            "Prefix",
            "/",
            "web",
            svc80(),
        ));
    let (s, d) = w.run();
    assert_eq!(hit(&s, "a.test", "/"), "default/web:80");
    assert_eq!(hit(&s, "b.test", "/"), "404");
    assert_eq!(hit(&s, "c.test", "/"), "404");
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn class_by_legacy_annotation() {
    let w = World::web()
        .ing(
            Ing::new("default", "legacy")
                .no_class()
                .ann("kubernetes.io/ingress.class", "portico")
                .path("a.test", "Prefix", "/", "web", svc80()),
        )
        .ing(
            Ing::new("default", "other")
                .no_class()
                .ann("kubernetes.io/ingress.class", "nginx")
                .path("b.test", "Prefix", "/", "web", svc80()),
        )
        // Our default class does not capture an Ingress that names another class by annotation.
        .class(class("portico", DEFAULT_CONTROLLER_NAME, true));
    let (s, _) = w.run();
    assert_eq!(hit(&s, "a.test", "/"), "default/web:80");
    assert_eq!(hit(&s, "b.test", "/"), "404");
}

/// Our default class beside another controller's default: a class-less Ingress is served
/// (by both controllers), and our class says so.
#[test]
fn two_default_classes_of_two_controllers_warn_on_ours() {
    let w = World::web()
        .ing(
            Ing::new("default", "plain")
                .no_class()
                .path("a.test", "Prefix", "/", "web", svc80()),
        )
        .class(class("portico", DEFAULT_CONTROLLER_NAME, true))
        .class(class("nginx", "k8s.io/ingress-nginx", true));
    let (s, d) = w.run();
    assert_eq!(hit(&s, "a.test", "/"), "default/web:80");
    let d = only(&d, Severity::Warning, "AmbiguousDefaultClass");
    assert_eq!(
        (d.kind.as_str(), d.name.as_str()),
        ("IngressClass", "portico")
    );
    assert!(d.message.contains("nginx"), "{}", d.message);
    // One default, or only others' defaults: nothing to say.
    let (_, d) = World::web()
        .class(class("portico", DEFAULT_CONTROLLER_NAME, true))
        .class(class("nginx", "k8s.io/ingress-nginx", false))
        .run();
    assert!(d.is_empty(), "{d:?}");
    let (_, d) = World::web()
        .class(class("nginx", "k8s.io/ingress-nginx", true))
        .class(class("haproxy", "haproxy.org/ingress-controller", true))
        .run();
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn class_absent_served_only_by_our_default_class() {
    let ing = Ing::new("default", "plain")
        .no_class()
        .path("a.test", "Prefix", "/", "web", svc80());
    let cases = [
        (
            "our default class",
            Some(class("portico", DEFAULT_CONTROLLER_NAME, true)),
            "default/web:80",
        ),
        (
            "our class, not default",
            Some(class("portico", DEFAULT_CONTROLLER_NAME, false)),
            "404",
        ),
        (
            "someone else's default",
            Some(class("nginx", "k8s.io/ingress-nginx", true)),
            "404",
        ),
        ("no classes at all", None, "404"),
    ];
    for (name, c, want) in cases {
        let mut w = World::web().ing(ing.clone());
        if let Some(c) = c {
            w = w.class(c);
        }
        let (s, d) = w.run();
        assert_eq!(hit(&s, "a.test", "/"), want, "case {name}");
        assert!(d.is_empty(), "case {name}: {d:?}");
    }
}

#[test]
fn class_not_ours_is_ignored_silently_even_when_broken() {
    let (s, d) = World::default()
        .ing(
            Ing::new("default", "x")
                .class("nginx")
                .path("BAD HOST", "Weird", "nope", "missing", svc80())
                .tls(None, "missing"),
        )
        .run();
    assert_eq!(s, Snapshot::default());
    assert!(d.is_empty(), "{d:?}");
}

// ---------------------------------------------------------------------------------------------
// Hosts
// ---------------------------------------------------------------------------------------------

#[test]
fn host_exact_is_case_insensitive_and_ignores_request_port() {
    let (s, d) = World::web()
        .ing(Ing::new("default", "a").path("Shop.Example.COM", "Prefix", "/", "web", svc80()))
        .run();
    assert!(d.is_empty());
    assert!(s.hosts.exact.contains_key("shop.example.com"));
    assert_eq!(hit(&s, "SHOP.example.com:8443", "/x"), "default/web:80");
    assert_eq!(hit(&s, "shop.example.com.", "/x"), "default/web:80");
    assert_eq!(hit(&s, "other.example.com", "/x"), "404");
}

#[test]
fn host_wildcard_matches_exactly_one_label_and_exact_wins() {
    let w = World::web()
        .svc(svc("default", "exact", &[("http", 80)]))
        .ing(Ing::new("default", "w").path("*.example.com", "Prefix", "/", "web", svc80()))
        .ing(Ing::new("default", "e").path("www.example.com", "Prefix", "/", "exact", svc80()));
    let (s, d) = w.run();
    assert!(d.is_empty(), "{d:?}");
    assert!(s.hosts.wildcard.contains_key("example.com"));
    assert_eq!(hit(&s, "a.example.com", "/"), "default/web:80");
    assert_eq!(hit(&s, "www.example.com", "/"), "default/exact:80");
    assert_eq!(hit(&s, "example.com", "/"), "404");
    assert_eq!(hit(&s, "a.b.example.com", "/"), "404");
}

#[test]
fn host_less_rule_catches_all_other_hosts() {
    let w = World::web()
        .svc(svc("default", "named", &[("http", 80)]))
        .ing(Ing::new("default", "any").rule(None, &[("Prefix", "/", "web", svc80())]))
        .ing(Ing::new("default", "named").path("named.test", "Prefix", "/", "named", svc80()));
    let (s, _) = w.run();
    assert!(s.hosts.catch_all.is_some());
    assert_eq!(hit(&s, "whatever.test", "/x"), "default/web:80");
    assert_eq!(hit(&s, "10.1.2.3:8080", "/x"), "default/web:80");
    assert_eq!(hit(&s, "named.test", "/x"), "default/named:80");
}

/// A rule whose every path is skipped (a bad pathType, or `paths: []`) claims nothing: the
/// host keeps reaching the catch-all rule (and, without one, the default backend), as if the
/// rule were not there.
#[test]
fn a_rule_with_no_usable_path_does_not_hide_the_catch_all() {
    for broken in [
        json!({"host": "broken.test", "http": {"paths": [
            {"pathType": "prefix", "path": "/",
             "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}),
        json!({"host": "broken.test", "http": {"paths": []}}),
    ] {
        let mut bad = Ing::new("default", "broken");
        bad.spec["rules"] = json!([broken]);
        let w = World::web()
            .svc(svc("default", "fallback", &[("http", 80)]))
            .ing(
                Ing::new("default", "any")
                    .rule(None, &[("Prefix", "/", "web", svc80())])
                    .default_backend("fallback", 80),
            )
            .ing(bad.clone());
        let (s, _) = w.run();
        assert_eq!(hit(&s, "broken.test", "/"), "default/web:80", "{broken}");
        assert!(!s.hosts.exact.contains_key("broken.test"), "{broken}");
        let w = World::web()
            .svc(svc("default", "fallback", &[("http", 80)]))
            .ing(Ing::new("default", "dflt").default_backend("fallback", 80))
            .ing(bad);
        let (s, _) = w.run();
        assert_eq!(
            hit(&s, "broken.test", "/x"),
            "default/fallback:80",
            "{broken}"
        );
    }
}

#[test]
fn host_invalid_forms_are_diagnosed_and_only_that_rule_skipped() {
    for bad in [
        "10.0.0.1",
        "[::1]",
        "foo.com:80",
        "foo.*.com",
        "*foo.com",
        "*",
        "a_b.com",
        "-a.com",
        "a..com",
        "foo.com.",
    ] {
        let (s, d) = World::web()
            .ing(
                Ing::new("default", "a")
                    .path(bad, "Prefix", "/bad", "web", svc80())
                    .path("good.test", "Prefix", "/", "web", svc80()),
            )
            .run();
        let diag = only(&d, Severity::Error, "InvalidHost");
        assert!(diag.message.contains(bad), "{bad}: {}", diag.message);
        assert_eq!(hit(&s, "good.test", "/"), "default/web:80", "{bad}");
        assert_eq!(s.hosts.exact.len(), 1, "{bad}");
        assert!(
            s.hosts.wildcard.is_empty() && s.hosts.catch_all.is_none(),
            "{bad}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

#[test]
fn path_exact_is_whole_string_and_prefix_element_wise() {
    let w = World::web()
        .svc(svc("default", "exact", &[("http", 80)]))
        .ing(
            Ing::new("default", "a")
                .path("a.test", "Exact", "/foo", "exact", svc80())
                .path("b.test", "Prefix", "/foo", "web", svc80()),
        );
    let (s, _) = w.run();
    let table = [
        ("a.test", "/foo", "default/exact:80"),
        ("a.test", "/foo/", "404"),
        ("a.test", "/foo/bar", "404"),
        ("b.test", "/foo", "default/web:80"),
        ("b.test", "/foo/", "default/web:80"),
        ("b.test", "/foo/bar", "default/web:80"),
        ("b.test", "/foobar", "404"),
        ("b.test", "/", "404"),
    ];
    for (host, path, want) in table {
        assert_eq!(hit(&s, host, path), want, "{host}{path}");
    }
}

#[test]
fn path_prefix_trailing_slash_is_ignored() {
    let (s, d) = World::web()
        .ing(Ing::new("default", "a").path("a.test", "Prefix", "/foo/", "web", svc80()))
        .run();
    assert!(d.is_empty());
    let r = route(&s, "a.test", "/foo").expect("matches without slash");
    assert_eq!(r.path, "/foo");
    assert_eq!(hit(&s, "a.test", "/foo/bar"), "default/web:80");
    assert_eq!(hit(&s, "a.test", "/foobar"), "404");
    // The root prefix stays `/`.
    let (s, _) = World::web()
        .ing(Ing::new("default", "a").path("a.test", "Prefix", "/", "web", svc80()))
        .run();
    assert_eq!(route(&s, "a.test", "/x").expect("root").path, "/");
}

#[test]
fn path_implementation_specific_is_prefix_and_missing_type_warns() {
    let (s, d) = World::web()
        .ing(
            Ing::new("default", "a")
                .path("a.test", "ImplementationSpecific", "/api", "web", svc80())
                .raw_path(
                    "b.test",
                    json!({"path": "/api",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}}),
                ),
        )
        .run();
    for host in ["a.test", "b.test"] {
        let r = route(&s, host, "/api/v1").expect("prefix match");
        assert_eq!(r.kind, PathKind::Prefix);
        assert_eq!(hit(&s, host, "/apix"), "404");
    }
    only(&d, Severity::Warning, "MissingPathType");
}

#[test]
fn path_is_normalised_like_requests() {
    let (s, d) = World::web()
        .ing(
            Ing::new("default", "a")
                .path("a.test", "Prefix", "/a//b/./c/../d", "web", svc80())
                .path("b.test", "Exact", "/%7Euser", "web", svc80()),
        )
        .run();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        route(&s, "a.test", "/a/b/d/x").expect("normalised").path,
        "/a/b/d"
    );
    assert_eq!(hit(&s, "b.test", "/~user"), "default/web:80");
}

#[test]
fn path_invalid_is_diagnosed_and_skipped() {
    let cases = [
        ("Prefix", Some("api"), "InvalidPath"),
        ("Exact", Some("/a b"), "InvalidPath"),
        ("Prefix", Some("/a%zz"), "InvalidPath"),
        ("Prefix", Some("/a?b=1"), "InvalidPath"),
        // Requests are routed without their `;` parameters: such a rule could never match.
        ("Prefix", Some("/a;v=1"), "InvalidPath"),
        ("Exact", Some("/a;v=1/b"), "InvalidPath"),
        ("Exact", None, "InvalidPath"),
        ("Regex", Some("/a"), "InvalidPathType"),
    ];
    for (t, p, reason) in cases {
        let mut path = json!({"pathType": t,
            "backend": {"service": {"name": "web", "port": {"number": 80}}}});
        if let Some(p) = p {
            path["path"] = json!(p);
        }
        let (s, d) = World::web()
            .ing(Ing::new("default", "a").raw_path("a.test", path).path(
                "a.test",
                "Prefix",
                "/ok",
                "web",
                svc80(),
            ))
            .run();
        only(&d, Severity::Error, reason);
        assert_eq!(s.hosts.exact["a.test"].routes().len(), 1, "{t} {p:?}");
        assert_eq!(hit(&s, "a.test", "/ok"), "default/web:80");
    }
}

#[test]
fn path_missing_for_implementation_specific_means_root() {
    let (s, d) = World::web()
        .ing(Ing::new("default", "a").raw_path(
            "a.test",
            json!({"pathType": "ImplementationSpecific",
            "backend": {"service": {"name": "web", "port": {"number": 80}}}}),
        ))
        .run();
    only(&d, Severity::Warning, "MissingPath");
    assert_eq!(hit(&s, "a.test", "/anything"), "default/web:80");
}

// ---------------------------------------------------------------------------------------------
// Precedence and conflicts
// ---------------------------------------------------------------------------------------------

#[test]
fn precedence_longest_first_exact_before_prefix_across_ingresses_and_namespaces() {
    let mut w = World::default();
    for ns in ["ns-a", "ns-b", "ns-c", "ns-d"] {
        w = w.web_in(ns);
    }
    let w = w
        .ing(Ing::new("ns-a", "root").path("h.test", "Prefix", "/", "web", svc80()))
        .ing(Ing::new("ns-b", "api").path("h.test", "Prefix", "/api", "web", svc80()))
        .ing(Ing::new("ns-c", "api-exact").path("h.test", "Exact", "/api", "web", svc80()))
        .ing(Ing::new("ns-d", "v1").path("h.test", "Prefix", "/api/v1", "web", svc80()));
    let (s, d) = w.run();
    assert!(d.is_empty(), "{d:?}");
    let order: Vec<(PathKind, &str)> = s.hosts.exact["h.test"]
        .routes()
        .iter()
        .map(|r| (r.kind, r.path.as_str()))
        .collect();
    assert_eq!(
        order,
        vec![
            (PathKind::Prefix, "/api/v1"),
            (PathKind::Exact, "/api"),
            (PathKind::Prefix, "/api"),
            (PathKind::Prefix, "/"),
        ]
    );
    let table = [
        ("/api/v1/x", "ns-d/web:80"),
        ("/api", "ns-c/web:80"),
        ("/api/", "ns-b/web:80"),
        ("/api/v2", "ns-b/web:80"),
        ("/apiv1", "ns-a/web:80"),
        ("/", "ns-a/web:80"),
    ];
    for (path, want) in table {
        assert_eq!(hit(&s, "h.test", path), want, "{path}");
    }
}

#[test]
fn conflict_oldest_creation_timestamp_wins_with_diagnostic_naming_winner() {
    let w = World::web()
        .web_in("zz")
        // `default/young` sorts first by name but is younger: the old one in `zz` wins.
        .ing(
            Ing::new("default", "young")
                .created("2025-06-01T00:00:00Z")
                .path("h.test", "Prefix", "/api", "web", svc80()),
        )
        .ing(Ing::new("zz", "old").created("2024-01-01T00:00:00Z").path(
            "h.test",
            "Prefix",
            "/api/",
            "web",
            svc80(),
        ));
    let (s, d) = w.run();
    assert_eq!(hit(&s, "h.test", "/api"), "zz/web:80");
    let diag = only(&d, Severity::Error, "PathConflict");
    assert_eq!(
        (diag.namespace.as_str(), diag.name.as_str()),
        ("default", "young")
    );
    assert!(diag.message.contains("zz/old"), "{}", diag.message);
}

#[test]
fn conflict_tie_broken_by_namespace_then_name_and_missing_timestamp_sorts_last() {
    let mut w = World::default();
    for ns in ["a", "b"] {
        w = w.web_in(ns);
    }
    let same =
        |ns: &str, name: &str| Ing::new(ns, name).path("h.test", "Exact", "/x", "web", svc80());
    // No timestamps: a/z beats b/a (namespace first), and a/y beats a/z (then name).
    let (s, d) = w
        .clone()
        .ing(same("b", "a"))
        .ing(same("a", "z"))
        .ing(same("a", "y"))
        .run();
    assert_eq!(
        route(&s, "h.test", "/x")
            .expect("route")
            .ingress
            .name
            .as_ref(),
        "y"
    );
    assert_eq!(reasons(&d), vec![(Severity::Error, "PathConflict"); 2]);
    // A present timestamp beats a missing one, whatever the names.
    let (s, d) = w
        .ing(same("a", "a"))
        .ing(same("b", "b").created("2030-01-01T00:00:00Z"))
        .run();
    assert_eq!(hit(&s, "h.test", "/x"), "b/web:80");
    assert_eq!(d[0].name, "a");
}

#[test]
fn conflict_needs_same_kind_exact_and_prefix_coexist() {
    let (s, d) = World::web()
        .svc(svc("default", "other", &[("http", 80)]))
        .ing(Ing::new("default", "a").path("h.test", "Exact", "/x", "web", svc80()))
        .ing(Ing::new("default", "b").path("h.test", "Prefix", "/x", "other", svc80()))
        .run();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(hit(&s, "h.test", "/x"), "default/web:80");
    assert_eq!(hit(&s, "h.test", "/x/y"), "default/other:80");
}

// ---------------------------------------------------------------------------------------------
// Default backend
// ---------------------------------------------------------------------------------------------

#[test]
fn default_backend_serves_unmatched_paths_and_unknown_hosts() {
    let (s, d) = World::web()
        .svc(svc("default", "fallback", &[("http", 80)]))
        .ing(
            Ing::new("default", "a")
                .default_backend("fallback", 80)
                .path("h.test", "Prefix", "/api", "web", svc80()),
        )
        .run();
    assert!(d.is_empty(), "{d:?}");
    let m = s.route("h.test", "/api/x");
    assert!(!m.is_default);
    let m = s.route("h.test", "/other");
    assert!(m.is_default);
    let r = m.route.expect("default route");
    assert_eq!((r.kind, r.path.as_str()), (PathKind::Prefix, "/"));
    assert_eq!(hit(&s, "h.test", "/other"), "default/fallback:80");
    assert_eq!(hit(&s, "unknown.test", "/"), "default/fallback:80");
}

#[test]
fn default_backend_absent_means_404_when_no_path_matches() {
    let (s, _) = World::web()
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/api", "web", svc80()))
        .run();
    assert!(s.hosts.default_route.is_none());
    assert_eq!(hit(&s, "h.test", "/other"), "404");
}

#[test]
fn default_backend_oldest_wins_others_diagnosed() {
    let (s, d) = World::web()
        .svc(svc("default", "old", &[("http", 80)]))
        .ing(
            Ing::new("default", "a-new")
                .created("2025-01-01T00:00:00Z")
                .default_backend("web", 80),
        )
        .ing(
            Ing::new("default", "z-old")
                .created("2020-01-01T00:00:00Z")
                .default_backend("old", 80),
        )
        .run();
    assert_eq!(hit(&s, "x.test", "/"), "default/old:80");
    let diag = only(&d, Severity::Error, "DefaultBackendConflict");
    assert_eq!(diag.name, "a-new");
    assert!(diag.message.contains("default/z-old"));
}

// ---------------------------------------------------------------------------------------------
// Backends and endpoints
// ---------------------------------------------------------------------------------------------

fn two_port_world() -> World {
    World::default()
        .svc(svc("default", "app", &[("http", 80), ("metrics", 9090)]))
        .slice(slice(
            "default",
            "app-1",
            "app",
            "IPv4",
            &[("metrics", 9091), ("http", 8080)],
            vec![ready("10.0.0.2"), ready("10.0.0.1")],
        ))
}

#[test]
fn backend_port_by_number_selects_slice_port_by_service_port_name() {
    let (s, d) = two_port_world()
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "app", json!(9090)))
        .run();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        endpoints(&s, "h.test", "/"),
        ["10.0.0.1:9091", "10.0.0.2:9091"]
    );
}

#[test]
fn backend_port_by_name() {
    let (s, d) = two_port_world()
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "app", json!("http")))
        .run();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(hit(&s, "h.test", "/"), "default/app:http");
    assert_eq!(
        endpoints(&s, "h.test", "/"),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
}

/// Translate records each certificate's dates and knows no clock; the caller's clock says
/// which served certificates clients refuse (on the Secret, naming what it serves) and when
/// the next date passes.
#[test]
fn tls_certificate_dates_are_judged_by_the_callers_clock() {
    let w = World::web()
        .secret(tls_secret_valid(
            "default",
            "old",
            &["old.test", "*.old.test"],
            2000,
            2001,
        ))
        .secret(tls_secret_valid(
            "default",
            "early",
            &["early.test"],
            2999,
            3000,
        ))
        .secret(tls_secret_valid(
            "default",
            "fine",
            &["fine.test"],
            2000,
            2999,
        ))
        .ing(
            Ing::new("default", "a")
                .path("old.test", "Prefix", "/", "web", svc80())
                .tls(Some(&["old.test", "*.old.test"]), "old")
                .tls(Some(&["early.test"]), "early")
                .tls(Some(&["fine.test"]), "fine"),
        );
    let (s, d) = w.run();
    assert!(d.is_empty(), "{d:?}");
    let old = s.tls.exact.get("old.test").expect("served").validity;
    assert_eq!(
        old.map(|v| (v.not_before, v.not_after)),
        Some((946_684_800, 978_307_200))
    );
    // 2027-01-15.
    let now = 1_799_971_200;
    let certs = s.tls.certificates();
    let d = super::certificate_diagnostics(&certs, &w.0.secrets, now);
    assert_eq!(
        reasons(&d),
        [
            (Severity::Warning, "CertificateNotYetValid"),
            (Severity::Warning, "CertificateExpired")
        ],
        "{d:#?}"
    );
    assert_eq!((d[1].kind.as_str(), d[1].name.as_str()), ("Secret", "old"));
    assert_eq!(
        d[1].message,
        "tls.crt expired 2001-01-01T00:00:00Z: clients refuse it for *.old.test, old.test \
         (renew the Secret)"
    );
    assert!(
        d[0].message
            .contains("is not valid before 2999-01-01T00:00:00Z")
    );
    // The next date: `early` turns valid as `fine` expires.
    assert_eq!(
        super::next_validity_change(&certs, now),
        Some(32_472_144_000)
    );
    assert_eq!(super::next_validity_change(&certs, 32_503_680_000), None);
    assert!(super::certificate_diagnostics(&certs, &w.0.secrets, 946_684_800).len() == 1);
}

/// `;` parameters do not hide a segment from its rule: `/admin;x=1` is routed as `/admin`
/// (a servlet container serves it as `/admin`), not by the catch-all `/` past `/admin`'s
/// own limits.
#[test]
fn path_parameters_do_not_hide_a_segment_from_its_rule() {
    let w = World::default()
        .svc(svc("default", "admin", &[("http", 80)]))
        .svc(svc("default", "web", &[("http", 80)]))
        .ing(
            Ing::new("default", "a")
                .path("h.test", "Prefix", "/admin", "admin", svc80())
                .path("h.test", "Exact", "/login", "admin", svc80()),
        )
        .ing(Ing::new("default", "b").path("h.test", "Prefix", "/", "web", svc80()));
    let (s, _) = w.run();
    for path in [
        "/admin;x=1",
        "/admin;jsessionid=1/users",
        "/login;a",
        "/admin/;x",
    ] {
        assert_eq!(hit(&s, "h.test", path), "default/admin:80", "{path}");
    }
    for path in ["/adminx;a", "/x/admin;a", "/log;in"] {
        assert_eq!(hit(&s, "h.test", path), "default/web:80", "{path}");
    }
}

#[test]
fn backend_port_by_number_skips_udp_and_sctp_ports() {
    // Port numbers are unique per protocol only: DNS-style Services list 53/UDP before 53/TCP.
    let w = World::default()
        .svc(from(
            json!({"metadata": {"namespace": "default", "name": "dns"},
            "spec": {"ports": [
                {"name": "dns-udp", "port": 53, "protocol": "UDP"},
                {"name": "dns-sctp", "port": 53, "protocol": "SCTP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                {"name": "only-udp", "port": 54, "protocol": "UDP"}]}}),
        ))
        .slice(slice(
            "default",
            "dns-1",
            "dns",
            "IPv4",
            &[("dns-udp", 5353), ("dns-sctp", 5454), ("dns-tcp", 8053)],
            vec![ready("10.0.0.1")],
        ))
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "dns", json!(53)))
        .ing(Ing::new("default", "b").path("h.test", "Prefix", "/udp", "dns", json!("only-udp")));
    let (s, d) = w.run();
    assert_eq!(hit(&s, "h.test", "/"), "default/dns:53");
    assert_eq!(endpoints(&s, "h.test", "/"), ["10.0.0.1:8053"]);
    let d = only(&d, Severity::Error, "ServicePortNotFound");
    assert!(d.message.contains("no TCP port \"only-udp\""), "{d:?}");
}

#[test]
fn backend_unnamed_service_port_matches_unnamed_slice_port() {
    let w = World::default()
        .svc(svc("default", "solo", &[("", 80)]))
        .slice(slice(
            "default",
            "solo-1",
            "solo",
            "IPv4",
            &[("", 3000)],
            vec![ready("10.0.0.9")],
        ))
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "solo", svc80()));
    let (s, _) = w.run();
    assert_eq!(endpoints(&s, "h.test", "/"), ["10.0.0.9:3000"]);
}

#[test]
fn endpoints_ready_true_or_nil_used_not_ready_excluded() {
    let w = World::default()
        .svc(svc("default", "web", &[("http", 80)]))
        .slice(slice(
            "default",
            "w",
            "web",
            "IPv4",
            &[("http", 8080)],
            vec![
                ep("10.0.0.1", Some(true), None, None),
                ep("10.0.0.2", None, None, None),
                json!({"addresses": ["10.0.0.3"]}),
                ep("10.0.0.4", Some(false), Some(true), Some(true)),
                ep("10.0.0.5", Some(false), None, None),
            ],
        ))
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "web", svc80()));
    let (s, _) = w.run();
    assert_eq!(
        endpoints(&s, "h.test", "/"),
        ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
    );
    assert!(!s.backends.backends[0].draining_fallback);
}

#[test]
fn endpoints_fall_back_to_serving_terminating_when_none_ready() {
    let w = World::default()
        .svc(svc("default", "web", &[("http", 80)]))
        .slice(slice(
            "default",
            "w",
            "web",
            "IPv4",
            &[("http", 8080)],
            vec![
                ep("10.0.0.4", Some(false), Some(true), Some(true)),
                ep("10.0.0.5", Some(false), Some(false), Some(true)),
                ep("10.0.0.6", Some(false), Some(true), Some(false)),
                // For a nil `serving`, "consumers should defer to the ready condition"
                // (discovery/v1 EndpointConditions): not ready, so not serving.
                ep("10.0.0.7", Some(false), None, Some(true)),
            ],
        ))
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "web", svc80()));
    let (s, d) = w.run();
    assert!(d.is_empty());
    assert_eq!(endpoints(&s, "h.test", "/"), ["10.0.0.4:8080"]);
    assert!(s.backends.backends[0].draining_fallback);
}

#[test]
fn endpoints_none_usable_is_not_a_diagnostic() {
    let w = World::default()
        .svc(svc("default", "web", &[("http", 80)]))
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "web", svc80()));
    let (s, d) = w.run();
    assert!(d.is_empty(), "{d:?}");
    assert!(endpoints(&s, "h.test", "/").is_empty());
    assert!(!s.backends.backends[0].draining_fallback);
}

#[test]
fn endpoints_deduped_across_slices_sorted_and_filtered() {
    let w = World::default()
        .svc(svc("default", "web", &[("http", 80)]))
        .slice(slice(
            "default",
            "w2",
            "web",
            "IPv4",
            &[("http", 8080)],
            vec![ready("10.0.0.3"), ready("10.0.0.1")],
        ))
        .slice(slice(
            "default",
            "w1",
            "web",
            "IPv4",
            &[("http", 8080)],
            vec![ready("10.0.0.1"), ready("10.0.0.2")],
        ))
        .slice(slice(
            "default",
            "w6",
            "web",
            "IPv6",
            &[("http", 8080)],
            vec![ready("fd00::1")],
        ))
        .slice(slice(
            "default",
            "wf",
            "web",
            "FQDN",
            &[("http", 8080)],
            vec![ready("pod.example")],
        ))
        // Another namespace, another service, another port name: none of these count.
        .slice(slice(
            "other",
            "w",
            "web",
            "IPv4",
            &[("http", 8080)],
            vec![ready("10.9.9.9")],
        ))
        .slice(slice(
            "default",
            "x",
            "xweb",
            "IPv4",
            &[("http", 8080)],
            vec![ready("10.8.8.8")],
        ))
        .slice(slice(
            "default",
            "p",
            "web",
            "IPv4",
            &[("admin", 8080)],
            vec![ready("10.7.7.7")],
        ))
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "web", svc80()));
    let (s, d) = w.run();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        endpoints(&s, "h.test", "/"),
        [
            "10.0.0.1:8080",
            "10.0.0.2:8080",
            "10.0.0.3:8080",
            "[fd00::1]:8080"
        ]
    );
}

#[test]
fn endpoint_invalid_address_is_a_warning() {
    let mut bad = slice(
        "default",
        "w",
        "web",
        "IPv4",
        &[("http", 8080)],
        vec![ready("fd00::1"), ready("10.0.0.1")],
    );
    bad.metadata.uid = Some("slice-uid".into());
    let w = World::default()
        .svc(svc("default", "web", &[("http", 80)]))
        .slice(bad)
        .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "web", svc80()));
    let (s, d) = w.run();
    let warning = only(&d, Severity::Warning, "InvalidEndpointAddress");
    // Its Event names the slice's uid, or `kubectl describe` does not list it.
    assert_eq!(
        (&*warning.kind, &*warning.uid),
        ("EndpointSlice", "slice-uid")
    );
    assert_eq!(endpoints(&s, "h.test", "/"), ["10.0.0.1:8080"]);
}

#[test]
fn identical_backend_keys_share_one_backend_id() {
    let (s, _) = World::web()
        .ing(Ing::new("default", "a").path("a.test", "Prefix", "/", "web", svc80()))
        .ing(
            Ing::new("default", "b")
                .path("b.test", "Exact", "/x", "web", svc80())
                .path("c.test", "Prefix", "/", "web", json!("http")),
        )
        .run();
    let id = |h: &str, p: &str| route(&s, h, p).expect("route").target.clone();
    assert_eq!(id("a.test", "/"), id("b.test", "/x"));
    // By name is a different key (the key is the port as written).
    assert_ne!(id("a.test", "/"), id("c.test", "/"));
    assert_eq!(s.backends.backends.len(), 2);
}

#[test]
fn backend_failures_keep_route_unavailable_with_error() {
    let resource_path = json!({"pathType": "Prefix", "path": "/",
        "backend": {"resource": {"apiGroup": "k8s.example.com", "kind": "Bucket", "name": "b"}}});
    let cases: Vec<(&str, World, &str)> = vec![
        (
            "missing service",
            World::default().ing(Ing::new("default", "a").path(
                "h.test",
                "Prefix",
                "/",
                "nope",
                svc80(),
            )),
            "ServiceNotFound",
        ),
        (
            "service in another namespace",
            World::default()
                .web_in("other")
                .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "web", svc80())),
            "ServiceNotFound",
        ),
        (
            "missing port number",
            World::web().ing(Ing::new("default", "a").path(
                "h.test",
                "Prefix",
                "/",
                "web",
                json!(81),
            )),
            "ServicePortNotFound",
        ),
        (
            "missing port name",
            World::web().ing(Ing::new("default", "a").path(
                "h.test",
                "Prefix",
                "/",
                "web",
                json!("grpc"),
            )),
            "ServicePortNotFound",
        ),
        (
            "external name",
            World::default()
                .svc(svc_external("default", "ext"))
                .ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "ext", svc80())),
            "ExternalNameNotSupported",
        ),
        (
            "resource backend",
            World::default().ing(Ing::new("default", "a").raw_path("h.test", resource_path)),
            "ResourceBackendNotSupported",
        ),
        (
            "https backend protocol",
            World::web().ing(
                Ing::new("default", "a")
                    .ann("nginx.ingress.kubernetes.io/backend-protocol", "HTTPS")
                    .path("h.test", "Prefix", "/", "web", svc80()),
            ),
            "UnsupportedBackendProtocol",
        ),
        (
            "grpcs backend protocol",
            World::web().ing(
                Ing::new("default", "a")
                    .ann("portico.dev/backend-protocol", "grpcs")
                    .path("h.test", "Prefix", "/", "web", svc80()),
            ),
            "UnsupportedBackendProtocol",
        ),
    ];
    for (name, w, reason) in cases {
        let (s, d) = w.run();
        only(&d, Severity::Error, reason);
        assert_eq!(hit(&s, "h.test", "/"), "503", "case {name}");
        assert!(s.backends.backends.is_empty(), "case {name}");
    }
}

#[test]
fn backend_failure_does_not_affect_other_routes() {
    let mut bad = Ing::new("default", "bad").path("h.test", "Prefix", "/bad", "nope", svc80());
    bad.meta["uid"] = json!("0b1c-bad");
    let (s, d) = World::web()
        .ing(bad)
        .ing(Ing::new("default", "good").path("h.test", "Prefix", "/", "web", svc80()))
        .run();
    // The diagnostic names the object by uid too (its Event must, for `kubectl describe`).
    assert_eq!(only(&d, Severity::Error, "ServiceNotFound").uid, "0b1c-bad");
    assert_eq!(hit(&s, "h.test", "/bad/x"), "503");
    assert_eq!(hit(&s, "h.test", "/good"), "default/web:80");
}

#[test]
fn upstream_protocol_from_app_protocol_and_annotation() {
    let w = World::default()
        .svc(svc_app_protocol(
            "default",
            "grpc",
            50051,
            "kubernetes.io/h2c",
        ))
        .svc(svc("default", "web", &[("http", 80)]))
        .ing(Ing::new("default", "app").path("a.test", "Prefix", "/", "grpc", json!(50051)))
        .ing(
            Ing::new("default", "ann-grpc")
                .ann("nginx.ingress.kubernetes.io/backend-protocol", "GRPC")
                .path("b.test", "Prefix", "/", "web", svc80()),
        )
        .ing(
            Ing::new("default", "ann-h2c")
                .ann("portico.dev/backend-protocol", "h2c")
                .path("c.test", "Prefix", "/", "web", svc80()),
        )
        .ing(
            Ing::new("default", "ann-http")
                .ann("portico.dev/backend-protocol", "HTTP")
                .path("d.test", "Prefix", "/", "grpc", json!(50051)),
        )
        .ing(Ing::new("default", "plain").path("e.test", "Prefix", "/", "web", svc80()));
    let (s, d) = w.run();
    assert!(d.is_empty(), "{d:?}");
    let proto = |h: &str| route(&s, h, "/").expect("route").policy.upstream_protocol;
    assert_eq!(proto("a.test"), UpstreamProtocol::H2c);
    assert_eq!(proto("b.test"), UpstreamProtocol::H2c);
    assert_eq!(proto("c.test"), UpstreamProtocol::H2c);
    assert_eq!(proto("d.test"), UpstreamProtocol::Http1);
    assert_eq!(proto("e.test"), UpstreamProtocol::Http1);
}

#[test]
fn endpoint_only_change_leaves_routes_untouched() {
    let w =
        World::web().ing(Ing::new("default", "a").path("h.test", "Prefix", "/", "web", svc80()));
    let (r1, _) = derive_routes(&w.0, &Options::default());
    let w2 = w.clone().slice(slice(
        "default",
        "web-2",
        "web",
        "IPv4",
        &[("http", 8080)],
        vec![ready("10.0.0.7")],
    ));
    let (r2, _) = derive_routes(&w2.0, &Options::default());
    assert_eq!(r1, r2, "routes do not depend on slices");
    let (bt, _) = resolve_endpoints(&r1.backends, &w2.0.endpoint_slices);
    let snap = r1.snapshot(bt);
    assert_eq!(
        endpoints(&snap, "h.test", "/"),
        ["10.0.0.1:8080", "10.0.0.7:8080"]
    );
    assert!(Arc::ptr_eq(&snap.hosts, &r1.hosts));
    assert_eq!(snap, w2.run().0);
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

#[test]
fn tls_exact_and_wildcard_hosts_and_ssl_redirect() {
    let w = World::web()
        .secret(tls_secret("default", "shop-tls", &["shop.test"]))
        .secret(tls_secret("default", "wild-tls", &["*.apps.test"]))
        .ing(
            Ing::new("default", "a")
                .tls(Some(&["Shop.test"]), "shop-tls")
                .tls(Some(&["*.apps.test"]), "wild-tls")
                .path("shop.test", "Prefix", "/", "web", svc80())
                .path("*.apps.test", "Prefix", "/", "web", svc80())
                .path("plain.test", "Prefix", "/", "web", svc80()),
        );
    let (s, d) = w.run();
    assert!(d.is_empty(), "{d:?}");
    let src = |sni: &str| s.tls.resolve(Some(sni)).map(|c| c.source.to_string());
    assert_eq!(src("shop.test").as_deref(), Some("default/shop-tls"));
    assert_eq!(src("x.apps.test").as_deref(), Some("default/wild-tls"));
    assert_eq!(src("x.y.apps.test"), None);
    assert_eq!(src("plain.test"), None);
    let redirect = |h: &str| redirects(&s, h, "/");
    assert!(redirect("shop.test"));
    assert!(redirect("x.apps.test"));
    assert!(!redirect("plain.test"), "no TLS, no redirect");
    // The material is crt then key.
    let c = &s.tls.exact["shop.test"];
    assert!(c.material.starts_with(b"-----BEGIN CERTIFICATE-----"));
    assert!(c.key.keys_match().is_ok());
}

#[test]
fn tls_entry_without_hosts_applies_to_rule_hosts() {
    let (s, d) = World::web()
        .secret(tls_secret("default", "t", &["a.test", "b.test"]))
        .ing(
            Ing::new("default", "a")
                .tls(None, "t")
                .path("a.test", "Prefix", "/", "web", svc80())
                .path("b.test", "Prefix", "/", "web", svc80())
                .rule(None, &[("Prefix", "/", "web", svc80())]),
        )
        .run();
    assert!(d.is_empty(), "{d:?}");
    let mut names: Vec<_> = s.tls.exact.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["a.test", "b.test"]);
    assert!(s.tls.wildcard.is_empty());
}

#[test]
fn tls_default_certificate_from_flag() {
    let w = World::web().secret(tls_secret("portico", "default-cert", &["fallback.test"]));
    let opts = Options {
        default_certificate: Some(("portico".into(), "default-cert".into())),
        ..Options::default()
    };
    let (s, d) = w.run_with(&opts);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        s.tls.resolve(Some("anything.test")).map(|c| &*c.source),
        Some("portico/default-cert")
    );
    assert_eq!(
        s.tls.resolve(None).map(|c| &*c.source),
        Some("portico/default-cert")
    );

    let bad = Options {
        default_certificate: Some(("portico".into(), "missing".into())),
        ..Options::default()
    };
    let (s, d) = w.run_with(&bad);
    let diag = only(&d, Severity::Error, "SecretNotFound");
    assert_eq!(
        (diag.kind.as_str(), diag.name.as_str()),
        ("Secret", "missing")
    );
    assert!(s.tls.default.is_none());
}

#[test]
fn tls_bad_secrets_reject_only_that_entry() {
    let (crt_a, key_a) = cert(&["h.test"]);
    let (_, key_b) = cert(&["h.test"]);
    let tls = "kubernetes.io/tls";
    let cases: Vec<(&str, Option<Secret>, &str)> = vec![
        ("missing", None, "SecretNotFound"),
        (
            "wrong type",
            Some(secret(
                "default",
                "s",
                "Opaque",
                &[("tls.crt", crt_a.as_bytes()), ("tls.key", key_a.as_bytes())],
            )),
            "SecretWrongType",
        ),
        (
            "missing key",
            Some(secret(
                "default",
                "s",
                tls,
                &[("tls.crt", crt_a.as_bytes())],
            )),
            "SecretMissingKey",
        ),
        (
            "garbage crt",
            Some(secret(
                "default",
                "s",
                tls,
                &[("tls.crt", b"not a pem"), ("tls.key", key_a.as_bytes())],
            )),
            "InvalidCertificate",
        ),
        (
            "garbage key",
            Some(secret(
                "default",
                "s",
                tls,
                &[
                    ("tls.crt", crt_a.as_bytes()),
                    ("tls.key", b"-----BEGIN nonsense"),
                ],
            )),
            "InvalidPrivateKey",
        ),
        (
            "key mismatch",
            Some(secret(
                "default",
                "s",
                tls,
                &[("tls.crt", crt_a.as_bytes()), ("tls.key", key_b.as_bytes())],
            )),
            "CertificateKeyMismatch",
        ),
    ];
    for (name, sec, reason) in cases {
        let mut w = World::web()
            .secret(tls_secret("default", "good", &["ok.test"]))
            .ing(Ing::new("default", "a").tls(Some(&["h.test"]), "s").path(
                "h.test",
                "Prefix",
                "/",
                "web",
                svc80(),
            ))
            .ing(
                Ing::new("default", "b")
                    .tls(Some(&["ok.test"]), "good")
                    .path("ok.test", "Prefix", "/", "web", svc80()),
            );
        if let Some(sec) = sec {
            w = w.secret(sec);
        }
        let (s, d) = w.run();
        let diag = only(&d, Severity::Error, reason);
        assert_eq!(
            (diag.kind.as_str(), diag.name.as_str()),
            ("Ingress", "a"),
            "case {name}"
        );
        assert!(!s.tls.has_tls_for("h.test"), "case {name}");
        assert!(s.tls.has_tls_for("ok.test"), "case {name}");
        // The host still answers over HTTP, without a redirect.
        assert!(
            route(&s, "h.test", "/").is_some(),
            "case {name}: still routed"
        );
        assert!(!redirects(&s, "h.test", "/"), "case {name}");
        assert!(redirects(&s, "ok.test", "/"), "case {name}");
    }
}

#[test]
fn tls_conflicting_certificates_oldest_wins() {
    let (s, d) = World::web()
        .secret(tls_secret("default", "old-cert", &["h.test"]))
        .secret(tls_secret("default", "new-cert", &["h.test"]))
        .ing(
            Ing::new("default", "new")
                .created("2025-01-01T00:00:00Z")
                .tls(Some(&["h.test"]), "new-cert"),
        )
        .ing(
            Ing::new("default", "old")
                .created("2020-01-01T00:00:00Z")
                .tls(Some(&["h.test"]), "old-cert"),
        )
        // Sharing the winner's Secret is not a conflict.
        .ing(
            Ing::new("default", "same")
                .created("2026-01-01T00:00:00Z")
                .tls(Some(&["h.test"]), "old-cert"),
        )
        .run();
    assert_eq!(
        s.tls.resolve(Some("h.test")).map(|c| &*c.source),
        Some("default/old-cert")
    );
    let diag = only(&d, Severity::Error, "TlsConflict");
    assert_eq!(diag.name, "new");
    assert!(diag.message.contains("default/old"), "{}", diag.message);
}

/// A certificate that does not name its TLS host is served (clients refuse it either way, and it
/// is the one the user meant) with a Warning; one that names the host beats an older one that
/// does not. Wildcard hosts need a wildcard certificate.
#[test]
fn tls_certificates_that_do_not_name_their_host_warn_and_lose_conflicts() {
    let (s, d) = World::web()
        .secret(tls_secret("default", "wrong", &["unrelated.test"]))
        .secret(tls_secret("default", "right", &["h.test"]))
        .secret(tls_secret("default", "wild", &["*.apps.test"]))
        .secret(tls_secret("default", "one-app", &["a.apps.test"]))
        .ing(
            Ing::new("default", "old")
                .created("2020-01-01T00:00:00Z")
                .tls(Some(&["h.test", "lone.test"]), "wrong"),
        )
        .ing(
            Ing::new("default", "new")
                .created("2025-01-01T00:00:00Z")
                .tls(Some(&["h.test"]), "right"),
        )
        .ing(Ing::new("default", "apps").tls(Some(&["*.apps.test"]), "wild"))
        .ing(Ing::new("default", "narrow").tls(Some(&["*.more.test"]), "one-app"))
        .run();
    let served = |host: &str| s.tls.resolve(Some(host)).map(|c| c.source.to_string());
    assert_eq!(served("h.test").as_deref(), Some("default/right"));
    assert_eq!(served("lone.test").as_deref(), Some("default/wrong"));
    assert_eq!(served("x.apps.test").as_deref(), Some("default/wild"));
    let got: Vec<(Severity, &str, &str)> = d
        .iter()
        .map(|d| (d.severity, d.reason.as_str(), d.name.as_str()))
        .collect();
    assert_eq!(
        got.iter()
            .filter(|g| g.1 == "CertificateHostMismatch")
            .count(),
        3,
        "h.test and lone.test of `old`, *.more.test of `narrow`: {d:#?}"
    );
    assert!(
        got.contains(&(Severity::Warning, "TlsConflict", "new")),
        "{d:#?}"
    );
    assert!(!got.iter().any(|g| g.0 == Severity::Error), "{d:#?}");

    // The host's redirect follows the Ingress whose certificate it now has: a catch-all rule
    // redirects h.test when the winner redirects, though the older loser said not to.
    let (s, _) = World::web()
        .secret(tls_secret("default", "wrong", &["unrelated.test"]))
        .secret(tls_secret("default", "right", &["h.test"]))
        .ing(
            Ing::new("default", "old")
                .created("2020-01-01T00:00:00Z")
                .ann("portico.dev/ssl-redirect", "false")
                .tls(Some(&["h.test"]), "wrong"),
        )
        .ing(
            Ing::new("default", "new")
                .created("2025-01-01T00:00:00Z")
                .tls(Some(&["h.test"]), "right")
                .path("", "Prefix", "/", "web", svc80()),
        )
        .run();
    assert!(redirects(&s, "h.test", "/"));
}

/// A TLS entry without hosts on an Ingress whose rules name none serves nothing: it says so.
#[test]
fn tls_entry_without_any_host_warns() {
    let (_, d) = World::web()
        .secret(tls_secret("default", "c", &["h.test"]))
        .ing(
            Ing::new("default", "a")
                .tls(None, "c")
                .path("", "Prefix", "/", "web", svc80()),
        )
        .run();
    let diag = only(&d, Severity::Warning, "TlsWithoutHosts");
    assert!(diag.message.contains("Secret c"), "{}", diag.message);
}

/// A TLS host is never served in the clear by falling through to a route that does not name
/// it: the catch-all rule, the default backend, or a wildcard rule without a wildcard
/// certificate redirect a plain-HTTP request whose own host has a valid certificate (and only
/// those), unless that route's Ingress opts out.
#[test]
fn tls_hosts_redirect_on_catch_all_default_and_wildcard_routes() {
    let w = World::web()
        .secret(tls_secret("default", "shop-tls", &["shop.test"]))
        .secret(tls_secret("default", "api-tls", &["api.test"]))
        .secret(tls_secret("default", "a-tls", &["a.apps.test"]))
        // TLS for shop.test, served only by the host-less rule.
        .ing(
            Ing::new("default", "any")
                .tls(Some(&["shop.test"]), "shop-tls")
                .rule(None, &[("Prefix", "/", "web", svc80())]),
        )
        // api.test has TLS and only /api; everything else of it reaches the default backend.
        .ing(
            Ing::new("default", "api")
                .created("2020-01-01T00:00:00Z")
                .tls(Some(&["api.test"]), "api-tls")
                .path("api.test", "Prefix", "/api", "web", svc80())
                .default_backend("web", 80),
        )
        // A wildcard rule without a wildcard certificate; one of its hosts has its own.
        .ing(
            Ing::new("default", "apps")
                .tls(Some(&["a.apps.test"]), "a-tls")
                .path("*.apps.test", "Prefix", "/", "web", svc80()),
        );
    let (s, d) = w.run();
    assert!(d.is_empty(), "{d:?}");
    assert!(redirects(&s, "shop.test", "/"), "catch-all rule, TLS host");
    assert!(!redirects(&s, "other.test", "/"), "catch-all rule, no TLS");
    assert!(redirects(&s, "api.test", "/api"), "the host's own route");
    assert!(
        redirects(&s, "api.test", "/other"),
        "default backend, TLS host"
    );
    assert!(
        redirects(&s, "a.apps.test", "/"),
        "wildcard rule, host with its own cert"
    );
    assert!(!redirects(&s, "b.apps.test", "/"), "wildcard rule, no cert");

    // The Ingress that gives the host its certificate opting out holds for the routes that
    // do not name the host too.
    let w = World::web()
        .secret(tls_secret("default", "api-tls", &["api.test"]))
        .ing(
            Ing::new("default", "api")
                .ann("nginx.ingress.kubernetes.io/ssl-redirect", "false")
                .tls(Some(&["api.test"]), "api-tls")
                .path("api.test", "Prefix", "/api", "web", svc80()),
        )
        .ing(Ing::new("default", "any").default_backend("web", 80));
    let (s, d) = w.run();
    assert!(d.is_empty(), "{d:?}");
    assert!(!redirects(&s, "api.test", "/api"));
    assert!(
        !redirects(&s, "api.test", "/other"),
        "default backend, host opted out"
    );

    // The route's Ingress opting out still wins.
    let w = World::web()
        .secret(tls_secret("default", "shop-tls", &["shop.test"]))
        .ing(
            Ing::new("default", "any")
                .ann("portico.dev/ssl-redirect", "false")
                .tls(Some(&["shop.test"]), "shop-tls")
                .rule(None, &[("Prefix", "/", "web", svc80())]),
        );
    let (s, _) = w.run();
    assert!(!redirects(&s, "shop.test", "/"));
}

#[test]
/// `IngressTLS.secretName` is optional "to allow TLS routing based on SNI hostname alone": the
/// entry's hosts are served the default certificate and redirected like hosts with a certificate
/// of their own, as ingress-nginx does. The warning says when that certificate is the generated
/// one; an Ingress that opts out of the redirect is not redirected.
fn tls_entry_without_secret_name_uses_the_default_certificate_and_redirects() {
    let ing = || {
        let mut ing = Ing::new("default", "a")
            .path("h.test", "Prefix", "/", "web", svc80())
            .path("*.w.test", "Prefix", "/", "web", svc80())
            .rule(None, &[("Prefix", "/", "web", svc80())]);
        ing.spec["tls"] = json!([{"hosts": ["h.test", "*.w.test", "c.test"]}]);
        ing
    };
    let (s, d) = World::web().ing(ing()).run();
    only(&d, Severity::Warning, "MissingSecretName");
    assert!(redirects(&s, "h.test", "/"));
    assert!(redirects(&s, "a.w.test", "/"));
    // c.test has no rule of its own: the catch-all rule serves it, and redirects it.
    assert!(redirects(&s, "c.test", "/"));
    assert!(!redirects(&s, "other.test", "/"));
    assert!(s.tls.exact.is_empty() && s.tls.wildcard.is_empty());

    let opts = Options {
        default_certificate: Some(("portico".into(), "default-cert".into())),
        ..Options::default()
    };
    let (s, d) = World::web()
        .secret(tls_secret("portico", "default-cert", &["*.test"]))
        .ing(ing())
        .run_with(&opts);
    assert!(d.is_empty(), "{d:?}");
    assert!(redirects(&s, "h.test", "/"));

    let (s, _) = World::web()
        .ing(ing().ann("nginx.ingress.kubernetes.io/ssl-redirect", "false"))
        .run();
    assert!(!redirects(&s, "h.test", "/"));
    assert!(!redirects(&s, "c.test", "/"));
}

// ---------------------------------------------------------------------------------------------
// Annotations
// ---------------------------------------------------------------------------------------------

/// Translate one Ingress on `h.test` (with valid TLS) carrying `annotations`; return the
/// route's policy and the diagnostics.
fn policy_with(annotations: &[(&str, &str)], opts: &Options) -> (RoutePolicy, Vec<Diagnostic>) {
    let mut ing = Ing::new("default", "a").tls(Some(&["h.test"]), "t").path(
        "h.test",
        "Prefix",
        "/",
        "web",
        svc80(),
    );
    for (k, v) in annotations {
        ing = ing.ann(k, v);
    }
    let (s, d) = World::web()
        .secret(tls_secret("default", "t", &["h.test"]))
        .ing(ing)
        .run_with(opts);
    let p = (*route(&s, "h.test", "/").expect("route").policy).clone();
    (p, d)
}

#[test]
fn annotation_defaults_come_from_options() {
    let mut opts = Options::default();
    opts.defaults.connect_timeout = Duration::from_secs(2);
    opts.defaults.body_limit = 42;
    let (p, d) = policy_with(&[], &opts);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(p.connect_timeout, Duration::from_secs(2));
    assert_eq!(p.read_timeout, model::DEFAULT_READ_TIMEOUT);
    assert_eq!(p.body_limit, 42);
    assert_eq!(p.ssl_redirect, SslRedirect::Yes);
    assert_eq!(p.hsts, None);
    assert_eq!(p.max_concurrent_requests, None);
    opts.defaults.ssl_redirect = false;
    assert_eq!(policy_with(&[], &opts).0.ssl_redirect, SslRedirect::No);
}

/// ingress-nginx access-control annotations portico cannot enforce close the Ingress's routes
/// (503, an Error) rather than serve them open; its paths stay claimed, so a catch-all rule of
/// another Ingress does not serve them either.
#[test]
fn unsupported_access_control_annotations_close_the_routes() {
    for (name, value) in [
        ("auth-url", "http://auth.svc/verify"),
        ("auth-type", "basic"),
        ("whitelist-source-range", "10.0.0.0/8"),
        ("auth-tls-verify-client", "on"),
        // ingress-nginx's auth-tls-verify-client defaults to "on".
        ("auth-tls-secret", "default/client-ca"),
        // A snippet that restricts access.
        (
            "configuration-snippet",
            "more_set_headers \"X-Frame-Options: DENY\";\nallow 10.0.0.0/8;\ndeny all;",
        ),
        ("server-snippet", "location /x { auth_request /auth; }"),
        // Comment lines before the directives.
        (
            "configuration-snippet",
            "# office only\nallow 10.0.0.0/8;\n# everyone else\ndeny all;",
        ),
    ] {
        let w = World::web()
            .ing(
                Ing::new("default", "admin")
                    .created("2020-01-01T00:00:00Z")
                    .ann(&format!("nginx.ingress.kubernetes.io/{name}"), value)
                    .path("h.test", "Prefix", "/admin", "web", svc80()),
            )
            .ing(Ing::new("default", "site").path("h.test", "Prefix", "/", "web", svc80()));
        let (s, d) = w.run();
        let diag = only(&d, Severity::Error, "UnsupportedAnnotation");
        assert!(diag.message.contains(name), "{name}: {}", diag.message);
        assert_eq!(diag.name, "admin");
        assert_eq!(hit(&s, "h.test", "/admin/x"), "503", "{name}");
        assert_eq!(hit(&s, "h.test", "/other"), "default/web:80", "{name}");
    }
    // A snippet without access directives (a commented one included) only warns.
    let (s, d) = World::web()
        .ing(
            Ing::new("default", "a")
                .ann(
                    "nginx.ingress.kubernetes.io/configuration-snippet",
                    "more_set_headers \"X-Deny: allow\";\n# deny all;",
                )
                .path("h.test", "Prefix", "/", "web", svc80()),
        )
        .run();
    only(&d, Severity::Warning, "UnsupportedAnnotation");
    assert_eq!(hit(&s, "h.test", "/"), "default/web:80");
    // Asking for no client certificate asks for nothing, with or without a CA.
    let (s, d) = World::web()
        .ing(
            Ing::new("default", "a")
                .ann("nginx.ingress.kubernetes.io/auth-tls-verify-client", "off")
                .ann("nginx.ingress.kubernetes.io/auth-tls-secret", "default/ca")
                .path("h.test", "Prefix", "/", "web", svc80()),
        )
        .run();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(hit(&s, "h.test", "/"), "default/web:80");
}

/// An ingress-nginx canary Ingress adds a weighted or header-selected backend to another
/// Ingress's paths. portico does not split traffic: the canary is not served (whatever its
/// age, so it never takes the main Ingress's paths), with a Warning; the main Ingress serves
/// everything. `canary: "false"` is an ordinary Ingress.
#[test]
fn a_canary_ingress_is_not_served_and_says_so() {
    let (s, d) = World::web()
        .ing(
            Ing::new("default", "canary")
                .created("2020-01-01T00:00:00Z")
                .ann("nginx.ingress.kubernetes.io/canary", "true")
                .ann("nginx.ingress.kubernetes.io/canary-by-header", "x-canary")
                .path("h.test", "Prefix", "/", "web-v2", svc80())
                .path("h.test", "Prefix", "/only-canary", "web-v2", svc80()),
        )
        .ing(
            Ing::new("default", "main")
                .created("2021-01-01T00:00:00Z")
                .path("h.test", "Prefix", "/", "web", svc80()),
        )
        .run();
    let diag = only(&d, Severity::Warning, "UnsupportedAnnotation");
    assert_eq!(diag.name, "canary");
    assert!(diag.message.contains("not served"), "{}", diag.message);
    assert_eq!(hit(&s, "h.test", "/"), "default/web:80");
    assert_eq!(hit(&s, "h.test", "/only-canary"), "default/web:80");
    let (s, d) = World::web()
        .ing(
            Ing::new("default", "a")
                .ann("nginx.ingress.kubernetes.io/canary", "false")
                .path("h.test", "Prefix", "/", "web", svc80()),
        )
        .run();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(hit(&s, "h.test", "/"), "default/web:80");
}

/// ingress-nginx routing annotations portico does not implement are served as written, with a
/// Warning that says so (a migrating user would otherwise see silent 404s or misrouting).
#[test]
fn unsupported_routing_annotations_warn() {
    let (s, d) = World::web()
        .ing(
            Ing::new("default", "a")
                .ann("nginx.ingress.kubernetes.io/use-regex", "true")
                .ann("nginx.ingress.kubernetes.io/rewrite-target", "/$1")
                .path("h.test", "ImplementationSpecific", "/api", "web", svc80()),
        )
        .run();
    let warned: Vec<&str> = d
        .iter()
        .filter(|d| d.reason == "UnsupportedAnnotation" && d.severity == Severity::Warning)
        .map(|d| d.message.as_str())
        .collect();
    assert_eq!(warned.len(), 2, "{d:?}");
    assert!(warned.iter().any(|m| m.contains("use-regex")));
    assert!(warned.iter().any(|m| m.contains("rewrite-target")));
    assert_eq!(hit(&s, "h.test", "/api/v1"), "default/web:80");
    let (_, d) = World::web()
        .ing(
            Ing::new("default", "a")
                .ann("nginx.ingress.kubernetes.io/use-regex", "false")
                .path("h.test", "Prefix", "/", "web", svc80()),
        )
        .run();
    assert!(d.is_empty(), "{d:?}");
    // A forced redirect and affinity cookie attributes portico does not honour warn too, each
    // saying what happens instead; `force-ssl-redirect: "false"` asks for nothing.
    let (_, d) = World::web()
        .ing(
            Ing::new("default", "a")
                .ann("nginx.ingress.kubernetes.io/force-ssl-redirect", "true")
                .ann("nginx.ingress.kubernetes.io/affinity", "cookie")
                .ann(
                    "nginx.ingress.kubernetes.io/session-cookie-samesite",
                    "None",
                )
                .path("h.test", "Prefix", "/", "web", svc80()),
        )
        .run();
    let warned: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(warned.len(), 2, "{d:?}");
    assert!(
        warned[0].contains("force-ssl-redirect") && warned[0].contains("only on hosts with TLS")
    );
    assert!(warned[1].contains("session-cookie-samesite") && warned[1].contains("SameSite=Lax"));
    // Annotations users take for limits, and ones that change which hosts or how TLS reaches
    // the backend.
    for (name, says) in [
        ("limit-rps", "RateLimitPolicy"),
        ("limit-rpm", "RateLimitPolicy"),
        ("limit-connections", "max-concurrent-requests"),
        ("server-alias", "only the rule's host"),
        ("ssl-passthrough", "plain HTTP"),
    ] {
        let (_, d) = World::web()
            .ing(
                Ing::new("default", "a")
                    .ann(&format!("nginx.ingress.kubernetes.io/{name}"), "10")
                    .path("h.test", "Prefix", "/", "web", svc80()),
            )
            .run();
        let diag = only(&d, Severity::Warning, "UnsupportedAnnotation");
        assert!(
            diag.message.contains(name) && diag.message.contains(says),
            "{name}: {}",
            diag.message
        );
    }
    let (_, d) = World::web()
        .ing(
            Ing::new("default", "a")
                .ann("nginx.ingress.kubernetes.io/force-ssl-redirect", "false")
                .path("h.test", "Prefix", "/", "web", svc80()),
        )
        .run();
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn annotation_ssl_redirect_opt_out_under_both_names() {
    let o = Options::default();
    for name in [
        "portico.dev/ssl-redirect",
        "nginx.ingress.kubernetes.io/ssl-redirect",
    ] {
        let (p, d) = policy_with(&[(name, "false")], &o);
        assert_eq!(p.ssl_redirect, SslRedirect::No, "{name}");
        assert!(d.is_empty());
    }
    // ingress-nginx reads booleans with Go's strconv.ParseBool.
    for (value, want) in [
        ("0", SslRedirect::No),
        ("f", SslRedirect::No),
        ("FALSE", SslRedirect::No),
        ("1", SslRedirect::Yes),
        ("T", SslRedirect::Yes),
    ] {
        let (p, d) = policy_with(&[("nginx.ingress.kubernetes.io/ssl-redirect", value)], &o);
        assert_eq!(p.ssl_redirect, want, "{value}");
        assert!(d.is_empty(), "{value}: {d:?}");
    }
    // portico.dev wins over the nginx name.
    let (p, _) = policy_with(
        &[
            ("portico.dev/ssl-redirect", "true"),
            ("nginx.ingress.kubernetes.io/ssl-redirect", "false"),
        ],
        &o,
    );
    assert_eq!(p.ssl_redirect, SslRedirect::Yes);
}

#[test]
fn annotation_values_and_bad_values() {
    let o = Options::default();
    type Check = fn(&RoutePolicy) -> bool;
    let cases: Vec<(&str, &str, Option<Check>)> = vec![
        (
            "nginx.ingress.kubernetes.io/proxy-body-size",
            "8m",
            Some(|p| p.body_limit == 8 << 20),
        ),
        (
            "nginx.ingress.kubernetes.io/proxy-body-size",
            "512k",
            Some(|p| p.body_limit == 512 << 10),
        ),
        (
            "portico.dev/proxy-body-size",
            "1G",
            Some(|p| p.body_limit == 1 << 30),
        ),
        (
            "portico.dev/proxy-body-size",
            "1000",
            Some(|p| p.body_limit == 1000),
        ),
        (
            "portico.dev/proxy-body-size",
            "0",
            Some(|p| p.body_limit == 0),
        ),
        ("portico.dev/proxy-body-size", "8x", None),
        ("portico.dev/proxy-body-size", "-1", None),
        ("portico.dev/proxy-body-size", "99999999999999999999g", None),
        (
            "nginx.ingress.kubernetes.io/proxy-connect-timeout",
            "10",
            Some(|p| p.connect_timeout == Duration::from_secs(10)),
        ),
        (
            "portico.dev/proxy-connect-timeout",
            "1500ms",
            Some(|p| p.connect_timeout == Duration::from_millis(1500)),
        ),
        ("portico.dev/proxy-connect-timeout", "0", None),
        ("portico.dev/proxy-connect-timeout", "soon", None),
        (
            "nginx.ingress.kubernetes.io/proxy-read-timeout",
            "120",
            Some(|p| p.read_timeout == Duration::from_secs(120)),
        ),
        (
            "portico.dev/proxy-read-timeout",
            "1m30s",
            Some(|p| p.read_timeout == Duration::from_secs(90)),
        ),
        ("portico.dev/proxy-read-timeout", "5 s", None),
        (
            "portico.dev/hsts",
            "true",
            Some(|p| p.hsts.as_deref() == Some("max-age=31536000")),
        ),
        ("portico.dev/hsts", "false", Some(|p| p.hsts.is_none())),
        ("portico.dev/hsts", "yes", None),
        // Only true/false: a browser remembers HSTS, so "1" is not taken for "true".
        ("portico.dev/hsts", "1", None),
        (
            "portico.dev/max-concurrent-requests",
            "5",
            Some(|p| p.max_concurrent_requests == Some(5)),
        ),
        ("portico.dev/max-concurrent-requests", "0", None),
        ("portico.dev/max-concurrent-requests", "many", None),
        ("portico.dev/ssl-redirect", "nope", None),
        ("portico.dev/backend-protocol", "SPDY", None),
    ];
    let default = policy_with(&[], &o).0;
    for (name, value, check) in cases {
        let (p, d) = policy_with(&[(name, value)], &o);
        match check {
            Some(check) => {
                assert!(d.is_empty(), "{name}={value}: {d:?}");
                assert!(check(&p), "{name}={value}: {p:?}");
            }
            None => {
                let diag = only(&d, Severity::Warning, "InvalidAnnotation");
                assert!(
                    diag.message.contains(name) && diag.message.contains(value),
                    "{}",
                    diag.message
                );
                assert_eq!(p, default, "{name}={value}: default used");
            }
        }
    }
}

#[test]
fn annotation_hsts_uses_configured_max_age_and_hsts_has_no_nginx_name() {
    let mut o = Options::default();
    o.defaults.hsts_max_age = Duration::from_secs(600);
    assert_eq!(
        policy_with(&[("portico.dev/hsts", "true")], &o)
            .0
            .hsts
            .as_deref(),
        Some("max-age=600")
    );
    assert_eq!(
        policy_with(&[("nginx.ingress.kubernetes.io/hsts", "true")], &o)
            .0
            .hsts,
        None
    );
}

// ---------------------------------------------------------------------------------------------
// Load balancing and health-check annotations (brief §4.6)
// ---------------------------------------------------------------------------------------------

#[test]
fn annotation_load_balance_values_and_bad_values() {
    use crate::model::{HashKey, LoadBalance};
    let o = Options::default();
    let cookie = |name: &str, ttl: Option<u64>| {
        LoadBalance::ConsistentHash(HashKey::Cookie {
            name: name.to_string(),
            ttl: ttl.map(Duration::from_secs),
        })
    };
    // (annotations, expected strategy, expected warning-free)
    type Case<'a> = (Vec<(&'a str, &'a str)>, LoadBalance, bool);
    let cases: Vec<Case> = vec![
        (vec![], LoadBalance::RoundRobin, true),
        (
            vec![("portico.dev/load-balance", "round-robin")],
            LoadBalance::RoundRobin,
            true,
        ),
        (
            vec![("portico.dev/load-balance", "least-request")],
            LoadBalance::LeastRequest,
            true,
        ),
        (
            vec![("portico.dev/load-balance", "random")],
            LoadBalance::Random,
            true,
        ),
        (
            vec![("portico.dev/load-balance", "consistent-hash")],
            LoadBalance::ConsistentHash(HashKey::ClientIp),
            true,
        ),
        (
            vec![
                ("portico.dev/load-balance", "consistent-hash"),
                ("portico.dev/hash-key", "header:X-User"),
            ],
            LoadBalance::ConsistentHash(HashKey::Header("x-user".to_string())),
            true,
        ),
        (
            vec![
                ("portico.dev/load-balance", "consistent-hash"),
                ("portico.dev/hash-key", "cookie:sticky"),
            ],
            cookie("sticky", None),
            true,
        ),
        (
            vec![
                ("portico.dev/load-balance", "consistent-hash"),
                ("portico.dev/hash-key", "cookie:sticky"),
                ("portico.dev/hash-cookie-ttl", "1h"),
            ],
            cookie("sticky", Some(3600)),
            true,
        ),
        // Bad values: Warning + default.
        (
            vec![("portico.dev/load-balance", "ewma")],
            LoadBalance::RoundRobin,
            false,
        ),
        (
            vec![
                ("portico.dev/load-balance", "consistent-hash"),
                ("portico.dev/hash-key", "header:bad name"),
            ],
            LoadBalance::ConsistentHash(HashKey::ClientIp),
            false,
        ),
        (
            vec![
                ("portico.dev/load-balance", "consistent-hash"),
                ("portico.dev/hash-key", "cookie:"),
            ],
            LoadBalance::ConsistentHash(HashKey::ClientIp),
            false,
        ),
        (
            vec![
                ("portico.dev/load-balance", "consistent-hash"),
                ("portico.dev/hash-key", "cookie:s"),
                ("portico.dev/hash-cookie-ttl", "0"),
            ],
            cookie("s", None),
            false,
        ),
        // hash-key alone: ignored with a warning.
        (
            vec![("portico.dev/hash-key", "client-ip")],
            LoadBalance::RoundRobin,
            false,
        ),
        // ingress-nginx sticky sessions.
        (
            vec![("nginx.ingress.kubernetes.io/affinity", "cookie")],
            cookie("INGRESSCOOKIE", None),
            true,
        ),
        (
            vec![
                ("nginx.ingress.kubernetes.io/affinity", "cookie"),
                ("nginx.ingress.kubernetes.io/session-cookie-name", "route"),
                (
                    "nginx.ingress.kubernetes.io/session-cookie-max-age",
                    "172800",
                ),
            ],
            cookie("route", Some(172_800)),
            true,
        ),
        // A cookie name or lifetime that cannot be used is replaced, with a warning.
        (
            vec![
                ("nginx.ingress.kubernetes.io/affinity", "cookie"),
                (
                    "nginx.ingress.kubernetes.io/session-cookie-name",
                    "bad name",
                ),
            ],
            cookie("INGRESSCOOKIE", None),
            false,
        ),
        (
            vec![
                ("nginx.ingress.kubernetes.io/affinity", "cookie"),
                ("nginx.ingress.kubernetes.io/session-cookie-max-age", "2d"),
            ],
            cookie("INGRESSCOOKIE", None),
            false,
        ),
        // portico's own annotation wins over the nginx one.
        (
            vec![
                ("nginx.ingress.kubernetes.io/affinity", "cookie"),
                ("portico.dev/load-balance", "random"),
            ],
            LoadBalance::Random,
            true,
        ),
    ];
    for (anns, want, clean) in cases {
        let (p, d) = policy_with(&anns, &o);
        assert_eq!(p.load_balance, want, "{anns:?}");
        if clean {
            assert!(d.is_empty(), "{anns:?}: {d:?}");
        } else {
            only(&d, Severity::Warning, "InvalidAnnotation");
        }
    }
}

/// The health check the backend of `h.test/` carries.
fn health_check_of(s: &Snapshot, host: &str) -> Option<model::HealthCheck> {
    let r = route(s, host, "/").expect("route");
    let RouteTarget::Backend(id) = r.target else {
        panic!("unavailable route")
    };
    s.backends
        .get(id)
        .expect("backend")
        .health_check
        .as_deref()
        .cloned()
}

#[test]
fn annotation_health_check_defaults_values_and_bad_values() {
    let base = |anns: &[(&str, &str)]| {
        let mut ing = Ing::new("default", "a").path("h.test", "Prefix", "/", "web", svc80());
        for (k, v) in anns {
            ing = ing.ann(k, v);
        }
        World::web().ing(ing).run()
    };
    let (s, d) = base(&[]);
    assert!(d.is_empty());
    assert_eq!(health_check_of(&s, "h.test"), None);

    let (s, d) = base(&[("portico.dev/health-check-path", "/healthz")]);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        health_check_of(&s, "h.test"),
        Some(model::HealthCheck {
            path: "/healthz".to_string(),
            interval: model::DEFAULT_HEALTH_CHECK_INTERVAL,
            timeout: model::DEFAULT_HEALTH_CHECK_TIMEOUT,
            healthy_threshold: model::DEFAULT_HEALTHY_THRESHOLD,
            unhealthy_threshold: model::DEFAULT_UNHEALTHY_THRESHOLD,
        })
    );

    let (s, d) = base(&[
        ("portico.dev/health-check-path", "/ready?deep=1"),
        ("portico.dev/health-check-interval", "1500ms"),
        ("portico.dev/health-check-timeout", "1"),
        ("portico.dev/health-check-healthy-threshold", "1"),
        ("portico.dev/health-check-unhealthy-threshold", "4"),
    ]);
    assert!(d.is_empty(), "{d:?}");
    let hc = health_check_of(&s, "h.test").expect("check");
    assert_eq!(hc.path, "/ready?deep=1");
    assert_eq!(hc.interval, Duration::from_millis(1500));
    assert_eq!(hc.timeout, Duration::from_secs(1));
    assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (1, 4));

    // Tuning without a path: nothing to check (no warning, the values are just unused).
    let (s, _) = base(&[("portico.dev/health-check-interval", "5s")]);
    assert_eq!(health_check_of(&s, "h.test"), None);

    // Bad values: Warning, default used (a bad path turns the check off).
    type Check = fn(Option<model::HealthCheck>) -> bool;
    let cases: Vec<(&str, &str, Check)> = vec![
        ("portico.dev/health-check-path", "healthz", |h| h.is_none()),
        ("portico.dev/health-check-path", "/a b", |h| h.is_none()),
        ("portico.dev/health-check-interval", "0", |h| {
            h.is_some_and(|h| h.interval == model::DEFAULT_HEALTH_CHECK_INTERVAL)
        }),
        // Under a second (kubelet's shortest probe period too): a probe per endpoint back to
        // back is refused.
        ("portico.dev/health-check-interval", "999ms", |h| {
            h.is_some_and(|h| h.interval == model::DEFAULT_HEALTH_CHECK_INTERVAL)
        }),
        ("portico.dev/health-check-timeout", "fast", |h| {
            h.is_some_and(|h| h.timeout == model::DEFAULT_HEALTH_CHECK_TIMEOUT)
        }),
        ("portico.dev/health-check-healthy-threshold", "0", |h| {
            h.is_some_and(|h| h.healthy_threshold == model::DEFAULT_HEALTHY_THRESHOLD)
        }),
        ("portico.dev/health-check-unhealthy-threshold", "-2", |h| {
            h.is_some_and(|h| h.unhealthy_threshold == model::DEFAULT_UNHEALTHY_THRESHOLD)
        }),
    ];
    for (name, value, check) in cases {
        let mut anns = vec![(name, value)];
        if name != "portico.dev/health-check-path" {
            anns.push(("portico.dev/health-check-path", "/healthz"));
        }
        let (s, d) = base(&anns);
        let diag = only(&d, Severity::Warning, "InvalidAnnotation");
        assert!(diag.message.contains(name), "{}", diag.message);
        assert!(check(health_check_of(&s, "h.test")), "{name}={value}");
    }
}

/// Probes speak HTTP/1.1, so an h2c (gRPC) backend gets no active check and a Warning instead
/// of having every endpoint marked down.
#[test]
fn health_check_on_an_h2c_backend_is_ignored_with_a_warning() {
    let (s, d) = World::web()
        .ing(
            Ing::new("default", "grpc")
                .ann("portico.dev/health-check-path", "/healthz")
                .ann("portico.dev/backend-protocol", "GRPC")
                .path("h.test", "Prefix", "/", "web", svc80()),
        )
        .run();
    assert_eq!(health_check_of(&s, "h.test"), None);
    let diag = only(&d, Severity::Warning, "HealthCheckUnsupported");
    assert_eq!(diag.name, "grpc");
}

#[test]
fn health_check_per_service_oldest_ingress_wins_others_warned() {
    let w = World::web()
        .ing(
            Ing::new("default", "young")
                .created("2025-06-01T00:00:00Z")
                .ann("portico.dev/health-check-path", "/young")
                .path("y.test", "Prefix", "/", "web", svc80()),
        )
        .ing(
            Ing::new("default", "old")
                .created("2024-01-01T00:00:00Z")
                .ann("portico.dev/health-check-path", "/old")
                .path("o.test", "Prefix", "/", "web", svc80()),
        )
        // No annotation: no opinion, does not turn the check off.
        .ing(
            Ing::new("default", "quiet")
                .created("2023-01-01T00:00:00Z")
                .path("q.test", "Prefix", "/", "web", svc80()),
        );
    let (s, d) = w.run();
    for host in ["y.test", "o.test", "q.test"] {
        assert_eq!(
            health_check_of(&s, host).map(|h| h.path),
            Some("/old".to_string()),
            "{host}: one backend, one check"
        );
    }
    let diag = only(&d, Severity::Warning, "HealthCheckConflict");
    assert_eq!(diag.name, "young");
    assert!(diag.message.contains("default/web:80"), "{}", diag.message);

    // The same check from two Ingresses is no conflict.
    let same = World::web()
        .ing(
            Ing::new("default", "a")
                .ann("portico.dev/health-check-path", "/h")
                .path("a.test", "Prefix", "/", "web", svc80()),
        )
        .ing(
            Ing::new("default", "b")
                .ann("portico.dev/health-check-path", "/h")
                .path("b.test", "Prefix", "/", "web", svc80()),
        );
    let (_, d) = same.run();
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn describe_shows_load_balance_and_health_check() {
    let (s, _) = World::web()
        .ing(
            Ing::new("default", "a")
                .ann("portico.dev/load-balance", "consistent-hash")
                .ann("portico.dev/hash-key", "cookie:sid")
                .ann("portico.dev/hash-cookie-ttl", "30m")
                .ann("portico.dev/health-check-path", "/healthz")
                .path("h.test", "Prefix", "/", "web", svc80()),
        )
        .run();
    let text = describe(&s);
    for needle in [
        "{load-balance=consistent-hash(cookie:sid, ttl=1800s)}",
        "(health check GET /healthz every 10s timeout 2s up 2 down 3)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Determinism and robustness
// ---------------------------------------------------------------------------------------------

fn busy_world() -> World {
    World::web()
        .web_in("other")
        .svc(svc("default", "api", &[("http", 80)]))
        .slice(slice(
            "default",
            "api-b",
            "api",
            "IPv4",
            &[("http", 9000)],
            vec![ready("10.1.0.2")],
        ))
        .slice(slice(
            "default",
            "api-a",
            "api",
            "IPv4",
            &[("http", 9000)],
            vec![ready("10.1.0.1")],
        ))
        .secret(tls_secret("default", "t", &["shop.test"]))
        .ing(
            Ing::new("default", "shop")
                .tls(Some(&["shop.test"]), "t")
                .path("shop.test", "Prefix", "/", "web", svc80())
                .path("shop.test", "Exact", "/api", "api", svc80()),
        )
        .ing(
            Ing::new("other", "shop")
                .path("shop.test", "Prefix", "/", "web", svc80())
                .path("shop.test", "Prefix", "/o", "web", svc80()),
        )
        .ing(
            Ing::new("default", "broken")
                .path("BAD_HOST", "Prefix", "/", "web", svc80())
                .path("x.test", "Prefix", "/", "missing", svc80()),
        )
        .ing(
            Ing::new("default", "wild")
                .path("*.shop.test", "Prefix", "/", "api", svc80())
                .default_backend("web", 80),
        )
}

#[test]
fn determinism_shuffled_inputs_give_equal_snapshot_and_diagnostics() {
    let base = busy_world();
    let (s0, d0) = base.run();
    assert!(!d0.is_empty());
    let mut sorted = d0.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(d0, sorted, "diagnostics come sorted and deduplicated");
    for rot in 0..4 {
        let mut w = base.clone();
        let i = &mut w.0;
        i.ingresses.reverse();
        let n = i.ingresses.len();
        i.ingresses.rotate_left(rot % n);
        i.services.reverse();
        let n = i.endpoint_slices.len();
        i.endpoint_slices.rotate_left(rot % n);
        i.secrets.reverse();
        let (s, d) = w.run();
        assert_eq!(s, s0, "rotation {rot}");
        assert_eq!(d, d0, "rotation {rot}");
        assert_eq!(describe(&s), describe(&s0), "rotation {rot}");
    }
}

#[test]
fn duplicate_objects_are_resolved_deterministically() {
    let a = Ing::new("default", "dup").path("a.test", "Prefix", "/", "web", svc80());
    let b = Ing::new("default", "dup").path("b.test", "Prefix", "/", "web", svc80());
    let (s1, d1) = World::web().ing(a.clone()).ing(b.clone()).run();
    let (s2, d2) = World::web().ing(b).ing(a).run();
    assert_eq!(s1, s2);
    assert_eq!(d1, d2);
    only(&d1, Severity::Warning, "DuplicateObject");
}

#[test]
fn robustness_empty_and_odd_objects_do_not_panic() {
    let mut w = World::web();
    w.0.ingresses.push(Arc::new(Ingress::default()));
    w.0.ingresses
        .push(Arc::new(from(json!({"metadata": {"name": "nospec"}}))));
    w.0.services.push(Arc::new(Svc::from(Service::default())));
    w.0.endpoint_slices
        .push(Arc::new(Slice::from(EndpointSlice::default())));
    w.0.secrets.push(Arc::new(Secret::default()));
    w.0.ingress_classes.push(Arc::new(IngressClass::default()));
    let w = w.ing(Ing::new("default", "empty-rule").raw_path("h.test", json!({})));
    let (s, d) = w.run();
    assert!(s.hosts.exact.contains_key("h.test"));
    assert_eq!(hit(&s, "h.test", "/"), "503");
    assert!(
        d.iter()
            .all(|d| d.severity == Severity::Warning || d.reason == "InvalidBackend"),
        "{d:?}"
    );
}

#[test]
fn describe_lists_hosts_routes_backends_and_tls() {
    let (s, _) = busy_world().run();
    let text = describe(&s);
    for needle in [
        "  shop.test\n",
        "    Exact /api [default/shop] -> backend default/api:80 {ssl-redirect=true}\n",
        "  *.shop.test\n",
        "default route:\n  Prefix / [default/wild] -> backend default/web:80\n",
        "  default/api:80 -> 10.1.0.1:9000, 10.1.0.2:9000\n",
        "unavailable (503): Service default/missing not found",
        "  shop.test -> default/t\n",
        "  (default) -> generated\n",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// RateLimitPolicy → model::RateLimit (brief §4.5)
// ---------------------------------------------------------------------------------------------

fn rlp(ns: &str, name: &str, uid: Option<&str>, spec: Value) -> Arc<crate::crd::RateLimitPolicy> {
    let mut meta = json!({"namespace": ns, "name": name});
    if let Some(u) = uid {
        meta["uid"] = json!(u);
    }
    Arc::new(from(
        json!({"apiVersion": "portico.dev/v1alpha1", "kind": "RateLimitPolicy",
                         "metadata": meta, "spec": spec}),
    ))
}

fn limits_of(snap: &Snapshot, host: &str, path: &str) -> Vec<crate::model::RateLimit> {
    route(snap, host, path)
        .expect("routed")
        .policy
        .rate_limits
        .to_vec()
}

/// A world with Ingress `shop` (two paths and a default backend) and Ingress `free`.
fn limited_world(policies: Vec<Arc<crate::crd::RateLimitPolicy>>) -> World {
    let mut w = World::web()
        .ing(
            Ing::new("default", "shop")
                .path("shop.test", "Prefix", "/", "web", svc80())
                .path("shop.test", "Exact", "/login", "web", svc80())
                .default_backend("web", 80),
        )
        .ing(Ing::new("default", "free").path("free.test", "Prefix", "/", "web", svc80()));
    w.0.rate_limit_policies = policies;
    w
}

#[test]
fn ratelimit_valid_policy_applies_to_every_route_of_its_ingress_only() {
    use crate::model::{PolicyRef, RateLimit, RateLimitKey, TokenBucketSpec};
    let (s, d) = limited_world(vec![rlp(
        "default",
        "shop-limit",
        Some("uid-1"),
        json!({"targetRef": {"kind": "Ingress", "name": "shop"},
               "limit": {"requests": 100, "period": "1m", "burst": 20},
               "maxInFlight": 50}),
    )])
    .run();
    assert!(d.is_empty(), "{d:?}");
    let want = vec![RateLimit {
        policy: PolicyRef {
            namespace: "default".into(),
            name: "shop-limit".into(),
            uid: "uid-1".into(),
        },
        bucket: Some(TokenBucketSpec {
            requests: 100,
            period: Duration::from_secs(60),
            burst: 20,
        }),
        // Default key: ClientIP.
        key: RateLimitKey::ClientIp,
        max_in_flight: Some(50),
    }];
    assert_eq!(limits_of(&s, "shop.test", "/"), want);
    assert_eq!(limits_of(&s, "shop.test", "/login"), want);
    // The default backend is a route of `shop` too (host-less, unknown host).
    assert_eq!(limits_of(&s, "other.test", "/x"), want);
    assert!(limits_of(&s, "free.test", "/").is_empty());
}

#[test]
fn ratelimit_several_policies_all_apply_in_name_order_with_keys_and_defaults() {
    use crate::model::RateLimitKey;
    let (s, d) = limited_world(vec![
        rlp(
            "default",
            "zz-global",
            None,
            json!({"targetRef": {"kind": "Ingress", "name": "shop"},
                   "limit": {"requests": 5, "period": "1s"}, "key": {"type": "Global"}}),
        ),
        rlp(
            "default",
            "aa-header",
            None,
            json!({"targetRef": {"kind": "Ingress", "name": "shop"},
                   "limit": {"requests": 2, "period": "1h30m"},
                   "key": {"type": "Header", "name": "X-Api-Key"}}),
        ),
        rlp(
            "default",
            "mm-cap",
            None,
            json!({"targetRef": {"kind": "Ingress", "name": "shop"}, "maxInFlight": 3}),
        ),
    ])
    .run();
    assert!(d.is_empty(), "{d:?}");
    let got = limits_of(&s, "shop.test", "/");
    let names: Vec<&str> = got.iter().map(|l| &*l.policy.name).collect();
    assert_eq!(names, ["aa-header", "mm-cap", "zz-global"]);
    // No uid (file provider): empty, so the identity is namespace/name.
    assert!(got.iter().all(|l| l.policy.uid.is_empty()));
    // Header names are stored lower-case; burst defaults to requests.
    assert_eq!(got[0].key, RateLimitKey::Header("x-api-key".into()));
    let b = got[0].bucket.expect("bucket");
    assert_eq!((b.requests, b.burst), (2, 2));
    assert_eq!(b.period, Duration::from_secs(5400));
    assert_eq!((got[1].bucket, got[1].max_in_flight), (None, Some(3)));
    assert_eq!(got[2].key, RateLimitKey::Global);
}

#[test]
fn ratelimit_invalid_policies_are_diagnosed_and_not_applied() {
    let cases: &[(&str, Value, &str)] = &[
        (
            "wrong-kind",
            json!({"targetRef": {"kind": "Service", "name": "shop"},
                   "limit": {"requests": 1, "period": "1s"}}),
            "InvalidTargetKind",
        ),
        (
            "missing-target",
            json!({"targetRef": {"kind": "Ingress", "name": "gone"},
                   "limit": {"requests": 1, "period": "1s"}}),
            "TargetNotFound",
        ),
        (
            "zero-requests",
            json!({"targetRef": {"kind": "Ingress", "name": "shop"},
                   "limit": {"requests": 0, "period": "1s"}}),
            "InvalidPolicy",
        ),
        (
            "bad-period",
            json!({"targetRef": {"kind": "Ingress", "name": "shop"},
                   "limit": {"requests": 1, "period": "1 minute"}}),
            "InvalidPolicy",
        ),
        (
            "zero-burst",
            json!({"targetRef": {"kind": "Ingress", "name": "shop"},
                   "limit": {"requests": 1, "period": "1s", "burst": 0}}),
            "InvalidPolicy",
        ),
        (
            "nothing",
            json!({"targetRef": {"kind": "Ingress", "name": "shop"}}),
            "InvalidPolicy",
        ),
        (
            "header-without-name",
            json!({"targetRef": {"kind": "Ingress", "name": "shop"},
                   "limit": {"requests": 1, "period": "1s"}, "key": {"type": "Header"}}),
            "InvalidPolicy",
        ),
    ];
    for (name, spec, reason) in cases {
        let (s, d) = limited_world(vec![rlp("default", name, None, spec.clone())]).run();
        let diag = only(&d, Severity::Error, reason);
        assert_eq!(
            (diag.kind.as_str(), diag.name.as_str()),
            ("RateLimitPolicy", *name)
        );
        // Not applied at all: the target is served unlimited (brief §4.5).
        assert!(limits_of(&s, "shop.test", "/").is_empty(), "{name}");
    }
}

#[test]
fn ratelimit_policy_in_another_namespace_does_not_reach_the_ingress() {
    let mut w = limited_world(vec![rlp(
        "other",
        "cross",
        None,
        json!({"targetRef": {"kind": "Ingress", "name": "shop"},
               "limit": {"requests": 1, "period": "1s"}}),
    )]);
    w = w.web_in("other");
    let (s, d) = w.run();
    only(&d, Severity::Error, "TargetNotFound");
    assert!(limits_of(&s, "shop.test", "/").is_empty());
}

/// A targetRef naming another namespace is refused, not applied to the same-named Ingress of
/// the policy's own namespace; naming its own namespace is fine.
#[test]
fn ratelimit_cross_namespace_target_is_refused() {
    let spec = |ns: &str| {
        json!({"targetRef": {"kind": "Ingress", "name": "shop", "namespace": ns},
               "limit": {"requests": 1, "period": "1s"}})
    };
    let (s, d) = limited_world(vec![rlp("default", "cross", None, spec("other"))]).run();
    let diag = only(&d, Severity::Error, "InvalidTarget");
    assert!(diag.message.contains("\"other\""), "{}", diag.message);
    assert!(limits_of(&s, "shop.test", "/").is_empty());
    let (s, d) = limited_world(vec![rlp("default", "own", None, spec("default"))]).run();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(limits_of(&s, "shop.test", "/").len(), 1);
}

/// A policy on an Ingress of another class applies to nothing, and says so (Accepted=False),
/// instead of reporting itself applied.
#[test]
fn ratelimit_target_of_another_class_is_not_served() {
    let mut w = limited_world(vec![rlp(
        "default",
        "elsewhere",
        None,
        json!({"targetRef": {"kind": "Ingress", "name": "theirs"},
               "limit": {"requests": 1, "period": "1s"}}),
    )]);
    w = w.ing(Ing::new("default", "theirs").class("nginx").path(
        "theirs.test",
        "Prefix",
        "/",
        "web",
        svc80(),
    ));
    let (_, d) = w.clone().run();
    let diag = only(&d, Severity::Error, "TargetNotServed");
    assert_eq!(diag.name, "elsewhere");
    // When another controller claims that class, the policy is its business: no diagnostic
    // here (two controllers would otherwise each report the other's policies).
    let (_, d) = w.class(class("nginx", "k8s.io/ingress-nginx", false)).run();
    assert!(d.is_empty(), "{d:?}");
    // A canary Ingress is not served either: its policy applies to nothing.
    let mut w = limited_world(vec![rlp(
        "default",
        "on-canary",
        None,
        json!({"targetRef": {"kind": "Ingress", "name": "canary"},
               "limit": {"requests": 1, "period": "1s"}}),
    )]);
    w = w.ing(
        Ing::new("default", "canary")
            .ann("nginx.ingress.kubernetes.io/canary", "true")
            .path("shop.test", "Prefix", "/", "web", svc80()),
    );
    let (_, d) = w.run();
    assert_eq!(
        reasons(&d),
        [
            (Severity::Warning, "UnsupportedAnnotation"),
            (Severity::Error, "TargetNotServed")
        ]
    );
}

#[test]
fn ratelimit_edit_changes_only_the_numbers_identity_is_stable() {
    let spec = |n: u32| {
        json!({"targetRef": {"kind": "Ingress", "name": "shop"},
               "limit": {"requests": n, "period": "1m"}})
    };
    let (a, _) = limited_world(vec![rlp("default", "p", Some("u"), spec(10))]).run();
    let (b, _) = limited_world(vec![rlp("default", "p", Some("u"), spec(20))]).run();
    let (la, lb) = (
        limits_of(&a, "shop.test", "/"),
        limits_of(&b, "shop.test", "/"),
    );
    assert_eq!(la[0].policy, lb[0].policy);
    assert_ne!(la[0].bucket, lb[0].bucket);
}

// ---------------------------------------------------------------------------------------------
// Incremental translation (brief §2: endpoint churn does not re-derive routes)

#[test]
fn translator_reuses_routes_when_only_endpoints_change_and_always_equals_translate() {
    let base = World::web()
        .class(class("portico", "portico.dev/ingress-controller", false))
        .ing(
            Ing::new("default", "a")
                .path("a.test", "Prefix", "/", "web", svc80())
                .ann("portico.dev/health-check-path", "/h"),
        )
        .ing(Ing::new("default", "b").path("b.test", "Exact", "/x", "missing", svc80()));
    let opts = Options::default();
    let mut t = crate::translate::Translator::new();
    let check = |t: &mut crate::translate::Translator, w: &World, opts: &Options| {
        let got = t.translate(&w.0, opts);
        assert_eq!(got, translate(&w.0, opts));
        t.reused()
    };
    assert!(!check(&mut t, &base, &opts), "first build derives");
    assert!(check(&mut t, &base, &opts), "nothing changed");

    // Only the EndpointSlice: new addresses, routes reused, result still exact.
    let mut moved = base.clone();
    moved.0.endpoint_slices = vec![Arc::new(Slice::from(slice(
        "default",
        "web-1",
        "web",
        "IPv4",
        &[("http", 8080)],
        vec![ready("10.0.0.7"), ready("10.0.0.8")],
    )))];
    assert!(check(&mut t, &moved, &opts), "endpoint-only change");

    // Same objects in another order, or equal fresh copies (a source re-reading them): reused.
    let mut shuffled = moved.clone();
    shuffled.0.ingresses.reverse();
    assert!(check(&mut t, &shuffled, &opts), "order does not matter");
    let mut copies = moved.clone();
    copies.0.services = copies
        .0
        .services
        .iter()
        .map(|s| Arc::new((**s).clone()))
        .collect();
    assert!(check(&mut t, &copies, &opts), "equal copies");

    // Anything else derives again: an Ingress edit, a new Service, another option.
    let edited = World::web()
        .class(class("portico", "portico.dev/ingress-controller", false))
        .ing(Ing::new("default", "a").path("a.test", "Prefix", "/", "web", svc80()))
        .ing(Ing::new("default", "b").path("b.test", "Exact", "/x", "missing", svc80()));
    assert!(!check(&mut t, &edited, &opts), "Ingress edit");
    let more = edited
        .clone()
        .svc(svc("default", "missing", &[("http", 80)]));
    assert!(!check(&mut t, &more, &opts), "new Service");
    let other = Options {
        ingress_class: "other".to_string(),
        ..Options::default()
    };
    assert!(!check(&mut t, &more, &other), "options changed");
}

/// A random EndpointSlice for the property test below: any of five Services in two namespaces
/// (one without a Service object), any address type, any subset of three ports, up to four
/// endpoints from a small address pool (so slices overlap) with random conditions, some
/// addresses invalid.
fn random_slice(rng: &mut fastrand::Rng, name: &str) -> EndpointSlice {
    let ns = ["default", "other"][rng.usize(..2)];
    let service = ["a", "b", "c", "d", "e"][rng.usize(..5)];
    let address_type = ["IPv4", "IPv4", "IPv6", "FQDN"][rng.usize(..4)];
    let all_ports = [("http", 8080), ("", 8081), ("admin", 9001)];
    let ports: Vec<(&str, i32)> = all_ports.into_iter().filter(|_| rng.bool()).collect();
    let cond = |rng: &mut fastrand::Rng| [None, Some(true), Some(false)][rng.usize(..3)];
    let endpoints = (0..rng.usize(..5))
        .map(|_| {
            let addr = match rng.usize(..8) {
                0 => "bogus".to_string(),
                1..4 => format!("fd00::{}", rng.usize(1..4)),
                _ => format!("10.0.0.{}", rng.usize(1..6)),
            };
            ep(&addr, cond(rng), cond(rng), cond(rng))
        })
        .collect();
    slice(ns, name, service, address_type, &ports, endpoints)
}

#[test]
fn translator_endpoint_updates_equal_full_translate_under_random_slice_churn() {
    // Backends: a (port name http), b (unnamed port), c twice (http and admin), d in another
    // namespace; Ingress e-route points at a Service that does not exist (no backend, but
    // slices labelled "e" come and go).
    let base = World::default()
        .svc(svc("default", "a", &[("http", 80)]))
        .svc(svc("default", "b", &[("", 80)]))
        .svc(svc("default", "c", &[("http", 80), ("admin", 90)]))
        .svc(svc("other", "d", &[("http", 80)]))
        .ing(
            Ing::new("default", "one")
                .path("one.test", "Prefix", "/a", "a", svc80())
                .path("one.test", "Prefix", "/b", "b", svc80())
                .path("one.test", "Prefix", "/c", "c", svc80())
                .path("one.test", "Prefix", "/c-admin", "c", json!("admin"))
                .path("one.test", "Prefix", "/e", "e", svc80()),
        )
        .ing(Ing::new("other", "two").path("two.test", "Prefix", "/", "d", svc80()));
    let opts = Options::default();
    for seed in 0..24 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut w = base.clone();
        let mut t = Translator::new();
        // The k8s-openapi objects the compact slices are converted from (same positions), so
        // the churn edits what a source would see.
        let mut raw: Vec<EndpointSlice> = Vec::new();
        let mut next_name = 0;
        let mut fresh_name = |rng: &mut fastrand::Rng| {
            next_name += 1;
            let _ = rng;
            format!("s{next_name}")
        };
        for _ in 0..3 {
            let name = fresh_name(&mut rng);
            raw.push(random_slice(&mut rng, &name));
            w.0.endpoint_slices
                .push(Arc::new(Slice::from(raw.last().expect("pushed"))));
        }
        let first = t.translate(&w.0, &opts);
        assert_eq!(first, translate(&w.0, &opts), "seed {seed}: first build");
        let mut previous = first.0;
        for step in 0..60 {
            let slices = &mut w.0.endpoint_slices;
            let n = slices.len();
            let op = rng.usize(..8);
            match op {
                // add
                0 => {
                    let name = fresh_name(&mut rng);
                    let at = rng.usize(..=n);
                    let s = random_slice(&mut rng, &name);
                    slices.insert(at, Arc::new(Slice::from(&s)));
                    raw.insert(at, s);
                }
                // delete
                1 if n > 0 => {
                    let i = rng.usize(..n);
                    slices.remove(i);
                    raw.remove(i);
                }
                // edit in place: same name, new content (maybe another Service, too)
                2 | 3 if n > 0 => {
                    let i = rng.usize(..n);
                    let name = slices[i].name().to_string();
                    raw[i] = random_slice(&mut rng, &name);
                    slices[i] = Arc::new(Slice::from(&raw[i]));
                }
                // relabel to another Service, endpoints unchanged
                4 if n > 0 => {
                    let i = rng.usize(..n);
                    let to = ["a", "b", "c", "d", "e"][rng.usize(..5)];
                    raw[i]
                        .metadata
                        .labels
                        .get_or_insert_default()
                        .insert(backends::SERVICE_NAME_LABEL.to_string(), to.to_string());
                    slices[i] = Arc::new(Slice::from(&raw[i]));
                }
                // address type changed
                5 if n > 0 => {
                    let i = rng.usize(..n);
                    let s = &mut raw[i];
                    s.address_type = if s.address_type == "IPv4" {
                        "IPv6".to_string()
                    } else {
                        "IPv4".to_string()
                    };
                    slices[i] = Arc::new(Slice::from(&raw[i]));
                }
                // an equal fresh copy (a source re-reading a file): nothing to re-resolve
                6 if n > 0 => {
                    let i = rng.usize(..n);
                    slices[i] = Arc::new(Slice::from(&raw[i]));
                }
                // the same slices in another order
                _ if n > 1 => {
                    let (i, j) = (rng.usize(..n), rng.usize(..n));
                    slices.swap(i, j);
                    raw.swap(i, j);
                }
                _ => {}
            }
            let got = t.translate(&w.0, &opts);
            assert!(t.reused(), "seed {seed} step {step}: routes are reused");
            assert_eq!(
                got,
                translate(&w.0, &opts),
                "seed {seed} step {step} op {op}"
            );
            if op == 6 && n > 0 {
                assert_eq!(t.resolved_backends(), 0, "seed {seed} step {step}");
                assert!(Arc::ptr_eq(&got.0.backends, &previous.backends));
            }
            // One slice touches at most two Services (before and after), c has two backends.
            if (2..=5).contains(&op) && n > 0 {
                assert!(t.resolved_backends() <= 4, "seed {seed} step {step}");
            }
            previous = got.0;
        }
    }
}

#[test]
fn translator_reuses_unchanged_backends_by_pointer() {
    let w = World::web()
        .svc(svc("default", "api", &[("http", 80)]))
        .slice(slice(
            "default",
            "api-1",
            "api",
            "IPv4",
            &[("http", 8080)],
            vec![ready("10.0.1.1")],
        ))
        .ing(
            Ing::new("default", "a")
                .path("a.test", "Prefix", "/", "web", svc80())
                .path("a.test", "Prefix", "/api", "api", svc80()),
        );
    let opts = Options::default();
    let mut t = Translator::new();
    let (before, _) = t.translate(&w.0, &opts);
    assert_eq!(t.resolved_backends(), 2);
    let mut moved = w.clone();
    let web = moved
        .0
        .endpoint_slices
        .iter()
        .position(|s| s.name() == "web-1")
        .expect("web slice");
    moved.0.endpoint_slices[web] = Arc::new(Slice::from(slice(
        "default",
        "web-1",
        "web",
        "IPv4",
        &[("http", 8080)],
        vec![ready("10.0.0.9")],
    )));
    let (after, _) = t.translate(&moved.0, &opts);
    assert!(t.reused());
    assert_eq!(
        t.resolved_backends(),
        1,
        "only web's backend is resolved again"
    );
    assert!(Arc::ptr_eq(&before.hosts, &after.hosts));
    let key = |s: &Snapshot, svc: &str| {
        s.backends
            .backends
            .iter()
            .find(|b| &*b.key.service == svc)
            .expect("backend")
            .clone()
    };
    assert!(Arc::ptr_eq(
        &key(&before, "api").endpoints,
        &key(&after, "api").endpoints
    ));
    assert_eq!(endpoints(&after, "a.test", "/"), vec!["10.0.0.9:8080"]);
    assert_eq!(after, translate(&moved.0, &opts).0);
}

/// Route derivation interns hosts and backends by first-seen position and renumbers backends
/// in key order at the end; the claim map holds each path until the routes are built. At a
/// size where first-seen order differs from key order everywhere (the oldest Ingress names the
/// last Service in key order), with repeated backends, hosts shared by several Ingresses and
/// conflicting claims, every path must still reach its own Service with its own path.
#[test]
fn interned_hosts_backends_and_claims_route_every_path_to_its_own_service() {
    const N: usize = 40;
    let mut w = World::default();
    for i in 0..N {
        let ns = format!("ns{}", i % 3);
        let svc_name = format!("s{i}");
        w = w.svc(svc(&ns, &svc_name, &[("http", 80)]));
        // Oldest first is `N - 1`, so visit order is the reverse of name order; four Ingresses
        // share each host (every third one a wildcard); every Ingress names its Service by number and by name (two keys).
        let host = if (i / 4) % 3 == 2 {
            format!("*.w{}.test", i / 4)
        } else {
            format!("h{}.test", i / 4)
        };
        let minute = N - 1 - i;
        let ing = Ing::new(&ns, &format!("ing{i}"))
            .created(&format!("2026-01-01T00:{minute:02}:00Z"))
            .rule(
                Some(&host),
                &[
                    ("Exact", &format!("/e{i}"), &svc_name, json!(80)),
                    ("Prefix", &format!("/p{i}/a"), &svc_name, json!("http")),
                    ("Prefix", &format!("/p{i}/b"), &svc_name, json!(80)),
                    // Claimed by every Ingress of the host: only the oldest keeps it.
                    ("Prefix", "/shared", &svc_name, json!(80)),
                ],
            );
        w = w.ing(ing);
    }
    let (s, d) = w.run();

    let keys: Vec<String> = s
        .backends
        .backends
        .iter()
        .map(|b| b.key.to_string())
        .collect();
    let mut sorted_keys = s
        .backends
        .backends
        .iter()
        .map(|b| b.key.clone())
        .collect::<Vec<_>>();
    sorted_keys.sort();
    assert_eq!(
        sorted_keys,
        s.backends
            .backends
            .iter()
            .map(|b| b.key.clone())
            .collect::<Vec<_>>(),
        "backend table in key order"
    );
    assert_eq!(
        keys.len(),
        2 * N,
        "one backend per (Service, port as written)"
    );

    for i in 0..N {
        let ns = format!("ns{}", i % 3);
        let host = if (i / 4) % 3 == 2 {
            format!("x.w{}.test", i / 4)
        } else {
            format!("h{}.test", i / 4)
        };
        assert_eq!(hit(&s, &host, &format!("/e{i}")), format!("{ns}/s{i}:80"));
        assert_eq!(
            hit(&s, &host, &format!("/p{i}/a/z")),
            format!("{ns}/s{i}:http")
        );
        assert_eq!(hit(&s, &host, &format!("/p{i}/b")), format!("{ns}/s{i}:80"));
        let r = route(&s, &host, &format!("/p{i}/b")).expect("route");
        assert_eq!(r.path, format!("/p{i}/b"));
        assert_eq!(
            (&*r.ingress.namespace, &*r.ingress.name),
            (ns.as_str(), format!("ing{i}").as_str())
        );
        // The oldest Ingress of the host (highest i of its group of four) holds `/shared`.
        let owner = (i / 4) * 4 + 3;
        assert_eq!(
            hit(&s, &host, "/shared"),
            format!("ns{}/s{owner}:80", owner % 3)
        );
    }
    let conflicts: Vec<&Diagnostic> = d.iter().filter(|d| d.reason == "PathConflict").collect();
    assert_eq!(conflicts.len(), N / 4 * 3, "three losers per host: {d:?}");
    assert_eq!(d.len(), conflicts.len(), "no other diagnostic: {d:?}");
    for c in conflicts {
        let i: usize = c
            .name
            .trim_start_matches("ing")
            .parse()
            .expect("ingress number");
        let owner = (i / 4) * 4 + 3;
        assert!(
            c.message.contains(&format!(
                "Prefix /shared is already served by Ingress ns{}/ing{owner}",
                owner % 3
            )),
            "{c:?}"
        );
    }
}

/// Consecutive paths of one Ingress naming the same backend reuse its resolution; a change of
/// backend, a failed resolution and the next Ingress each resolve again. The result and the
/// diagnostics must be what resolving every path gives.
#[test]
fn repeated_backends_of_one_ingress_resolve_like_every_path_alone() {
    let w = World::web()
        .svc(svc("default", "api", &[("http", 80)]))
        .ing(
            Ing::new("default", "old")
                .created("2024-01-01T00:00:00Z")
                .ann("portico.dev/health-check-path", "/old")
                .rule(
                    Some("a.test"),
                    &[
                        ("Prefix", "/w1", "web", svc80()),
                        ("Prefix", "/w2", "web", svc80()),
                        ("Prefix", "/m1", "missing", svc80()),
                        ("Prefix", "/m2", "missing", svc80()),
                        ("Prefix", "/api", "api", svc80()),
                        ("Prefix", "/w3", "web", svc80()),
                        ("Prefix", "/w4", "web", json!("http")),
                    ],
                ),
        )
        .ing(
            Ing::new("default", "young")
                .created("2025-01-01T00:00:00Z")
                .ann("portico.dev/health-check-path", "/young")
                .rule(
                    Some("b.test"),
                    &[
                        ("Prefix", "/w1", "web", svc80()),
                        ("Prefix", "/w2", "web", svc80()),
                    ],
                ),
        );
    let (s, d) = w.run();
    for p in ["/w1", "/w2", "/w3"] {
        assert_eq!(hit(&s, "a.test", p), "default/web:80", "{p}");
        assert_eq!(
            hit(&s, "b.test", p).as_str(),
            if p == "/w3" { "404" } else { "default/web:80" }
        );
    }
    assert_eq!(hit(&s, "a.test", "/w4"), "default/web:http");
    assert_eq!(hit(&s, "a.test", "/api"), "default/api:80");
    assert_eq!(hit(&s, "a.test", "/m1"), "503");
    assert_eq!(hit(&s, "a.test", "/m2"), "503");
    assert_eq!(s.backends.backends.len(), 3);
    let checks: Vec<Option<String>> = s
        .backends
        .backends
        .iter()
        .map(|b| b.health_check.as_ref().map(|h| h.path.clone()))
        .collect();
    // api:80, web:80, web:http in key order; every one the old Ingress's check.
    assert_eq!(checks, vec![Some("/old".to_string()); 3]);
    // One ServiceNotFound per failing path (each names its path); one conflict warning for
    // the young Ingress, however many of its paths name the backend.
    let missing: Vec<&str> = d
        .iter()
        .filter(|d| d.reason == "ServiceNotFound")
        .map(|d| d.message.as_str())
        .collect();
    assert_eq!(missing.len(), 2, "{d:?}");
    assert!(
        missing.iter().any(|m| m.contains("path /m1")),
        "{missing:?}"
    );
    assert!(
        missing.iter().any(|m| m.contains("path /m2")),
        "{missing:?}"
    );
    let conflicts: Vec<&Diagnostic> = d
        .iter()
        .filter(|d| d.reason == "HealthCheckConflict")
        .collect();
    assert_eq!(conflicts.len(), 1, "{d:?}");
    assert_eq!(conflicts[0].name, "young");
    assert_eq!(d.len(), 3, "{d:?}");
}

#[test]
fn claimed_by_another_controller_follows_the_class_rules() {
    let ours = "portico.dev/ingress-controller";
    let ing = |class: Option<&str>, legacy: Option<&str>| -> Ingress {
        let mut v = json!({"metadata": {"namespace": "default", "name": "i"}, "spec": {}});
        if let Some(c) = class {
            v["spec"]["ingressClassName"] = json!(c);
        }
        if let Some(l) = legacy {
            v["metadata"]["annotations"] = json!({"kubernetes.io/ingress.class": l});
        }
        from(v)
    };
    let nginx = Arc::new(class("nginx", "k8s.io/ingress-nginx", false));
    let nginx_default = Arc::new(class("nginx", "k8s.io/ingress-nginx", true));
    let claimed = |i: &Ingress, classes: &[Arc<IngressClass>]| {
        super::claimed_by_another(i, classes, "portico", ours)
    };
    let some = std::slice::from_ref(&nginx);
    assert!(claimed(&ing(Some("nginx"), None), some));
    assert!(
        !claimed(&ing(Some("gone"), None), some),
        "a class nobody defines"
    );
    assert!(!claimed(&ing(Some("portico"), None), some), "ours");
    assert!(claimed(&ing(None, Some("nginx")), &[]), "legacy annotation");
    assert!(!claimed(&ing(None, Some("portico")), &[]));
    assert!(!claimed(&ing(None, None), some), "no class, no default");
    assert!(
        claimed(&ing(None, None), &[nginx_default]),
        "the default is nginx's"
    );
}
