//! Incremental translation (brief §2: "Endpoint churn must not require re-deriving routes"):
//! [`Translator`] keeps the endpoint-independent part of its last build and, when nothing but
//! EndpointSlices changed, re-runs only [`resolve_endpoints`](super::resolve_endpoints).
//!
//! Owns: the change test and the cache. Pure like the rest of translate (no I/O, no clock):
//! the result is always equal to [`translate`](super::translate) of the same inputs.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Diagnostic, Diags, Inputs, Options, Routes, resolve_endpoints, routes};
use crate::model::Snapshot;

/// Translates, reusing the derived routes of the previous call when only endpoints changed.
#[derive(Debug, Default)]
pub struct Translator {
    last: Option<Derived>,
    reused: bool,
}

/// What route derivation read (the inputs other than EndpointSlices, and the options) and
/// produced. Holding the input `Arc`s keeps their addresses from being reused, so a pointer
/// comparison can never mistake a new object for an old one.
#[derive(Debug)]
struct Derived {
    options: Options,
    inputs: Inputs,
    routes: Routes,
    diagnostics: Vec<Diagnostic>,
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Same result as [`translate`](super::translate); cheaper when only EndpointSlices changed.
    pub fn translate(&mut self, inputs: &Inputs, opts: &Options) -> (Snapshot, Vec<Diagnostic>) {
        let reuse = self
            .last
            .as_ref()
            .is_some_and(|d| d.options == *opts && same_routing_inputs(&d.inputs, inputs));
        self.reused = reuse;
        if !reuse {
            let mut diags = Diags::default();
            let routes = routes::derive(inputs, opts, &mut diags);
            self.last = Some(Derived {
                options: opts.clone(),
                inputs: Inputs {
                    endpoint_slices: Vec::new(),
                    ..inputs.clone()
                },
                routes,
                diagnostics: diags.0,
            });
        }
        let Some(derived) = &self.last else {
            // Just filled above; an empty build is the safe answer if it ever were not.
            return (Snapshot::default(), Vec::new());
        };
        let (backends, endpoint_diags) =
            resolve_endpoints(&derived.routes.backends, &inputs.endpoint_slices);
        let mut diags = Diags(derived.diagnostics.clone());
        diags.0.extend(endpoint_diags);
        (derived.routes.snapshot(backends), diags.finish())
    }

    /// Whether the last [`Translator::translate`] reused the previous routes.
    pub fn reused(&self) -> bool {
        self.reused
    }
}

/// Ingresses, IngressClasses, Services, Secrets and RateLimitPolicies hold the same objects (as
/// sets: sources need not keep an order). Objects are compared by pointer first, by value when
/// a source handed out a fresh copy.
fn same_routing_inputs(a: &Inputs, b: &Inputs) -> bool {
    same_set(&a.ingresses, &b.ingresses, |o| &o.metadata)
        && same_set(&a.ingress_classes, &b.ingress_classes, |o| &o.metadata)
        && same_set(&a.services, &b.services, |o| &o.metadata)
        && same_set(&a.secrets, &b.secrets, |o| &o.metadata)
        && same_set(&a.rate_limit_policies, &b.rate_limit_policies, |o| {
            &o.metadata
        })
}

fn same_set<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>], meta: fn(&T) -> &ObjectMeta) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y)) {
        return true;
    }
    fn sorted<T>(v: &[Arc<T>], meta: fn(&T) -> &ObjectMeta) -> Vec<&Arc<T>> {
        let mut v: Vec<&Arc<T>> = v.iter().collect();
        v.sort_by(|x, y| {
            let (mx, my) = (meta(x), meta(y));
            (&mx.namespace, &mx.name, Arc::as_ptr(x)).cmp(&(
                &my.namespace,
                &my.name,
                Arc::as_ptr(y),
            ))
        });
        v
    }
    sorted(a, meta)
        .into_iter()
        .zip(sorted(b, meta))
        .all(|(x, y)| Arc::ptr_eq(x, y) || **x == **y)
}
