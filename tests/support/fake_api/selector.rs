//! Label and field selectors of the fake API server, parsed from the `labelSelector` /
//! `fieldSelector` query parameters and evaluated against JSON objects. Pure: must not import
//! tokio, hyper or the store.
//!
//! Grammar follows the Kubernetes docs ("Labels and Selectors", "Field Selectors"):
//! comma-separated requirements that are ANDed; label operators `=`, `==`, `!=`, `in (..)`,
//! `notin (..)`, `key` (exists) and `!key` (does not exist); field operators `=`, `==`, `!=`.

use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("unable to parse requirement: {0:?}")]
    Requirement(String),
    #[error("unbalanced parentheses in selector {0:?}")]
    Parens(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

/// A parsed field selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Splits on commas that are not inside `( … )`, so `env in (a,b),tier` is two requirements.
fn split_top_level(s: &str) -> Result<Vec<String>, SelectorError> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c);
            }
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| SelectorError::Parens(s.to_string()))?;
                cur.push(c);
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if depth != 0 {
        return Err(SelectorError::Parens(s.to_string()));
    }
    out.push(cur);
    Ok(out
        .into_iter()
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect())
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_set(key: &str, rest: &str, whole: &str) -> Result<(String, Vec<String>), SelectorError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError::Requirement(whole.to_string()))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if !valid_key(key) || values.iter().any(|v| !valid_value(v)) {
        return Err(SelectorError::Requirement(whole.to_string()));
    }
    Ok((key.to_string(), values))
}

fn parse_label_req(r: &str) -> Result<LabelReq, SelectorError> {
    let bad = || SelectorError::Requirement(r.to_string());
    if let Some(k) = r.strip_prefix('!') {
        let k = k.trim();
        return if valid_key(k) {
            Ok(LabelReq::NotExists(k.to_string()))
        } else {
            Err(bad())
        };
    }
    if let Some(open) = r.find('(') {
        let (head, rest) = r.split_at(open);
        let head = head.trim();
        if let Some(k) = head.strip_suffix(" notin") {
            let (k, vs) = parse_set(k.trim(), rest, r)?;
            return Ok(LabelReq::NotIn(k, vs));
        }
        if let Some(k) = head.strip_suffix(" in") {
            let (k, vs) = parse_set(k.trim(), rest, r)?;
            return Ok(LabelReq::In(k, vs));
        }
        return Err(bad());
    }
    for (op, ctor) in [
        ("!=", LabelReq::NotEq as fn(String, String) -> LabelReq),
        ("==", LabelReq::Eq),
        ("=", LabelReq::Eq),
    ] {
        if let Some((k, v)) = r.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) || !valid_value(v) {
                return Err(bad());
            }
            return Ok(ctor(k.to_string(), v.to_string()));
        }
    }
    if valid_key(r) {
        Ok(LabelReq::Exists(r.to_string()))
    } else {
        Err(bad())
    }
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        split_top_level(s)?
            .iter()
            .map(|r| parse_label_req(r))
            .collect::<Result<Vec<_>, _>>()
            .map(LabelSelector)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Evaluates against `metadata.labels` of `obj`. `!=` and `notin` match objects that lack
    /// the key, as the Kubernetes docs specify.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// The value of a dotted field path as the field-selector string form: strings as-is, other
/// scalars via their JSON text, a missing field as "" (so `spec.x!=foo` matches objects without
/// it, like the real server's field sets).
fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for seg in path.split('.') {
        match cur.get(seg) {
            Some(next) => cur = next,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for r in split_top_level(s)? {
            let bad = || SelectorError::Requirement(r.clone());
            let (k, eq, v) = if let Some((k, v)) = r.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = r.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = r.split_once('=') {
                (k, true, v)
            } else {
                return Err(bad());
            };
            let k = k.trim();
            if k.is_empty() || k.starts_with('.') || k.ends_with('.') {
                return Err(bad());
            }
            reqs.push((k.to_string(), eq, v.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0
            .iter()
            .all(|(k, eq, v)| (field_value(obj, k) == *v) == *eq)
    }
}
