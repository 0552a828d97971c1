//! IngressClass selection: is an Ingress ours? (brief §4.3, Kubernetes networking.k8s.io/v1
//! `IngressSpec.ingressClassName` and the deprecated `kubernetes.io/ingress.class` annotation).
//!
//! Owns: the class decision only. Must not import tokio, hyper or the filesystem.

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use super::index::{self, Index};
use super::{Diags, ObjRef, Options};

/// Deprecated annotation that predates `spec.ingressClassName`; still honoured.
pub(super) const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
/// Annotation on an IngressClass marking it as the cluster default (Kubernetes API docs,
/// "Default IngressClass").
pub(super) const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";

/// True when this controller serves the Ingress. Ingresses of other classes are silently
/// ignored: they belong to another controller and are none of our business.
pub(super) fn is_ours(ing: &Ingress, index: &Index<'_>, opts: &Options) -> bool {
    ours(
        ing,
        |name| index.classes.get(name).copied(),
        index.classes.values().copied(),
        &opts.ingress_class,
        &opts.controller_name,
    )
}

fn is_default(c: &IngressClass) -> bool {
    c.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
        .is_some_and(|v| v == "true")
}

fn controller(c: &IngressClass) -> Option<&str> {
    c.spec.as_ref().and_then(|s| s.controller.as_deref())
}

/// A default IngressClass of ours beside another controller's default: Ingresses without a
/// class are then served by both controllers, which also both write their status (Kubernetes
/// calls more than one default an error, and admission refuses new class-less Ingresses while
/// it lasts, but the ones already there stay). A warning on each of our default classes.
pub(super) fn check_defaults(index: &Index<'_>, opts: &Options, diags: &mut Diags) {
    let mut others: Vec<&str> = index
        .classes
        .values()
        .filter(|c| is_default(c) && controller(c) != Some(opts.controller_name.as_str()))
        .map(|c| index::name(&c.metadata))
        .collect();
    if others.is_empty() {
        return;
    }
    others.sort_unstable();
    for ours in index
        .classes
        .values()
        .filter(|c| is_default(c) && controller(c) == Some(opts.controller_name.as_str()))
    {
        let r = ObjRef {
            namespace: "",
            ..index::obj_ref(&ours.metadata)
        };
        diags.warn(
            "IngressClass",
            &r,
            "AmbiguousDefaultClass",
            format!(
                "is marked default, and so is {} of another controller: Ingresses without a \
                 class are served by both (mark one default only)",
                others.join(", ")
            ),
        );
    }
}

/// [`is_ours`] for callers outside translate (the controller keeps Secret data only for the
/// Ingresses it serves): `classes` are all IngressClasses, `ingress_class` and
/// `controller_name` the flags of the same names.
pub fn serves_ingress(
    ing: &Ingress,
    classes: &[std::sync::Arc<IngressClass>],
    ingress_class: &str,
    controller_name: &str,
) -> bool {
    ours(
        ing,
        |name| {
            classes
                .iter()
                .map(|c| &**c)
                .find(|c| c.metadata.name.as_deref() == Some(name))
        },
        classes.iter().map(|c| &**c),
        ingress_class,
        controller_name,
    )
}

/// True when another controller claims the Ingress: it names an IngressClass that exists and
/// points at another controller, or its legacy class annotation names another class, or it has
/// no class and the default IngressClass is another controller's. An Ingress naming a class
/// nobody defines, or with no class and no default, is nobody's. (The status writer leaves
/// claimed Ingresses to their controller and clears our address from the rest.)
pub fn claimed_by_another(
    ing: &Ingress,
    classes: &[std::sync::Arc<IngressClass>],
    ingress_class: &str,
    controller_name: &str,
) -> bool {
    if serves_ingress(ing, classes, ingress_class, controller_name) {
        return false;
    }
    if let Some(class) = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .filter(|c| !c.is_empty())
    {
        return classes.iter().any(|c| {
            c.metadata.name.as_deref() == Some(class) && controller(c) != Some(controller_name)
        });
    }
    if let Some(legacy) = ing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LEGACY_CLASS_ANNOTATION))
    {
        return legacy != ingress_class;
    }
    classes
        .iter()
        .any(|c| controller(c) != Some(controller_name) && is_default(c))
}

fn ours<'c>(
    ing: &Ingress,
    class_named: impl Fn(&str) -> Option<&'c IngressClass>,
    mut all_classes: impl Iterator<Item = &'c IngressClass>,
    ingress_class: &str,
    controller_name: &str,
) -> bool {
    let class_name = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .filter(|c| !c.is_empty());
    if let Some(class) = class_name {
        // Named class: ours when it is our `--ingress-class`, or when the IngressClass of that
        // name points at our controller.
        return class == ingress_class
            || class_named(class).is_some_and(|c| controller(c) == Some(controller_name));
    }
    if let Some(legacy) = ing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LEGACY_CLASS_ANNOTATION))
    {
        return legacy == ingress_class;
    }
    // No class at all: the default IngressClass applies, and we serve it only when the default
    // is one of ours.
    all_classes.any(|c| controller(c) == Some(controller_name) && is_default(c))
}
