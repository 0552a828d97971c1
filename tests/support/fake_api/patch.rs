//! Patch semantics of the fake API server: JSON merge patch (RFC 7386) and a field-set model
//! of server-side apply (ownership per field manager kept in `metadata.managedFields` as
//! `FieldsV1`). Pure JSON functions: must not import tokio, hyper or the store.
//!
//! Server-side apply model (documented simplification of
//! https://kubernetes.io/docs/reference/using-api/server-side-apply/): every map is merged
//! key by key, lists and scalars are atomic leaves; a manager owns the leaf paths of its last
//! applied configuration; applying a value that differs from the live value at a leaf owned by
//! another *apply* manager is a conflict (409) unless `force=true`, which moves ownership; leaves
//! the manager owned before and no longer applies are removed unless someone else owns them.
//! Updates (PUT, merge patch) do not record ownership.

use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// A leaf path such as `["spec", "rules"]` or `["metadata", "labels", "app"]`.
pub type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("Apply failed with {} conflict(s): {}", .0.len(), .0.join(", "))]
    Conflicts(Vec<String>),
}

/// RFC 7386 §2: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn leaves(v: &Value, prefix: &mut Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(k.clone());
                leaves(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// The fields an applied configuration sets. Identity and server-owned metadata (name,
/// namespace, uid, resourceVersion, …) are not owned by anyone; `labels` and `annotations`
/// are per-key maps, `finalizers` and `ownerReferences` atomic. With `status_only` (apply on
/// the `/status` subresource) only `.status` counts; with `drop_status` (main resource of a
/// kind with a status subresource) `.status` is ignored, as the real server resets it.
pub fn applied_fields(obj: &Value, status_only: bool, drop_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(m) = obj.as_object() else {
        return out;
    };
    for (k, v) in m {
        let mut prefix = vec![k.clone()];
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" if !status_only => {
                for key in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(sub) = v.get(key) {
                        let mut p = vec!["metadata".to_string(), key.to_string()];
                        if matches!(key, "labels" | "annotations") {
                            leaves(sub, &mut p, &mut out);
                        } else {
                            out.insert(p);
                        }
                    }
                }
            }
            "metadata" => {}
            "status" if drop_status => {}
            "status" => leaves(v, &mut prefix, &mut out),
            _ if status_only => {}
            _ => leaves(v, &mut prefix, &mut out),
        }
    }
    out
}

pub fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, seg| cur.get(seg))
}

fn set_path(v: &mut Value, path: &[String], val: Value) {
    let Some((last, parents)) = path.split_last() else {
        *v = val;
        return;
    };
    let mut cur = v;
    for seg in parents {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(m) = cur else { return };
        cur = m.entry(seg.clone()).or_insert(Value::Null);
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    if let Value::Object(m) = cur {
        m.insert(last.clone(), val);
    }
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in parents {
        match cur.get_mut(seg) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Value::Object(m) = cur {
        m.remove(last);
    }
}

/// `FieldsV1` rendering: nested `{"f:<key>": {...}}`, a leaf is `{}`.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Value::Object(Map::new());
    for path in set {
        let keyed: Path = path.iter().map(|s| format!("f:{s}")).collect();
        if get_path(&root, &keyed).is_none() {
            set_path(&mut root, &keyed, json!({}));
        }
    }
    root
}

pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(v: &Value, prefix: &mut Path, out: &mut FieldSet) {
        let children: Vec<(&String, &Value)> = v
            .as_object()
            .map(|m| m.iter().filter(|(k, _)| k.starts_with("f:")).collect())
            .unwrap_or_default();
        if children.is_empty() {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
            return;
        }
        for (k, child) in children {
            prefix.push(k.trim_start_matches("f:").to_string());
            walk(child, prefix, out);
            prefix.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// One `managedFields` entry as the fake keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    pub manager: String,
    pub operation: String,
    pub subresource: String,
    pub api_version: String,
    pub time: String,
    pub fields: FieldSet,
}

pub fn read_managed(obj: &Value) -> Vec<Managed> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let s = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    list.iter()
        .map(|e| Managed {
            manager: s(e, "manager"),
            operation: s(e, "operation"),
            subresource: s(e, "subresource"),
            api_version: s(e, "apiVersion"),
            time: s(e, "time"),
            fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
        })
        .collect()
}

pub fn write_managed(obj: &mut Value, entries: &[Managed]) {
    let list: Vec<Value> = entries
        .iter()
        .map(|m| {
            let mut e = json!({
                "manager": m.manager,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": m.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&m.fields),
            });
            if !m.subresource.is_empty() {
                e["subresource"] = json!(m.subresource);
            }
            e
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// What one apply request does to one object.
pub struct Apply<'a> {
    pub manager: &'a str,
    pub force: bool,
    pub status_only: bool,
    pub drop_status: bool,
    pub api_version: &'a str,
    pub now: &'a str,
}

/// Server-side apply of `applied` onto `live` (see the module doc). Returns the new object;
/// the caller keeps server-owned metadata and decides whether anything changed.
pub fn apply(live: &Value, applied: &Value, a: &Apply<'_>) -> Result<Value, PatchError> {
    let subresource = if a.status_only { "status" } else { "" };
    let new_set = applied_fields(applied, a.status_only, a.drop_status);
    let mut entries = read_managed(live);
    let mut conflicts = Vec::new();
    for e in entries
        .iter_mut()
        .filter(|e| e.operation == "Apply" && e.manager != a.manager)
    {
        let clashing: Vec<Path> = e
            .fields
            .iter()
            .filter(|p| new_set.contains(*p) && get_path(live, p) != get_path(applied, p))
            .cloned()
            .collect();
        if a.force {
            for p in &clashing {
                e.fields.remove(p);
            }
        } else {
            conflicts.extend(
                clashing
                    .iter()
                    .map(|p| format!("conflict with \"{}\": .{}", e.manager, p.join("."))),
            );
        }
    }
    if !conflicts.is_empty() {
        return Err(PatchError::Conflicts(conflicts));
    }
    let mut out = live.clone();
    let mine = entries.iter().position(|e| {
        e.operation == "Apply" && e.manager == a.manager && e.subresource == subresource
    });
    if let Some(i) = mine {
        let owned_by_others: FieldSet = entries
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, e)| e.fields.iter().cloned())
            .collect();
        for p in entries[i].fields.difference(&new_set) {
            if !owned_by_others.contains(p) {
                remove_path(&mut out, p);
            }
        }
    }
    for p in &new_set {
        if let Some(v) = get_path(applied, p) {
            // An applied empty map only asserts the map exists; it does not wipe live keys.
            let keeps_live_map = v.as_object().is_some_and(Map::is_empty)
                && get_path(&out, p).is_some_and(Value::is_object);
            if !keeps_live_map {
                set_path(&mut out, p, v.clone());
            }
        }
    }
    let entry = Managed {
        manager: a.manager.to_string(),
        operation: "Apply".into(),
        subresource: subresource.into(),
        api_version: a.api_version.into(),
        time: a.now.into(),
        fields: new_set,
    };
    match mine {
        Some(i) => {
            // Keep the old timestamp when ownership did not change, so a no-op apply stays a no-op.
            let time = if entries[i].fields == entry.fields {
                entries[i].time.clone()
            } else {
                entry.time.clone()
            };
            entries[i] = Managed { time, ..entry };
        }
        None => entries.push(entry),
    }
    entries.retain(|e| !e.fields.is_empty());
    write_managed(&mut out, &entries);
    Ok(out)
}
