//! IngressClass selection: is an Ingress ours? (brief §4.3, Kubernetes networking.k8s.io/v1
//! `IngressSpec.ingressClassName` and the deprecated `kubernetes.io/ingress.class` annotation).
//!
//! Owns: the class decision only. Must not import tokio, hyper or the filesystem.

use k8s_openapi::api::networking::v1::Ingress;

use super::Options;
use super::index::Index;

/// Deprecated annotation that predates `spec.ingressClassName`; still honoured.
pub(super) const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
/// Annotation on an IngressClass marking it as the cluster default (Kubernetes API docs,
/// "Default IngressClass").
pub(super) const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";

/// True when this controller serves the Ingress. Ingresses of other classes are silently
/// ignored: they belong to another controller and are none of our business.
pub(super) fn is_ours(ing: &Ingress, index: &Index<'_>, opts: &Options) -> bool {
    let class_name = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .filter(|c| !c.is_empty());
    if let Some(class) = class_name {
        // Named class: ours when it is our `--ingress-class`, or when the IngressClass of that
        // name points at our controller.
        return class == opts.ingress_class
            || index.classes.get(class).is_some_and(|c| {
                c.spec.as_ref().and_then(|s| s.controller.as_deref())
                    == Some(opts.controller_name.as_str())
            });
    }
    if let Some(legacy) = ing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LEGACY_CLASS_ANNOTATION))
    {
        return legacy == &opts.ingress_class;
    }
    // No class at all: the default IngressClass applies, and we serve it only when the default
    // is one of ours.
    index.classes.values().any(|c| {
        c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(opts.controller_name.as_str())
            && c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                .is_some_and(|v| v == "true")
    })
}
