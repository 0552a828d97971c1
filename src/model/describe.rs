//! A stable, human-readable text dump of a [`Snapshot`], for golden tests, `portico check` and
//! debugging: hosts sorted, routes in precedence order, policy shown as deltas from
//! [`RoutePolicy::default`], backends with endpoints, TLS names with their Secret.
//!
//! Owns: the dump format only. Must not import tokio, hyper, kube, k8s-openapi or translate.

use std::fmt::Write as _;
use std::time::Duration;

use super::{
    HashKey, HostRoutes, LoadBalance, Route, RoutePolicy, RouteTarget, Snapshot, SslRedirect,
    UpstreamProtocol,
};

/// Render a snapshot as text. Equal snapshots render identically (every map is sorted).
pub fn describe(snap: &Snapshot) -> String {
    let mut out = String::new();
    let hosts = &*snap.hosts;

    out.push_str("hosts:\n");
    let mut exact: Vec<_> = hosts.exact.iter().collect();
    exact.sort_by(|a, b| a.0.cmp(b.0));
    for (name, routes) in exact {
        host_block(&mut out, name, routes, snap);
    }
    let mut wildcard: Vec<_> = hosts.wildcard.iter().collect();
    wildcard.sort_by(|a, b| a.0.cmp(b.0));
    for (suffix, routes) in wildcard {
        host_block(&mut out, &format!("*.{suffix}"), routes, snap);
    }
    if let Some(routes) = &hosts.catch_all {
        host_block(&mut out, "(any host)", routes, snap);
    }
    if hosts.exact.is_empty() && hosts.wildcard.is_empty() && hosts.catch_all.is_none() {
        out.push_str("  (none)\n");
    }

    out.push_str("default route:\n");
    match &hosts.default_route {
        Some(r) => route_line(&mut out, r, snap),
        None => out.push_str("  (none: 404)\n"),
    }

    out.push_str("backends:\n");
    let mut backends: Vec<_> = snap.backends.backends.iter().collect();
    backends.sort_by(|a, b| a.key.cmp(&b.key));
    if backends.is_empty() {
        out.push_str("  (none)\n");
    }
    for b in backends {
        let eps: Vec<String> = b.endpoints.iter().map(|e| e.addr.to_string()).collect();
        let eps = if eps.is_empty() {
            "(no endpoints)".to_string()
        } else {
            eps.join(", ")
        };
        let drain = if b.draining_fallback {
            " (draining fallback)"
        } else {
            ""
        };
        let check = match &b.health_check {
            Some(h) => format!(
                " (health check GET {} every {} timeout {} up {} down {})",
                h.path,
                dur(h.interval),
                dur(h.timeout),
                h.healthy_threshold,
                h.unhealthy_threshold
            ),
            None => String::new(),
        };
        let _ = writeln!(out, "  {} -> {eps}{drain}{check}", b.key);
    }

    out.push_str("tls:\n");
    let tls = &*snap.tls;
    let mut names: Vec<(String, &str)> = tls
        .exact
        .iter()
        .map(|(h, c)| (h.clone(), &*c.source))
        .chain(
            tls.wildcard
                .iter()
                .map(|(s, c)| (format!("*.{s}"), &*c.source)),
        )
        .collect();
    names.sort();
    for (name, source) in &names {
        let _ = writeln!(out, "  {name} -> {source}");
    }
    match &tls.default {
        Some(c) => {
            let _ = writeln!(out, "  (default) -> {}", c.source);
        }
        None => out.push_str("  (default) -> generated\n"),
    }
    out
}

fn host_block(out: &mut String, name: &str, routes: &HostRoutes, snap: &Snapshot) {
    let _ = writeln!(out, "  {name}");
    for r in routes.routes() {
        out.push_str("  ");
        route_line(out, r, snap);
    }
}

fn route_line(out: &mut String, r: &Route, snap: &Snapshot) {
    let kind = match r.kind {
        super::PathKind::Exact => "Exact",
        super::PathKind::Prefix => "Prefix",
    };
    let target = match &r.target {
        RouteTarget::Backend(id) => match snap.backends.get(*id) {
            Some(b) => format!("backend {}", b.key),
            None => format!("backend #{} (missing)", id.0),
        },
        RouteTarget::Unavailable { reason } => format!("unavailable (503): {reason}"),
    };
    let _ = write!(
        out,
        "  {kind} {} [{}/{}] -> {target}",
        r.path, r.ingress.namespace, r.ingress.name
    );
    let deltas = policy_deltas(&r.policy);
    if !deltas.is_empty() {
        let _ = write!(out, " {{{}}}", deltas.join(", "));
    }
    out.push('\n');
}

fn policy_deltas(p: &RoutePolicy) -> Vec<String> {
    let d = RoutePolicy::default();
    let mut v = Vec::new();
    if p.connect_timeout != d.connect_timeout {
        v.push(format!("connect-timeout={}", dur(p.connect_timeout)));
    }
    if p.read_timeout != d.read_timeout {
        v.push(format!("read-timeout={}", dur(p.read_timeout)));
    }
    if p.body_limit != d.body_limit {
        if p.body_limit == 0 {
            v.push("body-limit=unlimited".to_string());
        } else {
            v.push(format!("body-limit={}", p.body_limit));
        }
    }
    // A route of its own TLS host shows its redirect; a catch-all or default route redirects
    // exactly the TLS hosts listed elsewhere in the description, so it says nothing.
    if p.ssl_redirect == SslRedirect::Yes {
        v.push("ssl-redirect=true".to_string());
    }
    if p.hsts != d.hsts {
        v.push(format!("hsts={:?}", p.hsts.as_deref().unwrap_or("off")));
    }
    for rl in p.rate_limits.iter() {
        v.push(format!("ratelimit={}", describe_rate_limit(rl)));
    }
    if p.upstream_protocol != d.upstream_protocol {
        let proto = match p.upstream_protocol {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
        };
        v.push(format!("protocol={proto}"));
    }
    if p.max_concurrent_requests != d.max_concurrent_requests {
        match p.max_concurrent_requests {
            Some(n) => v.push(format!("max-concurrent-requests={n}")),
            None => v.push("max-concurrent-requests=none".to_string()),
        }
    }
    if p.load_balance != d.load_balance {
        let lb = match &p.load_balance {
            LoadBalance::RoundRobin => "round-robin".to_string(),
            LoadBalance::LeastRequest => "least-request".to_string(),
            LoadBalance::Random => "random".to_string(),
            LoadBalance::ConsistentHash(HashKey::ClientIp) => "consistent-hash(client-ip)".into(),
            LoadBalance::ConsistentHash(HashKey::Header(h)) => {
                format!("consistent-hash(header:{h})")
            }
            LoadBalance::ConsistentHash(HashKey::Cookie { name, ttl }) => match ttl {
                Some(t) => format!("consistent-hash(cookie:{name}, ttl={})", dur(*t)),
                None => format!("consistent-hash(cookie:{name}, session)"),
            },
        };
        v.push(format!("load-balance={lb}"));
    }
    v
}

/// `name(10/1m burst=20 key=client-ip max-in-flight=5)`.
fn describe_rate_limit(rl: &crate::model::RateLimit) -> String {
    let mut parts = Vec::new();
    if let Some(b) = &rl.bucket {
        parts.push(format!(
            "{}/{} burst={}",
            b.requests,
            dur(b.period),
            b.burst
        ));
    }
    parts.push(match &rl.key {
        crate::model::RateLimitKey::ClientIp => "key=client-ip".to_string(),
        crate::model::RateLimitKey::Header(h) => format!("key=header:{h}"),
        crate::model::RateLimitKey::Global => "key=global".to_string(),
    });
    if let Some(n) = rl.max_in_flight {
        parts.push(format!("max-in-flight={n}"));
    }
    let uid = if rl.policy.uid.is_empty() {
        String::new()
    } else {
        format!(" uid={}", rl.policy.uid)
    };
    format!("{}({}{uid})", rl.policy.name, parts.join(" "))
}

fn dur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}
